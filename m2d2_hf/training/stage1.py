"""Stage 1 of the M2D2 recipe: M2D + CLAP pre-training against cached caption embeddings, with accelerate.

The pieces of `examples/pretrain_stage1.py` (the program: parse → build → prepare → loop → export): its settings,
the model it builds, the batches it makes and the `norm_stats` pass. Data path:
streamed audio (decoded and resampled in DataLoader workers, broken items skipped and counted) → log-mel of whole
clips on the training device → random 608-frame crops (zero-padded in raw log-mel space) → normalisation with the
run's `norm_stats` → `M2D2ForPreTraining` → clipped AdamW, warm-up + cosine schedule, EMA target update,
temperature clamp → step checkpoints and `M2D2AudioModel` exports.
"""

import logging
import math
from dataclasses import dataclass

import torch
from transformers import AutoConfig

from ..configuration_m2d2 import M2D2AudioConfig, M2D2PreTrainingConfig
from ..modeling_m2d2_pretraining import M2D2ForPreTraining
from .arguments import option
from .captions import CaptionEmbeddingTable, draw_captions
from .data import random_log_mel_crops
from .loop import step_generator


logger = logging.getLogger(__name__)

DESCRIPTION = (
    "Stage-1 M2D2 pre-training (M2D + CLAP against cached caption embeddings). Defaults follow the 2025 paper: "
    "608-frame crops, 16x16 patches, mask ratio 0.7, global batch 2048, AdamW (0.9, 0.95), weight decay 0.05, "
    "base lr 3e-4 x batch/256, 20 of 300 epochs warm-up then cosine, clip 3.0, EMA 0.99995→0.99999, loss "
    "1.0·M2D + 0.01·CLAP, seed 7."
)


@dataclass
class Stage1Settings:
    """The model, objective and data options of stage 1 (the shared ones: `arguments.TrainingSettings`, whose
    defaults are stage 1's)."""

    model_name_or_path: str | None = option(
        None,
        help="continue from an M2D2ForPreTraining folder (e.g. a converted original pre-training checkpoint) or "
        "start the encoder from an M2D2AudioModel folder; a new ViT-B otherwise",
    )
    config_overrides: str = option("", help="for a new model, e.g. 'hidden_size=192,num_hidden_layers=4'")
    caption_embeddings: str | None = option(None, help="folder written by cache_caption_embeddings.py")
    allow_uncaptioned: bool = option(
        False,
        help="go on when no clip of the first step has a caption embedding (the CLAP term is then 0): without it, "
        "the run stops, as caption ids that match no clip id train M2D alone",
    )
    crop_frames: int = option(608, help="log-mel frames per training crop (6.08 s)")
    mask_ratio: float = option(0.7, help="fraction of patches hidden from the encoder")
    m2d_loss_weight: float = option(1.0, help="weight of the M2D loss")
    clap_loss_weight: float = option(0.01, help="weight of the CLAP loss")
    base_learning_rate: float = option(3e-4, help="lr = base × global batch / 256")
    min_seconds: float = option(6.1, help="clips are zero-padded to this length first")
    norm_stats: list[float] | None = option(None, help="log-mel statistics", metavar="MEAN STD")
    norm_stats_crops: int = option(5000, help="random crops for the statistics")

    def __post_init__(self):
        if self.norm_stats is not None and len(self.norm_stats) != 2:
            raise ValueError(f"--norm_stats takes two values, MEAN and STD, got {self.norm_stats}")
        if self.norm_stats is not None and not (
            math.isfinite(self.norm_stats[0]) and 0 < self.norm_stats[1] < math.inf
        ):
            raise ValueError(f"--norm_stats MEAN STD must be finite with STD > 0, got {self.norm_stats}")


def new_model_config(settings: Stage1Settings, caption_size: int | None) -> M2D2PreTrainingConfig:
    """The config of a new model: ViT-B with the run's crop length, `--config_overrides` applied."""
    config = M2D2PreTrainingConfig(chunk_frames=settings.crop_frames, caption_embedding_size=caption_size)
    if settings.config_overrides:
        config.update_from_string(settings.config_overrides)
    return config


def build_model(settings: Stage1Settings, caption_size: int | None) -> M2D2ForPreTraining:
    """A new model from the config options, or one loaded from `--model_name_or_path`."""
    if settings.model_name_or_path:
        config = AutoConfig.from_pretrained(settings.model_name_or_path)
        if not isinstance(config, M2D2AudioConfig):
            raise ValueError(f"{settings.model_name_or_path} is not an M2D2 audio or pre-training folder")
        config = M2D2PreTrainingConfig.from_pretrained(settings.model_name_or_path)
        if config.caption_embedding_size != caption_size:
            config.caption_embedding_size = caption_size
            logger.warning(f"caption embedding size set to {caption_size}: the CLAP head is re-initialised")
        # An encoder-only folder fills the online encoder; the target starts as its copy, the predictor new.
        model = M2D2ForPreTraining.from_pretrained(settings.model_name_or_path, config=config)
    else:
        model = M2D2ForPreTraining(new_model_config(settings, caption_size))
    if model.config.chunk_frames < settings.crop_frames:
        raise ValueError(
            f"--crop_frames {settings.crop_frames} exceeds the model's positional grid "
            f"({model.config.chunk_frames} frames)"
        )
    model.config.mask_ratio = settings.mask_ratio
    model.config.m2d_loss_weight = settings.m2d_loss_weight
    model.config.clap_loss_weight = settings.clap_loss_weight
    return model


def training_attention(device: torch.device, mixed_precision: str) -> str:
    """The attention kernel for a stage-1 step on `device` under accelerate's `mixed_precision`: eager for bf16
    autocast on the CPU, SDPA otherwise.

    On the CPU, SDPA's flash-attention backward was the largest part of a bf16 autocast step (25 % of it, ViT-B at
    batch 8 on the 2-core Xeon with AMX of `benchmarks/README.md`), while eager attention's backward is batched
    matmuls on the bf16 matrix units: the step ran 1.27x faster with it (1.11 vs 1.42 s, interleaved). In fp32 SDPA
    stays faster (2.67 vs 2.97 s), and on GPUs SDPA's fused kernels are the fast path.
    """
    return "eager" if device.type == "cpu" and mixed_precision == "bf16" else "sdpa"


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
    every process. The stream skips (and its collator names) the items a training step would skip, too loud ones
    included; statistics that still come out non-finite stop the run."""
    totals = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # sum, sum of squares, elements, skipped
    crops_seen = 0
    for index, batch in enumerate(batches):
        totals[3] += batch["num_skipped"]
        if batch["waveforms"].shape[0] == 0:
            continue
        generator = step_generator(seed, index, accelerator.process_index, "norm_stats")
        crops = prepare.raw_crops(batch, accelerator.device, generator).double()
        totals[:3] += torch.stack(
            [crops.sum(), crops.square().sum(), torch.tensor(crops.numel(), device=crops.device)]
        )
        crops_seen += crops.shape[0]
        if crops_seen * accelerator.num_processes >= num_crops:
            break
    totals = accelerator.reduce(totals, reduction="sum")
    mean = totals[0] / totals[2]
    std = (totals[1] / totals[2] - mean.square()).clamp(min=0).sqrt()
    if skipped := int(totals[3]):
        logger.info(f"the norm_stats pass skipped {skipped} item{'s' if skipped > 1 else ''} (named above)")
    if not (math.isfinite(float(mean)) and math.isfinite(float(std)) and float(std) > 0):
        raise ValueError(
            f"the norm_stats of {num_crops} crops are [{float(mean)}, {float(std)}], not finite with std > 0: check "
            "the audio of --train_data (silent or broken crops), or pass --norm_stats MEAN STD"
        )
    return float(mean), float(std)
