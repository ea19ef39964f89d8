"""Stages 2 and 2.1 of the M2D2 recipe: CLAP training of a text tower and a new semantic audio projector against
the FROZEN stage-1.1 audio encoder, with accelerate (docs/method.md §6 and §6.2).

The pieces of `examples/pretrain_stage2.py` (the program): its settings, the model it builds, the objective and
the batches. Data path: streamed audio + captions (several per clip, one drawn
per step) → log-mel of whole clips on the device → random 1001-frame crops → normalisation with the encoder's
`norm_stats` → frozen encoder over the visible patches of a structured mask (ratio 0.3 in stage 2, 0 in stage 2.1)
→ projector; captions tokenised on the fly → text tower (CLS) → contrastive loss over the global batch → the
complete `M2D2ClapModel` folder with its processor, ready for `pipeline("zero-shot-audio-classification")`.
"""

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer
from transformers.utils import ModelOutput

from ..configuration_m2d2 import M2D2Config
from ..feature_extraction_m2d2 import M2D2FeatureExtractor
from ..masking import random_structured_mask, random_unstructured_mask
from ..modeling_m2d2 import M2D2AudioModel, M2D2ClapModel
from ..modeling_m2d2_pretraining import global_clap_loss
from .arguments import TrainingSettings, option
from .data import random_log_mel_crops
from .loop import step_generator


logger = logging.getLogger(__name__)

DESCRIPTION = (
    "Stage-2 / 2.1 M2D2 CLAP training with the audio encoder frozen. Defaults follow the 2025 paper's stage 2: "
    "10-s crops (1001 frames), structured mask 0.3 (stage 2.1: --mask_ratio 0), BERT-base text tower (CLS), new "
    "semantic projector, logit scale ln 100 clamped to [0, ln 100], global batch 2048, AdamW (0.9, 0.95) weight "
    "decay 0.05, base lr 3e-6 x batch/256, 5 of 30 epochs warm-up then cosine, clip 3.0."
)
MASK_TYPES = ("structured", "structured_drop_stripes", "unstructured")


@dataclass
class Stage2Settings:
    """The model, objective and caption options of stages 2 and 2.1 (the shared ones: `Stage2TrainingSettings`)."""

    audio_model: str | None = option(None, help="M2D2AudioModel folder: the frozen stage-1.1 encoder")
    text_model: str = option("google-bert/bert-base-uncased", help="transformers text model folder or hub id")
    model_name_or_path: str | None = option(
        None,
        help="continue from an M2D2ClapModel folder (stage 2.1 starts from the stage-2 result): encoder, text tower, "
        "projector and temperature all come from it",
    )
    text_pooling: Literal["cls", "mean"] = option("cls", help="BERT: CLS (the paper)")
    audio_projector_type: Literal["semantic", "mlp"] = option(
        "semantic",
        help="semantic: the 2025 AudioToSemantic projector (output: the encoder's hidden size); mlp: the 2024 "
        "mean-pool MLP, whose output size is --projection_dim",
    )
    projection_dim: int | None = option(
        None,
        help="mlp projector only: size of the shared space (default: the encoder's hidden size); set it to the text "
        "tower's hidden size to compare audio with the tower's own embeddings, without a text projection",
    )
    freeze_text_model: bool = option(
        False,
        help="keep the text tower's pretrained weights (train only the audio projector, the text tower's projection "
        "(when it has one) and the temperature): with few captions this keeps the tower's wording generalisation for "
        "zero-shot prompts (the demo recipe uses it)",
    )
    caption_column: str = option("caption", help="column of train_data holding the captions")
    caption_separator: str | None = option(None, help="split a caption cell into several captions")
    captions: str | None = option(None, help="captions from a separate CSV/JSONL/folder, keyed by clip id")
    crop_frames: int = option(1001, help="log-mel frames per crop (10 s)")
    mask_ratio: float = option(0.3, help="audio patches hidden (stage 2.1: 0)")
    mask_type: Literal[MASK_TYPES] = option(
        "structured",
        help="structured: frequency/time stripes with the original code's ordering (it keeps the stripes and drops "
        "other patches; the released model was trained so); structured_drop_stripes: drop the stripes; "
        "unstructured: random patches",
    )
    mask_padding: bool = option(
        False,
        help="hide the zero padding of clips shorter than the crop from attention and from the projector, as "
        "inference never sees it (the original attends to it; harmless for 10-s AudioSet clips, not for short ones)",
    )
    base_learning_rate: float = option(3e-6, help="lr = base × global batch / 256")
    logit_scale_init: float = option(math.log(100.0), help="initial logit scale of a new model (ln 100)")


@dataclass
class Stage2TrainingSettings(TrainingSettings):
    """The shared options with stage 2's defaults: 5 of 30 epochs warm-up, seed 777."""

    warmup_ratio: float = option(5 / 30, help="fraction of the steps for linear warm-up (stage 2: 5 of 30 epochs)")
    seed: int = option(777, help="run seed (paper's stage 2: 777)")


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


def build_model(settings: Stage2Settings) -> tuple[M2D2ClapModel, object]:
    """The CLAP model (frozen encoder + text tower + new projector, or a whole stage-2 folder) and its tokenizer."""
    if settings.model_name_or_path:
        model = M2D2ClapModel.from_pretrained(settings.model_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(settings.model_name_or_path)
    else:
        if not settings.audio_model:
            raise ValueError("stage 2 needs --audio_model (the stage-1.1 encoder) or --model_name_or_path")
        encoder = M2D2AudioModel.from_pretrained(settings.audio_model)
        text_config = AutoConfig.from_pretrained(settings.text_model)
        hidden = encoder.config.hidden_size
        if settings.projection_dim and settings.audio_projector_type != "mlp":
            raise ValueError(
                "--projection_dim needs --audio_projector_type mlp (the semantic projector keeps the encoder's "
                "hidden size)"
            )
        projection_dim = settings.projection_dim or hidden
        config = M2D2Config(
            audio_config=encoder.config,
            text_config=text_config,
            audio_projector_type=settings.audio_projector_type,
            text_pooling=settings.text_pooling,
            text_projection=text_config.hidden_size != projection_dim,
            projection_dim=projection_dim,
            projector_intermediate_size=hidden,
            logit_scale_init_value=settings.logit_scale_init,
        )
        model = M2D2ClapModel(config)
        model.audio_model.load_state_dict(encoder.state_dict())
        model.text_model = AutoModel.from_pretrained(settings.text_model)
        tokenizer = AutoTokenizer.from_pretrained(settings.text_model)
    if settings.crop_frames > model.config.audio_config.chunk_frames:
        raise ValueError(
            f"--crop_frames {settings.crop_frames} exceeds the encoder's chunk "
            f"({model.config.audio_config.chunk_frames})"
        )
    model.audio_model.requires_grad_(False)
    if settings.freeze_text_model:
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

    def __init__(
        self,
        settings: Stage2Settings,
        seed: int,
        feature_extractor: M2D2FeatureExtractor,
        tokenizer,
        config,
        captions: dict[str, list[str]] | None,
    ):
        self.settings, self.seed, self.feature_extractor = settings, seed, feature_extractor
        self.tokenizer, self.config, self.captions = tokenizer, config, captions

    def clip_captions(self, batch: dict) -> list[list[str]]:
        if self.captions is not None:
            return [self.captions.get(clip_id, []) for clip_id in batch["ids"]]
        separator = self.settings.caption_separator
        cells = batch[self.settings.caption_column]
        return [[] if not cell else (cell.split(separator) if separator else [cell]) for cell in cells]

    def mask(self, batch_size: int, columns: int, device: torch.device, generator: torch.Generator):
        rows, settings = self.config.frequency_patches, self.settings
        if settings.mask_ratio <= 0:
            visible = torch.arange(rows * columns, device=device).expand(batch_size, -1)
            return visible
        if settings.mask_type == "unstructured":
            return random_unstructured_mask(batch_size, rows * columns, settings.mask_ratio, device, generator)[0]
        original = settings.mask_type == "structured"
        return random_structured_mask(batch_size, rows, columns, settings.mask_ratio, device, generator, original)[0]

    def inputs(self, batch: dict, device: torch.device, step: int, process: int, micro: int) -> dict:
        seed, settings = self.seed, self.settings
        waves = batch["waveforms"].to(device, non_blocking=True)
        clips = [wave[:length] for wave, length in zip(waves, batch["lengths"].tolist())]
        log_mel, num_frames = self.feature_extractor.batch_log_mel(clips)
        crops, starts = random_log_mel_crops(
            log_mel,
            num_frames,
            settings.crop_frames,
            step_generator(seed, step, process, f"crop{micro}"),
            return_starts=True,
        )
        columns = settings.crop_frames // self.config.patch_size[1]
        visible = self.mask(len(clips), columns, device, step_generator(seed, step, process, f"mask{micro}"))
        extra = {}
        if settings.mask_padding:
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
