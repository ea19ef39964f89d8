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


# Fields that configs written before the feature extractor owned the front end, and before the pre-training fields
# had a config of their own, carried in every encoder config. Loading such a config keeps them aside (not saved
# again): the front end ones build the feature extractor of an old folder saved without one
# ([`M2D2FeatureExtractor.from_audio_config`]), the pre-training ones an [`M2D2PreTrainingConfig`].
FRONT_END_FIELDS = ("sampling_rate", "n_fft", "hop_length", "f_min", "f_max", "norm_stats")
PRETRAINING_FIELDS = (
    "predictor_hidden_size",
    "predictor_num_hidden_layers",
    "predictor_num_attention_heads",
    "predictor_intermediate_size",
    "mask_ratio",
    "caption_embedding_size",
    "audio_projector_type",
    "projector_num_layers",
    "projector_num_attention_heads",
    "projector_intermediate_size",
    "projector_layer_norm_eps",
    "m2d_loss_weight",
    "clap_loss_weight",
    "ema_decay_start",
    "ema_decay_end",
    "logit_scale_init_value",
)
_LEGACY_FIELDS = "_legacy_fields"


class M2D2AudioConfig(_SavesWithoutChangingItself, PreTrainedConfig):
    r"""
    Configuration of [`M2D2AudioModel`]: the patch grid, the chunking of long inputs and the ViT encoder. The defaults
    describe the released M2D-CLAP 2025 encoder (`m2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025`). The log-mel front
    end (rate, STFT, mel bank, `norm_stats`) belongs to [`M2D2FeatureExtractor`], the pre-training parts to
    [`M2D2PreTrainingConfig`].

    Args:
        num_mel_bins (`int`, defaults to 80): mel bands of the input (the rows of the patch grid times the patch
            height); the feature extractor's `feature_size`.
        chunk_frames (`int`, defaults to 1001): frames per independently encoded chunk of a long input; also the
            length of the positional grid (1001 for the 2025 model, 608 for 608-frame checkpoints).
        patch_size (`list[int]`, defaults to `[16, 16]`): patch height (frequency) and width (time).
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: ViT geometry (ViT-Base).
        hidden_act (`str`, defaults to `"gelu"`): exact (erf) GELU, as timm's Mlp.
        layer_norm_eps (`float`, defaults to 1e-6): eps of every encoder LayerNorm.
        qkv_bias (`bool`, defaults to `True`): bias of the fused query/key/value projection.
        initializer_range (`float`, defaults to 0.02): std of the token initialisations.
    """

    model_type = "m2d2_audio"
    base_config_key = "audio_config"

    num_mel_bins: int = 80
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

    def __post_init__(self, **kwargs):
        legacy = {name: kwargs.pop(name) for name in (*FRONT_END_FIELDS, *PRETRAINING_FIELDS) if name in kwargs}
        super().__post_init__(**kwargs)
        self.__dict__[_LEGACY_FIELDS] = legacy
        self.patch_size = [int(v) for v in self.patch_size]
        if "norm_stats" in legacy:
            legacy["norm_stats"] = [float(v) for v in legacy["norm_stats"]]
            if len(legacy["norm_stats"]) != 2 or legacy["norm_stats"][1] <= 0:
                raise ValueError(f"norm_stats must be [mean, std] with std > 0, got {legacy['norm_stats']}")
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

    @classmethod
    def get_config_dict(cls, *args, **kwargs) -> tuple[dict, dict]:
        """The saved dict. An encoder and a pre-training folder load into either config without a model-type
        warning: `M2D2PreTrainingConfig` reads an encoder folder (or a pre-training folder written before it
        existed) with the pre-training fields it carries or their defaults."""
        config_dict, kwargs = super().get_config_dict(*args, **kwargs)
        if config_dict.get("model_type") in ("m2d2_audio", "m2d2_pretraining"):
            config_dict = {**config_dict, "model_type": cls.model_type}
        return config_dict, kwargs

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> PreTrainedConfig:
        """The config of a saved folder, as the class asked for: `M2D2AudioConfig` of a pre-training folder is its
        encoder's (as `M2D2AudioModel.from_pretrained` loads its online encoder)."""
        loaded = super().from_pretrained(*args, **kwargs)
        config, unused = loaded if isinstance(loaded, tuple) else (loaded, None)
        if cls is M2D2AudioConfig and isinstance(config, M2D2PreTrainingConfig):
            config = config.encoder_config()
        return config if unused is None else (config, unused)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> PreTrainedConfig:
        """A config dict; a pre-training folder written before [`M2D2PreTrainingConfig`] existed (model type
        `m2d2_audio`, architecture `M2D2ForPreTraining`) gives an `M2D2PreTrainingConfig`."""
        if cls is M2D2AudioConfig and "M2D2ForPreTraining" in (config_dict.get("architectures") or ()):
            return M2D2PreTrainingConfig.from_dict(config_dict, **kwargs)
        return super().from_dict(config_dict, **kwargs)

    def to_dict(self) -> dict:
        output = super().to_dict()
        output.pop(_LEGACY_FIELDS, None)
        return output

    @property
    def legacy_front_end(self) -> dict:
        """The front-end fields (`sampling_rate`, `n_fft`, `hop_length`, `f_min`, `f_max`, `norm_stats`) of a config
        written by a version that kept them there; empty for configs of this version."""
        return {k: v for k, v in self.__dict__.get(_LEGACY_FIELDS, {}).items() if k in FRONT_END_FIELDS}

    def encoder_config(self) -> "M2D2AudioConfig":
        """This config's encoder fields as an `M2D2AudioConfig` (what an encoder folder saves)."""
        values = self.to_dict()
        for name in (*PRETRAINING_FIELDS, "model_type", "transformers_version"):
            values.pop(name, None)
        config = M2D2AudioConfig(**values)
        config.__dict__[_LEGACY_FIELDS] = dict(self.legacy_front_end)
        return config

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


class M2D2PreTrainingConfig(M2D2AudioConfig):
    r"""
    Configuration of [`M2D2ForPreTraining`] (stage 1): the encoder of [`M2D2AudioConfig`] (all its arguments), plus
    the M2D predictor, the masking, the stage-1 CLAP head, the EMA target and the loss weights. The online encoder
    exports as an [`M2D2AudioModel`] folder with the encoder fields only.

    Args:
        predictor_hidden_size, predictor_num_hidden_layers, predictor_num_attention_heads,
        predictor_intermediate_size (512, 8, 16, 2048): the M2D predictor.
        mask_ratio (`float`, defaults to 0.7): fraction of patches masked.
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

    model_type = "m2d2_pretraining"
    base_config_key = None

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
        if self.audio_projector_type not in ("semantic", "mlp"):
            raise ValueError(f"audio_projector_type must be 'semantic' or 'mlp', got {self.audio_projector_type!r}")

    @classmethod
    def from_audio_config(cls, config: M2D2AudioConfig) -> "M2D2PreTrainingConfig":
        """The pre-training config of an encoder config: its encoder fields, and the pre-training fields it was
        given as an older version's `M2D2AudioConfig` (the defaults for the others)."""
        if isinstance(config, cls):
            return config
        values = config.to_dict()
        for name in ("model_type", "transformers_version"):
            values.pop(name, None)
        legacy = config.__dict__.get(_LEGACY_FIELDS, {})
        # The attention implementation is set on a config in memory, not saved with it.
        return cls(**values, **legacy, attn_implementation=config._attn_implementation_internal)


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
        zero_shot_template (`str`, defaults to `"{} can be heard"`): the prompt a class name is put into for
            zero-shot classification (the original evaluation's); `pipeline("zero-shot-audio-classification")` uses
            it when no `hypothesis_template` is passed.
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
    zero_shot_template: str = "{} can be heard"
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if not isinstance(self.zero_shot_template, str) or self.zero_shot_template.count("{}") != 1:
            raise ValueError(
                f"zero_shot_template must hold one {{}} where the class name goes, got {self.zero_shot_template!r}"
            )
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


__all__ = ["M2D2AudioConfig", "M2D2Config", "M2D2PreTrainingConfig"]
