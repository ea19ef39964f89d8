"""The embeddings an index holds, computed with the package's own paths, and the fingerprint of the model.

- a clip embedding per sound: `M2D2ClapModel.get_audio_features` on a batch of short clips (≤ one window), and
  `embed_long_audio` (bounded memory, equal to the whole-clip forward) for longer ones;
- window embeddings over time for sounds longer than one window, as the timeline computes them
  (`m2d2_hf.timeline.window_embeddings`);
- both straight from an audio file read a window at a time (`long_file_embeddings`), for long local files;
- text embeddings with `get_text_features`.

All are L2-normalised, so inner products are cosine similarities.
"""

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AutoProcessor

from ..configuration_m2d2 import M2D2Config
from ..loading import load_m2d2_config, load_pretrained
from ..long_audio import AudioFileSamples, embed_long_audio
from ..modeling_m2d2 import M2D2ClapModel
from ..timeline import window_embeddings


# Config entries that do not change what the model computes.
_UNHASHED_CONFIG_KEYS = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures")


@dataclass(frozen=True)
class ModelFingerprint:
    """Which model made an index: its name (folder or hub id) and hashes of its config and weights."""

    name: str
    config_hash: str
    weights_hash: str

    def to_dict(self) -> dict:
        return {"name": self.name, "config_hash": self.config_hash, "weights_hash": self.weights_hash}


def _hash_config(config_dict: dict) -> str:
    def clean(value):
        if isinstance(value, dict):
            return {key: clean(item) for key, item in value.items() if key not in _UNHASHED_CONFIG_KEYS}
        return value

    text = json.dumps(clean(config_dict), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_fingerprint(model: M2D2ClapModel, name: str) -> ModelFingerprint:
    """The config hash (every config entry that changes the outputs) and a hash of the float32 weights."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return ModelFingerprint(name, _hash_config(model.config.to_dict()), digest.hexdigest()[:16])


def load_clap_model(model_name: str, device: str | torch.device = "cpu") -> tuple[M2D2ClapModel, object]:
    """An M2D2 CLAP model (eval mode, on `device`) and its processor; a clear error for other folders."""
    config = load_m2d2_config(model_name)
    if config.model_type != M2D2Config.model_type:
        raise ValueError(
            f"{model_name} is not an M2D2 CLAP model (model_type {config.model_type!r}): a search index needs "
            f"the audio and text towers of an {M2D2Config.model_type!r} folder"
        )
    model = load_pretrained(M2D2ClapModel, model_name).to(device).eval()
    return model, load_pretrained(AutoProcessor, model_name, "the processor")


def _pad_to_minimum(wave: np.ndarray, minimum: int) -> np.ndarray:
    """Clips shorter than one patch are zero-padded up to it (as the evaluations do) rather than rejected."""
    return np.pad(wave, (0, max(0, minimum - len(wave))))


@torch.inference_mode()
def clip_embeddings(model: M2D2ClapModel, processor, waves: list[np.ndarray], window_samples: int) -> np.ndarray:
    """[len(waves), D] float32 clip embeddings of mono waveforms at the processor's rate: the ones up to
    `window_samples` long in one batch, the longer ones one by one with bounded memory."""
    extractor = processor.feature_extractor
    rate, device = extractor.sampling_rate, next(model.parameters()).device
    out = np.empty((len(waves), model.config.projection_dim), dtype=np.float32)
    short = [i for i, wave in enumerate(waves) if len(wave) <= window_samples]
    if short:
        batch = [_pad_to_minimum(waves[i], extractor.min_samples) for i in short]
        features = extractor(batch, sampling_rate=rate, return_tensors="pt").to(device)
        out[short] = model.get_audio_features(**features).pooler_output.float().cpu().numpy()
    for i, wave in enumerate(waves):
        if len(wave) > window_samples:
            long = embed_long_audio(model, wave, rate, feature_extractor=extractor, return_frame_features=False)
            out[i] = long.audio_embeds[0].float().cpu().numpy()
    return out


def long_file_embeddings(
    model: M2D2ClapModel,
    processor,
    samples: AudioFileSamples,
    window_seconds: float,
    hop_seconds: float,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The clip embedding [D] and the timed window embeddings (as `timed_window_embeddings`) of an audio file read a
    window at a time: neither the waveform nor the encoder's activations of the whole file are held."""
    extractor = processor.feature_extractor
    long = embed_long_audio(model, samples, feature_extractor=extractor, return_frame_features=False)
    starts, ends, windows = timed_window_embeddings(model, processor, samples, window_seconds, hop_seconds, batch_size)
    return long.audio_embeds[0].float().cpu().numpy(), starts, ends, windows


def timed_window_embeddings(
    model: M2D2ClapModel,
    processor,
    wave: np.ndarray | AudioFileSamples,
    window_seconds: float,
    hop_seconds: float,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start seconds, end seconds, float32 embeddings [windows, D]) of the timeline's windows of `wave`."""
    rate = processor.feature_extractor.sampling_rate
    starts, window, embeddings = window_embeddings(model, processor, wave, window_seconds, hop_seconds, batch_size)
    return starts / rate, (starts + window) / rate, embeddings.float().cpu().numpy()


@torch.inference_mode()
def text_embeddings(model: M2D2ClapModel, processor, texts: list[str]) -> np.ndarray:
    device = next(model.parameters()).device
    inputs = processor(text=list(texts), return_tensors="pt").to(device)
    return model.get_text_features(**inputs).pooler_output.float().cpu().numpy()


__all__ = [
    "ModelFingerprint",
    "clip_embeddings",
    "load_clap_model",
    "long_file_embeddings",
    "model_fingerprint",
    "text_embeddings",
    "timed_window_embeddings",
]
