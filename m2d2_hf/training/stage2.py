"""Stages 2 and 2.1 of the M2D2 recipe: CLAP training of a text tower and a new semantic audio projector against
the FROZEN stage-1.1 audio encoder, with accelerate (spec §7, §11.2).

`examples/pretrain_stage2.py` is the command line. Data path: streamed audio + captions (several per clip, one drawn
per step) → log-mel of whole clips on the device → random 1001-frame crops → normalisation with the encoder's
`norm_stats` → frozen encoder over the visible patches of a structured mask (ratio 0.3 in stage 2, 0 in stage 2.1)
→ projector; captions tokenised on the fly → text tower (CLS) → contrastive loss over the global batch → the
complete `M2D2ClapModel` folder with its processor, ready for `pipeline("zero-shot-audio-classification")`.
"""

import argparse
import logging
import math
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer
from transformers.utils import ModelOutput

from ..configuration_m2d2 import M2D2Config
from ..feature_extraction_m2d2 import M2D2FeatureExtractor
from ..masking import random_structured_mask, random_unstructured_mask
from ..model_card import ModelCardInfo, training_card_info, write_model_card
from ..modeling_m2d2 import M2D2AudioModel, M2D2ClapModel
from ..modeling_m2d2_pretraining import MAX_LOGIT_SCALE, global_clap_loss
from ..processing_m2d2 import M2D2Processor
from .captions import read_captions
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

MASK_TYPES = ("structured", "structured_drop_stripes", "unstructured")


def build_parser() -> argparse.ArgumentParser:
    parser, model = program_parser(
        "Stage-2 / 2.1 M2D2 CLAP training with the audio encoder frozen. Defaults follow the 2025 "
        "paper's stage 2: 10-s crops (1001 frames), structured mask 0.3 (stage 2.1: --mask_ratio 0), BERT-base text "
        "tower (CLS), new semantic projector, logit scale ln 100 clamped to [0, ln 100], global batch 2048, AdamW "
        "(0.9, 0.95) weight decay 0.05, base lr 3e-6 x batch/256, 5 of 30 epochs warm-up then cosine, clip 3.0."
    )
    model.add_argument("--audio_model", default=None, help="M2D2AudioModel folder: the frozen stage-1.1 encoder")
    model.add_argument(
        "--text_model", default="google-bert/bert-base-uncased", help="transformers text model folder or hub id"
    )
    model.add_argument(
        "--model_name_or_path",
        default=None,
        help="continue from an M2D2ClapModel folder (stage 2.1 starts from the stage-2 result): encoder, text tower, "
        "projector and temperature all come from it",
    )
    model.add_argument("--text_pooling", choices=("cls", "mean"), default="cls", help="BERT: CLS (the paper)")
    model.add_argument(
        "--audio_projector_type",
        choices=("semantic", "mlp"),
        default="semantic",
        help="semantic: the 2025 AudioToSemantic projector (output: the encoder's hidden size); mlp: the 2024 "
        "mean-pool MLP, whose output size is --projection_dim",
    )
    model.add_argument(
        "--projection_dim",
        type=int,
        default=None,
        help="mlp projector only: size of the shared space (default: the encoder's hidden size); set it to the text "
        "tower's hidden size to compare audio with the tower's own embeddings, without a text projection",
    )
    model.add_argument(
        "--freeze_text_model",
        action="store_true",
        help="keep the text tower's pretrained weights (train only the audio projector, the text tower's projection "
        "(when it has one) and the temperature): with few captions this keeps the tower's wording generalisation for "
        "zero-shot prompts (the demo recipe uses it)",
    )
    model.add_argument("--caption_column", default="caption", help="column of train_data holding the captions")
    model.add_argument("--caption_separator", default=None, help="split a caption cell into several captions")
    model.add_argument("--captions", default=None, help="captions from a separate CSV/JSONL/folder, keyed by clip id")
    model.add_argument("--crop_frames", type=int, default=1001, help="log-mel frames per crop (10 s)")
    model.add_argument("--mask_ratio", type=float, default=0.3, help="audio patches hidden (stage 2.1: 0)")
    model.add_argument(
        "--mask_type",
        choices=MASK_TYPES,
        default="structured",
        help="structured: frequency/time stripes with the original code's ordering (it keeps the stripes and drops "
        "other patches; the released model was trained so); structured_drop_stripes: drop the stripes; "
        "unstructured: random patches",
    )
    model.add_argument(
        "--mask_padding",
        action="store_true",
        help="hide the zero padding of clips shorter than the crop from attention and from the projector, as "
        "inference never sees it (the original attends to it; harmless for 10-s AudioSet clips, not for short ones)",
    )
    model.add_argument("--base_learning_rate", type=float, default=3e-6, help="lr = base × global batch / 256")
    model.add_argument("--logit_scale_init", type=float, default=math.log(100.0))
    model.add_argument("--export_steps", type=int, default=0, help="also export the model every N steps")
    parser.set_defaults(warmup_ratio=5 / 30, seed=777)
    return parser


class FrozenEncoderClapObjective(nn.Module):
    """The stage-2 objective around an `M2D2ClapModel`: the frozen audio encoder encodes the visible patches of one
    crop without gradients, the projector and text tower are trained with the global contrastive loss."""

    def __init__(self, clap: M2D2ClapModel):
        super().__init__()
        self.clap = clap

    def forward(
        self,
        input_features: torch.Tensor,
        visible_indices: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        has_caption: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        visible_mask: torch.Tensor | None = None,
    ) -> ModelOutput:
        encoder = self.clap.audio_model
        with torch.no_grad():  # frozen: no activations kept for backward
            tokens = encoder.encode_visible(encoder.embeddings(input_features), visible_indices, visible_mask)[:, 1:]
        audio_embeds = self.clap.audio_projection(tokens, visible_mask)
        text_embeds = self.clap.get_text_features(input_ids, attention_mask, token_type_ids).pooler_output
        loss = global_clap_loss(audio_embeds.float(), text_embeds.float(), self.clap.logit_scale, has_caption)
        return ModelOutput(loss=loss, audio_embeds=audio_embeds, text_embeds=text_embeds)


def build_model(args: argparse.Namespace) -> tuple[M2D2ClapModel, object]:
    """The CLAP model (frozen encoder + text tower + new projector, or a whole stage-2 folder) and its tokenizer."""
    if args.model_name_or_path:
        model = M2D2ClapModel.from_pretrained(args.model_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    else:
        if not args.audio_model:
            raise ValueError("stage 2 needs --audio_model (the stage-1.1 encoder) or --model_name_or_path")
        encoder = M2D2AudioModel.from_pretrained(args.audio_model)
        text_config = AutoConfig.from_pretrained(args.text_model)
        hidden = encoder.config.hidden_size
        if args.projection_dim and args.audio_projector_type != "mlp":
            raise ValueError(
                "--projection_dim needs --audio_projector_type mlp (the semantic projector keeps the encoder's "
                "hidden size)"
            )
        projection_dim = args.projection_dim or hidden
        config = M2D2Config(
            audio_config=encoder.config,
            text_config=text_config,
            audio_projector_type=args.audio_projector_type,
            text_pooling=args.text_pooling,
            text_projection=text_config.hidden_size != projection_dim,
            projection_dim=projection_dim,
            projector_intermediate_size=hidden,
            logit_scale_init_value=args.logit_scale_init,
        )
        model = M2D2ClapModel(config)
        model.audio_model.load_state_dict(encoder.state_dict())
        model.text_model = AutoModel.from_pretrained(args.text_model)
        tokenizer = AutoTokenizer.from_pretrained(args.text_model)
    if args.crop_frames > model.config.audio_config.chunk_frames:
        raise ValueError(
            f"--crop_frames {args.crop_frames} exceeds the encoder's chunk ({model.config.audio_config.chunk_frames})"
        )
    model.audio_model.requires_grad_(False)
    if args.freeze_text_model:
        model.text_model.requires_grad_(False)
    # The embedding is pooled from the last hidden state: a BERT pooler gets no gradient (and would stall DDP).
    if getattr(model.text_model, "pooler", None) is not None:
        model.text_model.pooler.requires_grad_(False)
    return model, tokenizer


def crop_padding_mask(
    visible_indices: torch.Tensor, valid_frames: torch.Tensor, columns: int, patch_width: int
) -> torch.Tensor:
    """[B, V] True for the visible patches that hold audio: patch p = f * columns + t is audio when its column t
    starts before the clip's end in the crop (a partly filled last column counts, as at inference, where the last
    patch of a clip is zero-padded). A row whose visible patches are all padding keeps them all, so that every
    clip still gets an embedding (only possible with a mask ratio above 0 and clips under one patch column)."""
    valid_columns = torch.div(valid_frames.clamp(min=1) + patch_width - 1, patch_width, rounding_mode="floor")
    mask = (visible_indices % columns) < valid_columns[:, None]
    return mask | ~mask.any(dim=1, keepdim=True)


class Stage2Batches:
    """Turns collated batches into the objective's inputs: crops, mask, one caption per clip, tokens."""

    def __init__(self, args, feature_extractor, tokenizer, config, captions: dict[str, list[str]] | None):
        self.args, self.feature_extractor, self.tokenizer, self.config = args, feature_extractor, tokenizer, config
        self.captions = captions

    def clip_captions(self, batch: dict) -> list[list[str]]:
        if self.captions is not None:
            return [self.captions.get(clip_id, []) for clip_id in batch["ids"]]
        separator = self.args.caption_separator
        cells = batch[self.args.caption_column]
        return [[] if not cell else (cell.split(separator) if separator else [cell]) for cell in cells]

    def mask(self, batch_size: int, columns: int, device: torch.device, generator: torch.Generator):
        rows, args = self.config.frequency_patches, self.args
        if args.mask_ratio <= 0:
            visible = torch.arange(rows * columns, device=device).expand(batch_size, -1)
            return visible
        if args.mask_type == "unstructured":
            return random_unstructured_mask(batch_size, rows * columns, args.mask_ratio, device, generator)[0]
        original = args.mask_type == "structured"
        return random_structured_mask(batch_size, rows, columns, args.mask_ratio, device, generator, original)[0]

    def inputs(self, batch: dict, device: torch.device, step: int, process: int, micro: int) -> dict:
        seed = self.args.seed
        waves = batch["waveforms"].to(device, non_blocking=True)
        clips = [wave[:length] for wave, length in zip(waves, batch["lengths"].tolist())]
        log_mel, num_frames = self.feature_extractor.batch_log_mel(clips)
        crops, starts = random_log_mel_crops(
            log_mel,
            num_frames,
            self.args.crop_frames,
            step_generator(seed, step, process, f"crop{micro}"),
            return_starts=True,
        )
        columns = self.args.crop_frames // self.config.patch_size[1]
        visible = self.mask(len(clips), columns, device, step_generator(seed, step, process, f"mask{micro}"))
        extra = {}
        if self.args.mask_padding:
            extra["visible_mask"] = crop_padding_mask(
                visible, num_frames.to(device) - starts, columns, self.config.patch_size[1]
            )
        generator = step_generator(seed, step, process, f"caption{micro}")
        texts, has_caption = [], []
        for options in self.clip_captions(batch):
            choice = int(torch.randint(len(options), (1,), generator=generator)) if options else None
            texts.append(options[choice] if options else "")
            has_caption.append(bool(options))
        # The original tokenises without truncation; a text longer than the tower's positions would crash it, so
        # texts are cut at the tokenizer's maximum length instead.
        tokens = self.tokenizer(texts, padding="longest", truncation=True, return_tensors="pt").to(device)
        return {
            "input_features": self.feature_extractor.normalize(crops),
            "visible_indices": visible,
            "has_caption": torch.tensor(has_caption, device=device),
            **tokens,
            **extra,
        }


def export_clap(
    model: M2D2ClapModel, feature_extractor, tokenizer, output_dir: Path, accelerator, card: ModelCardInfo
) -> None:
    """Saves the complete CLAP model with its processor (feature extractor + tokenizer) and model card."""
    if accelerator.is_main_process:
        model.save_pretrained(output_dir)
        M2D2Processor(feature_extractor, tokenizer).save_pretrained(output_dir)
        write_model_card(output_dir, "M2D2ClapModel", card)
        logger.info(f"exported the CLAP model to {output_dir}")


def train(args: argparse.Namespace) -> Path:
    """Runs stage 2 (or 2.1) and returns the folder of the final export (`<output_dir>/final`)."""
    accelerator = build_accelerator(args)
    make_output_dir(accelerator, args)

    clap, tokenizer = build_model(args)
    audio_config = clap.config.audio_config
    captions = None
    if args.captions:
        captions = read_captions(args.captions, caption_column=args.caption_column, separator=args.caption_separator)
    keep = [] if captions is not None else [args.caption_column]
    feature_extractor = M2D2FeatureExtractor.from_model_folder(
        args.model_name_or_path or args.audio_model, audio_config
    )
    loader = streamed_loader(args, accelerator, feature_extractor.sampling_rate, keep_columns=keep)
    prepare = Stage2Batches(args, feature_extractor, tokenizer, audio_config, captions)

    optimizer = torch.optim.AdamW(
        weight_decay_groups(clap, args.weight_decay),
        lr=scaled_learning_rate(args.base_learning_rate, args.global_batch_size),
        betas=(args.adam_beta1, args.adam_beta2),
    )
    warmup_steps = round(args.warmup_ratio * args.max_train_steps)
    scheduler = warmup_cosine_schedule(optimizer, warmup_steps, args.max_train_steps)
    objective, optimizer = accelerator.prepare(FrozenEncoderClapObjective(clap), optimizer)
    stream, state = BatchStream(loader, accelerator.process_index), RunState()
    checkpoint, start_step = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    start_run(accelerator, args, "m2d2_stage2", checkpoint, objective, optimizer, scheduler, stream, state)

    def after_step(step: int) -> dict:
        with torch.no_grad():
            clap.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        return {"logit_scale": clap.logit_scale.item()}

    def make_inputs(batch: dict, step: int, micro: int) -> dict:
        return prepare.inputs(batch, accelerator.device, step, accelerator.process_index, micro)

    objective.train()
    clap.audio_model.eval()  # frozen, and dropout-free anyway; the text tower trains with its dropout as the paper
    if args.freeze_text_model:
        clap.text_model.eval()

    def export(folder: Path, step: int) -> None:
        sources = [args.model_name_or_path, args.audio_model, args.text_model]
        card = training_card_info("examples/pretrain_stage2.py", vars(args), sources, step)
        export_clap(clap, feature_extractor, tokenizer, folder, accelerator, card)

    return run_training(
        accelerator, args, objective, optimizer, scheduler, stream, state, start_step, make_inputs, ("loss",),
        after_step, export, "stage 2",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> Path:
    return train(build_parser().parse_args(argv))
