"""The zero-shot-audio-classification pipeline for M2D2 CLAP models.

Importing `m2d2_hf` makes `pipeline("zero-shot-audio-classification", ...)` build
[`M2D2ZeroShotAudioClassificationPipeline`]. For models other than M2D2 it is transformers' pipeline unchanged; for
M2D2 models it also takes `{"raw" | "array": waveform, "sampling_rate": rate}` dicts (as the audio-classification
pipeline and `datasets` Audio columns do; other rates are resampled) and rejects labels and templates that would
give a silent wrong answer.
"""

from typing import Any

import numpy as np
import torchaudio
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.zero_shot_audio_classification import ZeroShotAudioClassificationPipeline

from .configuration_m2d2 import M2D2Config


TASK = "zero-shot-audio-classification"


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
    """The labels as a list: one string is one label; no labels at all is an error."""
    if isinstance(candidate_labels, str):
        return [candidate_labels]
    labels = list(candidate_labels) if candidate_labels is not None else []
    if not labels:
        raise ValueError("candidate_labels is empty: pass at least one label, e.g. candidate_labels=['dog', 'rain']")
    return labels


class M2D2ZeroShotAudioClassificationPipeline(ZeroShotAudioClassificationPipeline):
    """[`ZeroShotAudioClassificationPipeline`] that, for M2D2 CLAP models, also takes audio as a dict
    `{"raw" | "array": waveform, "sampling_rate": rate}` (resampled to the feature extractor's rate like the
    extractor does), takes one string as one label, and raises `ValueError` for no labels or a template without
    `{}`. Other models get the parent's behaviour unchanged."""

    def preprocess(self, audio, candidate_labels=None, hypothesis_template="This is a sound of {}."):
        if getattr(self.model.config, "model_type", None) != M2D2Config.model_type:
            return super().preprocess(audio, candidate_labels, hypothesis_template)
        candidate_labels = check_candidate_labels(candidate_labels)
        check_hypothesis_template(hypothesis_template)
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
        (clip,) = extractor._to_clips([waveform], mono=False)
        if int(rate) != extractor.sampling_rate:
            clip = torchaudio.functional.resample(clip, int(rate), extractor.sampling_rate)
        return clip.cpu().numpy()


def register_pipeline() -> None:
    """Makes the zero-shot-audio-classification task build [`M2D2ZeroShotAudioClassificationPipeline`], unless
    something else than transformers' own pipeline is registered for it."""
    entry = PIPELINE_REGISTRY.supported_tasks[TASK]
    stock = ZeroShotAudioClassificationPipeline
    if entry["impl"] in (stock, f"{stock.__module__}.{stock.__qualname__}"):
        PIPELINE_REGISTRY.supported_tasks[TASK] = {**entry, "impl": M2D2ZeroShotAudioClassificationPipeline}


__all__ = ["M2D2ZeroShotAudioClassificationPipeline", "check_candidate_labels", "check_hypothesis_template"]
