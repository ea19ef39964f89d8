"""Configurations of the M2D2 audio encoder and of the M2D2 (M2D-CLAP 2025) audio-language model."""

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec


@contextmanager
def auto_map_kept_on_disk_only(saved: object) -> Iterator[None]:
    """`save_pretrained` writes an `auto_map` (for trust_remote_code loading) and, in transformers, also sets it on
    the object being saved (config, feature extractor or processor); this restores the in-memory object, so that
    saving does not change its `to_dict()`."""
    missing = object()
    before = saved.__dict__.get("auto_map", missing)
    try:
        yield
    finally:
        if before is missing:
            saved.__dict__.pop("auto_map", None)
        else:
            saved.auto_map = before


# The modules a saved folder's `auto_map` names for this package's classes (written beside the weights).
_OWN_MODULES = ("configuration_m2d2.", "modeling_m2d2.", "feature_extraction_m2d2.", "processing_m2d2.")


def is_installed_package_object(obj: object) -> bool:
    """True for an object of the installed `m2d2_hf` package's classes; False for the copies of its modules that a
    saved folder carries and `trust_remote_code` loading imports (those need the folder's `auto_map`)."""
    return type(obj).__module__.startswith("m2d2_hf.")


def is_own_auto_map(auto_map: object) -> bool:
    """True for an `auto_map` that only names this package's classes, as `save_pretrained` writes it."""
    if not isinstance(auto_map, dict) or not auto_map:
        return False
    targets = [t for value in auto_map.values() for t in (value if isinstance(value, (list, tuple)) else [value])]
    return all(isinstance(t, str) and t.split("--")[-1].startswith(_OWN_MODULES) for t in targets if t is not None)


class _SavesWithoutChangingItself:
    """Saving leaves the config as it was, and loading a saved folder gives the config that was saved: with the
    package installed, its own `auto_map` lives on disk only (`save_pretrained` writes it again), so `to_dict()`
    round-trips. Loaded as the folder's remote code, the config keeps it: the Auto classes find the model by it."""

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if is_installed_package_object(self) and is_own_auto_map(self.__dict__.get("auto_map")):
            del self.__dict__["auto_map"]

    def save_pretrained(self, *args, **kwargs):
        with auto_map_kept_on_disk_only(self):
            return super().save_pretrained(*args, **kwargs)


# Dataset statistics the original loaders fall back to for weights saved without `norm_stats` (2022 releases).
DEFAULT_NORM_STATS = (-7.1, 4.2)


class M2D2AudioConfig(_SavesWithoutChangingItself, PreTrainedConfig):
    r"""
    Configuration of [`M2D2AudioModel`]: the log-mel front end, the chunking of long inputs and the ViT encoder.
    The defaults describe the released M2D-CLAP 2025 encoder (`m2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025`).

    Args:
        sampling_rate (`int`, defaults to 16000): rate the front end works at; other rates are resampled to it.
        n_fft (`int`, defaults to 400): STFT size and window length (25 ms).
        hop_length (`int`, defaults to 160): STFT hop (10 ms).
        num_mel_bins (`int`, defaults to 80): Slaney-scale mel bands.
        f_min, f_max (`float`, defaults to 50 and 8000): mel filter bank edges in Hz.
        norm_stats (`list[float]`, defaults to `[-7.1, 4.2]`): dataset mean and std of the log-mel, used to
            normalise it; converted checkpoints carry their own (the 2025 release: `[-7.2618, 4.3512]`).
        chunk_frames (`int`, defaults to 1001): frames per independently encoded chunk of a long input; also the
            length of the positional grid (1001 for the 2025 model, 608 for 608-frame checkpoints).
        patch_size (`list[int]`, defaults to `[16, 16]`): patch height (frequency) and width (time).
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: ViT geometry (ViT-Base).
        hidden_act (`str`, defaults to `"gelu"`): exact (erf) GELU, as timm's Mlp.
        layer_norm_eps (`float`, defaults to 1e-6): eps of every encoder LayerNorm.
        qkv_bias (`bool`, defaults to `True`): bias of the fused query/key/value projection.
        initializer_range (`float`, defaults to 0.02): std of the token initialisations.
        predictor_hidden_size, predictor_num_hidden_layers, predictor_num_attention_heads,
        predictor_intermediate_size (512, 8, 16, 2048): the M2D predictor, used in pre-training only.
        mask_ratio (`float`, defaults to 0.7): fraction of patches masked in M2D pre-training.
        caption_embedding_size (`int`, *optional*): width of the cached caption embeddings of stage-1 CLAP
            pre-training (4096 for NV-Embed-v2); `None` pre-trains plain M2D without the CLAP head.
        audio_projector_type (`"semantic"` or `"mlp"`): the stage-1 audio projector (2025: semantic; 2024: MLP).
        projector_num_layers, projector_num_attention_heads, projector_intermediate_size, projector_layer_norm_eps:
            the stage-1 semantic audio projector (1 block, 1 head, MLP 768, LayerNorm eps 1e-5).
        m2d_loss_weight, clap_loss_weight (`float`, defaults to 1.0 and 0.01): weights of the two stage-1 losses.
        ema_decay_start, ema_decay_end (`float`, defaults to 0.99995 and 0.99999): the EMA target's τ, linear over
            the optimiser steps.
        logit_scale_init_value (`float`, defaults to ln(1/0.07)): initial log temperature of the stage-1 CLAP loss.
    """

    model_type = "m2d2_audio"
    base_config_key = "audio_config"

    sampling_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160
    num_mel_bins: int = 80
    f_min: float = 50.0
    f_max: float = 8000.0
    norm_stats: list[float] | tuple[float, float] = DEFAULT_NORM_STATS
    chunk_frames: int = 1001
    patch_size: list[int] | tuple[int, int] = (16, 16)
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    initializer_range: float = 0.02
    predictor_hidden_size: int = 512
    predictor_num_hidden_layers: int = 8
    predictor_num_attention_heads: int = 16
    predictor_intermediate_size: int = 2048
    mask_ratio: float = 0.7
    caption_embedding_size: int | None = None
    audio_projector_type: Literal["semantic", "mlp"] = "semantic"
    projector_num_layers: int = 1
    projector_num_attention_heads: int = 1
    projector_intermediate_size: int = 768
    projector_layer_norm_eps: float = 1e-5
    m2d_loss_weight: float = 1.0
    clap_loss_weight: float = 0.01
    ema_decay_start: float = 0.99995
    ema_decay_end: float = 0.99999
    logit_scale_init_value: float = math.log(1 / 0.07)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.norm_stats = [float(v) for v in self.norm_stats]
        self.patch_size = [int(v) for v in self.patch_size]
        if len(self.norm_stats) != 2 or self.norm_stats[1] <= 0:
            raise ValueError(f"norm_stats must be [mean, std] with std > 0, got {self.norm_stats}")
        if len(self.patch_size) != 2:
            raise ValueError(f"patch_size must be [frequency, time], got {self.patch_size}")
        if self.num_mel_bins % self.patch_size[0]:
            raise ValueError(
                f"num_mel_bins ({self.num_mel_bins}) must be a multiple of the patch height ({self.patch_size[0]})"
            )
        if self.chunk_frames < self.patch_size[1]:
            raise ValueError(f"chunk_frames ({self.chunk_frames}) is shorter than one patch ({self.patch_size[1]})")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )

    @property
    def frequency_patches(self) -> int:
        """Rows of the patch grid (5 for 80 mel bins and 16-bin patches)."""
        return self.num_mel_bins // self.patch_size[0]

    @property
    def time_patches(self) -> int:
        """Columns of the patch grid of one full chunk (62 for 1001 frames, 38 for 608)."""
        return self.chunk_frames // self.patch_size[1]

    @property
    def frame_feature_size(self) -> int:
        """Size of one frame feature: the tokens of all frequency rows of a column, concatenated (5 x 768)."""
        return self.frequency_patches * self.hidden_size


class M2D2Config(_SavesWithoutChangingItself, PreTrainedConfig):
    r"""
    Configuration of [`M2D2ClapModel`]: an [`M2D2AudioConfig`] audio tower, any transformers text tower, and the
    parts that map both into the shared embedding space.

    Args:
        audio_config (`dict` or [`M2D2AudioConfig`]): the audio encoder.
        text_config (`dict` or `PreTrainedConfig`): any transformers text model config; defaults to a
            bert-base-uncased shaped `BertConfig` (the 2025 model's text tower).
        audio_projector_type (`"semantic"` or `"mlp"`): `semantic` is the 2025 AudioToSemantic block (a learned
            token attending over all patch tokens); `mlp` is the 2024 two-layer ReLU MLP over the token mean.
        projector_num_layers, projector_num_attention_heads, projector_intermediate_size,
        projector_layer_norm_eps: geometry of the semantic projector (1 block, 1 head, MLP 768, LayerNorm eps 1e-5).
        text_pooling (`"cls"` or `"mean"`): CLS token of the last hidden state (BERT, 2025) or mean over the
            attention mask (GTE, 2024).
        text_projection (`bool`): a Linear from the text hidden size to `projection_dim`; without it the pooled
            text output is the embedding and must already be `projection_dim` wide.
        projection_dim (`int`, defaults to 768): size of the shared embedding space.
        logit_scale_init_value (`float`, defaults to ln 100): initial log temperature (stage 2 initialises ln 100).
    """

    model_type = "m2d2"
    sub_configs_defaults = {
        "audio_config": SubConfigSpec(config_class=M2D2AudioConfig),
        "text_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="bert",
            init_kwargs={
                "vocab_size": 30522,
                "hidden_size": 768,
                "num_hidden_layers": 12,
                "num_attention_heads": 12,
                "intermediate_size": 3072,
                "max_position_embeddings": 512,
                "type_vocab_size": 2,
                "layer_norm_eps": 1e-12,
                "pad_token_id": 0,
            },
        ),
    }

    audio_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    audio_projector_type: Literal["semantic", "mlp"] = "semantic"
    projector_num_layers: int = 1
    projector_num_attention_heads: int = 1
    projector_intermediate_size: int = 768
    projector_layer_norm_eps: float = 1e-5
    text_pooling: Literal["cls", "mean"] = "cls"
    text_projection: bool = False
    projection_dim: int = 768
    logit_scale_init_value: float = math.log(100.0)
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.audio_projector_type not in ("semantic", "mlp"):
            raise ValueError(f"audio_projector_type must be 'semantic' or 'mlp', got {self.audio_projector_type!r}")
        if self.text_pooling not in ("cls", "mean"):
            raise ValueError(f"text_pooling must be 'cls' or 'mean', got {self.text_pooling!r}")
        if self.audio_projector_type == "semantic" and self.audio_config.hidden_size != self.projection_dim:
            raise ValueError(
                f"the semantic audio projector keeps the encoder width: projection_dim ({self.projection_dim}) must "
                f"equal audio_config.hidden_size ({self.audio_config.hidden_size}); the 'mlp' projector maps to "
                "any projection_dim"
            )
        if not self.text_projection and self.text_config.hidden_size != self.projection_dim:
            raise ValueError(
                f"text hidden size {self.text_config.hidden_size} differs from projection_dim {self.projection_dim}: "
                "set text_projection=True to learn a Linear between them"
            )


__all__ = ["M2D2AudioConfig", "M2D2Config"]
