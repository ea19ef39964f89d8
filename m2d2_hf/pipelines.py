"""transformers' audio pipelines for M2D2 models: batching over any clip lengths, audio dicts, checked labels.

Importing `m2d2_hf` makes `pipeline("zero-shot-audio-classification", ...)` and `pipeline("audio-classification", ...)`
build the classes below (unless something other than transformers' own class is registered for the task). For
models other than M2D2 they are transformers' pipelines unchanged.

Batching: the pipelines' collation (`transformers.pipelines.base.pad_collate_fn`) pads every 3-D input along axis 1,
the time axis of time-major features ([batch, frames, bins], as AST or Speech2Text emit). M2D2 features are
[batch, mel bins, frames], so `batch_size > 1` over clips of different lengths would fail inside the collation. For
M2D2 models these classes hand the collation time-major features and give the model its own layout back. Padded
frames carry the feature extractor's `padding_value` and a 0 in `input_features_mask`, so every clip gets the scores
of a call on its own.

Zero-shot input: for M2D2 CLAP models `{"raw" | "array": waveform, "sampling_rate": rate}` dicts are taken (as the
audio-classification pipeline and `datasets` Audio columns give them; other rates are resampled), one string is one
label, and labels or templates that would give a silent wrong answer are rejected. File paths, URLs and encoded bytes
are decoded by the package's decoder (`data.audio.decode_audio`, as the CLI does), so a damaged file raises
`AudioDecodeError` instead of being classified on the part before the damage.
"""

from typing import Any

import httpx
import numpy as np
import torchaudio
from transformers import AudioClassificationPipeline, ZeroShotAudioClassificationPipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_m2d2 import M2D2AudioConfig, M2D2Config
from .data.audio import decode_audio
from .data.labels import check_unique_labels


M2D2_MODEL_TYPES = (M2D2Config.model_type, M2D2AudioConfig.model_type)
# ZeroShotAudioClassificationPipeline's own default prompt, kept for models other than M2D2.
TRANSFORMERS_DEFAULT_TEMPLATE = "This is a sound of {}."


def check_hypothesis_template(template: str) -> None:
    """Raises `ValueError` unless `template` is a format string whose one `{}` places the label."""
    try:
        prompts = template.format("a"), template.format("b")
    except (AttributeError, IndexError, KeyError, ValueError) as error:
        raise ValueError(
            f"hypothesis_template {template!r} is not a format string with one {{}} for the label ({error!r})"
        ) from error
    if prompts[0] == prompts[1]:
        raise ValueError(
            f"hypothesis_template {template!r} has no {{}} for the label: every label would get the same prompt and "
            f"the same score. Put {{}} where the label goes, e.g. '{{}} can be heard'."
        )


def check_candidate_labels(candidate_labels: Any) -> list[str]:
    """The labels as a list: one string is one label; no labels at all, or a label given twice, is an error."""
    if isinstance(candidate_labels, str):
        return [candidate_labels]
    labels = list(candidate_labels) if candidate_labels is not None else []
    if not labels:
        raise ValueError("candidate_labels is empty: pass at least one label, e.g. candidate_labels=['dog', 'rain']")
    check_unique_labels(labels)
    return labels


def decode_encoded(audio: Any, sampling_rate: int) -> Any:
    """A file path, URL or encoded bytes as a mono float32 waveform at `sampling_rate`, decoded by the package's
    decoder (`data.audio.decode_audio`), so a truncated or corrupt file raises `AudioDecodeError` as it does in the
    CLI (transformers' ffmpeg reading returns the part before the damage without a word). Other inputs pass."""
    if isinstance(audio, str) and audio.startswith(("http://", "https://")):
        audio = httpx.get(audio, follow_redirects=True).content
    if isinstance(audio, (str, bytes)):
        return decode_audio(audio, sampling_rate)
    return audio


class _TimeMajorBatching:
    """For M2D2 models, transposes `input_features` to [1, frames, bins] after preprocessing (what the collation
    pads) and back before the model."""

    def _is_m2d2(self) -> bool:
        return getattr(self.model.config, "model_type", None) in M2D2_MODEL_TYPES

    def preprocess(self, *args, **kwargs) -> dict[str, Any]:
        inputs = super().preprocess(*args, **kwargs)
        if self._is_m2d2():
            inputs["input_features"] = inputs["input_features"].transpose(1, 2)
        return inputs

    def _forward(self, model_inputs: dict[str, Any], *args, **kwargs) -> dict[str, Any]:
        if self._is_m2d2():
            model_inputs["input_features"] = model_inputs["input_features"].transpose(1, 2)
        return super()._forward(model_inputs, *args, **kwargs)


class M2D2ZeroShotAudioClassificationPipeline(_TimeMajorBatching, ZeroShotAudioClassificationPipeline):
    """[`ZeroShotAudioClassificationPipeline`] that, for M2D2 CLAP models, batches clips of any lengths, also takes
    audio as a dict `{"raw" | "array": waveform, "sampling_rate": rate}` (resampled to the feature extractor's rate
    as the extractor does), takes one string as one label, prompts with the model's own `zero_shot_template`
    ("{} can be heard") unless a `hypothesis_template` is passed, and raises `ValueError` for no labels, a repeated
    label or a template without `{}`. Other models get the parent's behaviour unchanged."""

    def preprocess(self, audio, candidate_labels=None, hypothesis_template=None):
        if hypothesis_template is None:
            # An M2D2 model's own prompt (the one its zero-shot figures are measured with); other models get the
            # parent's default. Passing hypothesis_template="This is a sound of {}." still selects that one.
            hypothesis_template = (
                self.model.config.zero_shot_template if self._is_m2d2() else TRANSFORMERS_DEFAULT_TEMPLATE
            )
        if self._is_m2d2():
            candidate_labels = check_candidate_labels(candidate_labels)
            check_hypothesis_template(hypothesis_template)
            audio = decode_encoded(audio, self.feature_extractor.sampling_rate)
            if isinstance(audio, dict):
                audio = self._waveform_from_dict(audio)
        return super().preprocess(audio, candidate_labels, hypothesis_template)

    def _waveform_from_dict(self, audio: dict) -> np.ndarray:
        """The dict's waveform as float32 mono at the feature extractor's rate (the dict itself is left as it is)."""
        key = "raw" if "raw" in audio else "array"
        if key not in audio or "sampling_rate" not in audio:
            raise ValueError(
                f"An audio dict needs a 'raw' (or 'array') key with the waveform and a 'sampling_rate' key, got keys "
                f"{sorted(audio)}."
            )
        waveform, rate = audio[key], audio["sampling_rate"]
        try:
            whole = not isinstance(rate, bool) and float(rate).is_integer() and rate > 0
        except (TypeError, ValueError):
            whole = False
        if not whole:
            raise ValueError(f"The audio dict's sampling_rate must be a positive whole number of Hz, got {rate!r}")
        if np.ndim(waveform) != 1:
            raise ValueError(
                f"The audio dict holds a waveform of shape {tuple(np.shape(waveform))}: the pipeline takes one mono "
                f"clip [samples]; average the channels first."
            )
        extractor = self.feature_extractor
        # The extractor's own conversion (integer PCM scaling, checks) and resampler, so a dict gives the features
        # the extractor computes from the same waveform and rate.
        (clip,) = extractor.to_clips([waveform], mono=False)
        if int(rate) != extractor.sampling_rate:
            clip = torchaudio.functional.resample(clip, int(rate), extractor.sampling_rate)
        return clip.cpu().numpy()


class M2D2AudioClassificationPipeline(_TimeMajorBatching, AudioClassificationPipeline):
    """[`AudioClassificationPipeline`] that, for `M2D2ForAudioClassification`, batches clips of any lengths and
    decodes files with the package's decoder (damaged files raise `AudioDecodeError`)."""

    def preprocess(self, inputs, *args, **kwargs):
        if self._is_m2d2():
            inputs = decode_encoded(inputs, self.feature_extractor.sampling_rate)
        return super().preprocess(inputs, *args, **kwargs)


def register_pipelines() -> None:
    """Makes the two audio tasks build the classes above, unless something other than transformers' own pipeline
    is registered for a task (another package's choice is left alone)."""
    for task, stock, ours in (
        (
            "zero-shot-audio-classification",
            ZeroShotAudioClassificationPipeline,
            M2D2ZeroShotAudioClassificationPipeline,
        ),
        ("audio-classification", AudioClassificationPipeline, M2D2AudioClassificationPipeline),
    ):
        entry = PIPELINE_REGISTRY.supported_tasks[task]
        if entry["impl"] in (stock, f"{stock.__module__}.{stock.__qualname__}"):
            PIPELINE_REGISTRY.supported_tasks[task] = {**entry, "impl": ours}


__all__ = [
    "M2D2AudioClassificationPipeline",
    "M2D2ZeroShotAudioClassificationPipeline",
    "check_candidate_labels",
    "check_hypothesis_template",
    "register_pipelines",
]
