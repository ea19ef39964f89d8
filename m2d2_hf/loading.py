"""Loading an M2D2 model folder (or hub id) for inference: its config, feature extractor or weights, and the device to
run it on, with errors that name the folder or device and the problem instead of a loader's traceback."""

from pathlib import Path
from pickle import UnpicklingError  # the error class only: nothing here unpickles
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoFeatureExtractor, PreTrainedConfig

from .feature_extraction_m2d2 import M2D2FeatureExtractor
from .pipelines import M2D2_MODEL_TYPES


class ModelLoadError(ValueError):
    """A model that cannot be loaded as asked: a folder that is not an M2D2 model, unreadable or truncated files, or
    a device that does not exist here."""


def load_m2d2_config(model: str | Path) -> PreTrainedConfig:
    """The config of an M2D2 folder or hub id; a `ModelLoadError` for anything else."""
    path = Path(model)
    if path.exists() and not (path / "config.json").is_file():
        raise ModelLoadError(f"{model} is not a model folder (no config.json)")
    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load a model config from {model}: {error}") from error
    if config.model_type not in M2D2_MODEL_TYPES:
        raise ModelLoadError(
            f"{model} is not an M2D2 model (model_type {config.model_type!r}, expected one of {M2D2_MODEL_TYPES})"
        )
    return config


def load_pretrained(loader: Any, model: str | Path, what: str = "the model", **kwargs: Any) -> Any:
    """`loader.from_pretrained(model, **kwargs)` with unreadable, truncated or foreign files as a `ModelLoadError`."""
    try:
        return loader.from_pretrained(model, **kwargs)
    except UnpicklingError as error:
        # torch.load(weights_only=True) refused the pickle before running any of it; its message is a page of
        # ways to run it anyway, which is not the advice to give for a file of unknown origin.
        raise ModelLoadError(
            f"cannot load {what} from {model}: its pytorch_model.bin is a pickle holding more than tensors, refused "
            f"unread because loading it could run code; save the weights as model.safetensors from a copy you trust"
        ) from error
    except (OSError, ValueError, SafetensorError) as error:
        raise ModelLoadError(f"cannot load {what} from {model}: {error}") from error


def load_feature_extractor(model: str | Path) -> M2D2FeatureExtractor:
    """Loaded before the model, so that inputs are validated before the slow part."""
    return load_pretrained(AutoFeatureExtractor, model, "the feature extractor")


def pick_device(requested: str | None) -> torch.device:
    """The torch device named by `requested`; default cuda when available, else cpu."""
    try:
        device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        raise ModelLoadError(f"invalid device {requested!r}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device cuda was requested but no CUDA device is available")
    return device


__all__ = ["ModelLoadError", "load_feature_extractor", "load_m2d2_config", "load_pretrained", "pick_device"]
