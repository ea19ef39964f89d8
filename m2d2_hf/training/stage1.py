"""Stage 1 of the M2D2 recipe: M2D + CLAP pre-training against cached caption embeddings, with accelerate.

`examples/pretrain_stage1.py` is the command line; everything it does lives here so that it can be tested and
reused. Data path: streamed audio (decoded and resampled in DataLoader workers, broken items skipped and counted)
→ log-mel of whole clips on the training device → random 608-frame crops (zero-padded in raw log-mel space) →
normalisation with the run's `norm_stats` → `M2D2ForPreTraining` → clipped AdamW, warm-up + cosine schedule, EMA
target update, temperature clamp → step checkpoints and `M2D2AudioModel` exports.
"""

import argparse
import logging
from pathlib import Path

import torch
from transformers import AutoConfig

from ..configuration_m2d2 import M2D2AudioConfig, M2D2PreTrainingConfig
from ..feature_extraction_m2d2 import M2D2FeatureExtractor
from ..model_card import ModelCardInfo, training_card_info, write_model_card
from ..modeling_m2d2_pretraining import M2D2ForPreTraining
from .captions import CaptionEmbeddingTable, draw_captions
from .checkpoint import resolve_checkpoint
from .data import random_log_mel_crops
from .loop import (
    BatchStream,
    RunState,
    build_accelerator,
    make_output_dir,
    program_parser,
    run_training,
    start_run,
    step_generator,
    streamed_loader,
)
from .optim import scaled_learning_rate, warmup_cosine_schedule, weight_decay_groups


logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser, model = program_parser(
        "Stage-1 M2D2 pre-training (M2D + CLAP against cached caption embeddings). Defaults follow the "
        "2025 paper: 608-frame crops, 16x16 patches, mask ratio 0.7, global batch 2048, AdamW (0.9, 0.95), weight "
        "decay 0.05, base lr 3e-4 x batch/256, 20 of 300 epochs warm-up then cosine, clip 3.0, EMA 0.99995→0.99999, "
        "loss 1.0·M2D + 0.01·CLAP, seed 7."
    )
    model.add_argument(
        "--model_name_or_path",
        default=None,
        help="continue from an M2D2ForPreTraining folder (e.g. a converted original pre-training checkpoint) or "
        "start the encoder from an M2D2AudioModel folder; a new ViT-B otherwise",
    )
    model.add_argument(
        "--config_overrides", default="", help="for a new model, e.g. 'hidden_size=192,num_hidden_layers=4'"
    )
    model.add_argument("--caption_embeddings", default=None, help="folder written by cache_caption_embeddings.py")
    model.add_argument(
        "--allow_uncaptioned",
        action="store_true",
        help="go on when no clip of the first step has a caption embedding (the CLAP term is then 0): without it, "
        "the run stops, as caption ids that match no clip id train M2D alone",
    )
    model.add_argument("--crop_frames", type=int, default=608, help="log-mel frames per training crop (6.08 s)")
    model.add_argument("--mask_ratio", type=float, default=0.7, help="fraction of patches hidden from the encoder")
    model.add_argument("--m2d_loss_weight", type=float, default=1.0)
    model.add_argument("--clap_loss_weight", type=float, default=0.01)
    model.add_argument("--base_learning_rate", type=float, default=3e-4, help="lr = base × global batch / 256")
    model.add_argument("--min_seconds", type=float, default=6.1, help="clips are zero-padded to this length first")
    model.add_argument(
        "--norm_stats", type=float, nargs=2, default=None, metavar=("MEAN", "STD"), help="log-mel statistics"
    )
    model.add_argument("--norm_stats_crops", type=int, default=5000, help="random crops for the statistics")
    model.add_argument("--export_steps", type=int, default=0, help="also export the encoder every N steps")
    parser.set_defaults(warmup_ratio=20 / 300)
    return parser


def build_model(args: argparse.Namespace, caption_size: int | None) -> M2D2ForPreTraining:
    """A new model from the config flags, or one loaded from `--model_name_or_path`."""
    if args.model_name_or_path:
        config = AutoConfig.from_pretrained(args.model_name_or_path)
        if not isinstance(config, M2D2AudioConfig):
            raise ValueError(f"{args.model_name_or_path} is not an M2D2 audio or pre-training folder")
        config = M2D2PreTrainingConfig.from_pretrained(args.model_name_or_path)
        if config.caption_embedding_size != caption_size:
            config.caption_embedding_size = caption_size
            logger.warning(f"caption embedding size set to {caption_size}: the CLAP head is re-initialised")
        # An encoder-only folder fills the online encoder; the target starts as its copy, the predictor new.
        model = M2D2ForPreTraining.from_pretrained(args.model_name_or_path, config=config)
    else:
        config = M2D2PreTrainingConfig(chunk_frames=args.crop_frames, caption_embedding_size=caption_size)
        if args.config_overrides:
            config.update_from_string(args.config_overrides)
        model = M2D2ForPreTraining(config)
    if model.config.chunk_frames < args.crop_frames:
        raise ValueError(
            f"--crop_frames {args.crop_frames} exceeds the model's positional grid "
            f"({model.config.chunk_frames} frames)"
        )
    model.config.mask_ratio = args.mask_ratio
    model.config.m2d_loss_weight = args.m2d_loss_weight
    model.config.clap_loss_weight = args.clap_loss_weight
    return model


class Stage1Batches:
    """Turns collated waveform batches into model inputs on the training device."""

    def __init__(self, feature_extractor, crop_frames: int, caption_table: CaptionEmbeddingTable | None, seed: int):
        self.feature_extractor = feature_extractor
        self.crop_frames = crop_frames
        self.caption_table = caption_table
        self.seed = seed

    def raw_crops(self, batch: dict, device: torch.device, generator: torch.Generator) -> torch.Tensor:
        """Log-mel of each whole clip (one batched convolution on `device`), then one random crop per clip."""
        waves = batch["waveforms"].to(device, non_blocking=True)
        clips = [wave[:length] for wave, length in zip(waves, batch["lengths"].tolist())]
        log_mel, num_frames = self.feature_extractor.batch_log_mel(clips)
        return random_log_mel_crops(log_mel, num_frames, self.crop_frames, generator)

    def inputs(self, batch: dict, device: torch.device, step: int, process: int, micro: int) -> dict:
        crop_generator = step_generator(self.seed, step, process, f"crop{micro}")
        inputs = {
            "input_features": self.feature_extractor.normalize(self.raw_crops(batch, device, crop_generator)),
            "generator": step_generator(self.seed, step, process, f"mask{micro}"),
        }
        if self.caption_table is not None:
            caption_generator = step_generator(self.seed, step, process, f"caption{micro}")
            embeddings, has_caption = draw_captions(self.caption_table, batch["ids"], caption_generator)
            inputs["caption_embeddings"] = embeddings.to(device)
            inputs["has_caption"] = has_caption.to(device)
        return inputs


def compute_norm_stats(batches, prepare: Stage1Batches, num_crops: int, accelerator, seed: int) -> tuple[float, float]:
    """Mean and std over all elements of `num_crops` random raw log-mel crops (the original used 5000), summed over
    every process."""
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    crops_seen = 0
    for index, batch in enumerate(batches):
        if batch["waveforms"].shape[0] == 0:
            continue
        generator = step_generator(seed, index, accelerator.process_index, "norm_stats")
        crops = prepare.raw_crops(batch, accelerator.device, generator).double()
        totals += torch.stack([crops.sum(), crops.square().sum(), torch.tensor(crops.numel(), device=crops.device)])
        crops_seen += crops.shape[0]
        if crops_seen * accelerator.num_processes >= num_crops:
            break
    totals = accelerator.reduce(totals, reduction="sum")
    mean = totals[0] / totals[2]
    std = (totals[1] / totals[2] - mean.square()).clamp(min=0).sqrt()
    return float(mean), float(std)


def export_encoder(
    model: M2D2ForPreTraining, feature_extractor, output_dir: Path, accelerator, card: ModelCardInfo
) -> None:
    """Saves the online encoder as an `M2D2AudioModel` folder with its feature extractor and model card."""
    if accelerator.is_main_process:
        model.audio_model.save_pretrained(output_dir)
        feature_extractor.save_pretrained(output_dir)
        write_model_card(output_dir, "M2D2AudioModel", card)
        logger.info(f"exported the encoder to {output_dir}")


def train(args: argparse.Namespace) -> Path:
    """Runs stage 1 and returns the folder of the final encoder export (`<output_dir>/final`)."""
    accelerator = build_accelerator(args)
    make_output_dir(accelerator, args)

    caption_table = CaptionEmbeddingTable.from_path(args.caption_embeddings) if args.caption_embeddings else None
    model = build_model(args, caption_table.embedding_size if caption_table else None)
    if args.model_name_or_path:
        feature_extractor = M2D2FeatureExtractor.from_model_folder(args.model_name_or_path, model.config)
    else:
        feature_extractor = M2D2FeatureExtractor.from_audio_config(model.config)
    sampling_rate = feature_extractor.sampling_rate

    def batch_stream(seed_offset: int) -> BatchStream:
        min_samples = int(args.min_seconds * sampling_rate)
        seed = args.seed + seed_offset
        loader = streamed_loader(args, accelerator, sampling_rate, min_samples=min_samples, seed=seed)
        return BatchStream(loader, accelerator.process_index)

    checkpoint, start_step = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    prepare = Stage1Batches(feature_extractor, args.crop_frames, caption_table, args.seed)
    if args.norm_stats:
        feature_extractor.norm_stats = list(args.norm_stats)
    elif not checkpoint:  # a resumed run gets its statistics back with the checkpoint
        feature_extractor.norm_stats = list(
            compute_norm_stats(iter(batch_stream(1)), prepare, args.norm_stats_crops, accelerator, args.seed)
        )
        logger.info(f"norm_stats from {args.norm_stats_crops} crops: {feature_extractor.norm_stats}")

    lr = scaled_learning_rate(args.base_learning_rate, args.global_batch_size)
    optimizer = torch.optim.AdamW(
        weight_decay_groups(model, args.weight_decay), lr=lr, betas=(args.adam_beta1, args.adam_beta2)
    )
    warmup_steps = round(args.warmup_ratio * args.max_train_steps)
    scheduler = warmup_cosine_schedule(optimizer, warmup_steps, args.max_train_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    stream, state = batch_stream(0), RunState(feature_extractor.norm_stats)
    start_run(accelerator, args, "m2d2_stage1", checkpoint, model, optimizer, scheduler, stream, state)
    unwrapped: M2D2ForPreTraining = accelerator.unwrap_model(model)
    feature_extractor.norm_stats = list(state.norm_stats)

    def after_step(step: int) -> dict:
        decay = unwrapped.ema_decay(step, args.max_train_steps)
        unwrapped.update_target(decay)
        unwrapped.clamp_logit_scale()
        values = {"ema_decay": decay}
        if hasattr(unwrapped, "logit_scale"):
            values["logit_scale"] = unwrapped.logit_scale.item()
        return values

    def make_inputs(batch: dict, step: int, micro: int) -> dict:
        return prepare.inputs(batch, accelerator.device, step, accelerator.process_index, micro)

    def export(folder: Path, step: int) -> None:
        card = training_card_info("examples/pretrain_stage1.py", vars(args), [args.model_name_or_path], step)
        export_encoder(unwrapped, feature_extractor, folder, accelerator, card)

    model.train()
    return run_training(
        accelerator, args, model, optimizer, scheduler, stream, state, start_step, make_inputs,
        ("loss", "m2d_loss", "clap_loss"), after_step, export, "stage 1",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> Path:
    return train(build_parser().parse_args(argv))
