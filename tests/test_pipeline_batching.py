"""`pipeline(...)` with batch_size > 1 over real clips of 0.1 s to 30 s (m2d2_hf.pipelines, registered on import)."""

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import ZeroShotAudioClassificationPipeline, pipeline

from m2d2_hf import M2D2AudioConfig, M2D2FeatureExtractor, M2D2ForAudioClassification
from m2d2_hf.pipelines import M2D2AudioClassificationPipeline, M2D2ZeroShotAudioClassificationPipeline

from .conftest import TINY_AUDIO


LABELS = ["a dog barking", "an alarm clock ringing", "rain falling"]


@pytest.fixture(scope="module")
def clips(real_sounds_dir) -> list[np.ndarray]:
    """16 clips: real ones, a 0.1 s and a 0.2 s cut, and concatenations up to 30 s, in mixed order."""
    real = []
    for path in sorted((real_sounds_dir / "audio").glob("*/*.flac"))[:10]:
        audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
        assert rate == 16000
        real.append(audio.mean(1))
    longest = np.concatenate(real * 4)[: 30 * 16000]
    return [real[0][:1600], *real[:6], longest, real[6][:3200], *real[6:], np.concatenate(real[:3]), real[1][:4000]]


def scores(predictions: list[dict]) -> dict[str, float]:
    return {p["label"]: p["score"] for p in predictions}


def max_difference(batched: list[list[dict]], single: list[list[dict]]) -> float:
    return max(abs(scores(b)[k] - v) for b, s in zip(batched, single, strict=True) for k, v in scores(s).items())


def test_zero_shot_batches_equal_single_calls(tiny_clap_dir, clips):
    classifier = pipeline("zero-shot-audio-classification", model=str(tiny_clap_dir))
    assert isinstance(classifier, M2D2ZeroShotAudioClassificationPipeline)
    single = [classifier(clip, candidate_labels=LABELS) for clip in clips]
    for batch_size in (2, 5, 16):
        assert max_difference(classifier(clips, candidate_labels=LABELS, batch_size=batch_size), single) <= 1e-5


def test_audio_classification_batches_equal_single_calls(tmp_path, clips):
    torch.manual_seed(0)
    config = M2D2AudioConfig(**TINY_AUDIO, num_labels=4)
    model = M2D2ForAudioClassification(config).eval()
    model.save_pretrained(tmp_path)
    M2D2FeatureExtractor.from_audio_config(config).save_pretrained(tmp_path)
    classifier = pipeline("audio-classification", model=str(tmp_path))
    assert isinstance(classifier, M2D2AudioClassificationPipeline)
    single = [classifier(clip) for clip in clips]
    for batch_size in (2, 5, 16):
        assert max_difference(classifier(clips, batch_size=batch_size), single) <= 1e-5


def test_transformers_collation_needs_the_m2d2_pipeline(tiny_clap_dir, clips):
    """transformers' own class pads [1, bins, frames] features along the bins: what the registered classes fix."""
    classifier = pipeline(
        "zero-shot-audio-classification", model=str(tiny_clap_dir), pipeline_class=ZeroShotAudioClassificationPipeline
    )
    with pytest.raises(RuntimeError, match="expanded size"):
        classifier(clips[:2], candidate_labels=LABELS, batch_size=2)
