"""The transformers zero-shot-audio-classification pipeline on M2D2 CLAP folders."""

import csv
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import AutoConfig, AutoModel, AutoProcessor, pipeline

from m2d2_hf import M2D2Config  # importing m2d2_hf registers the M2D2 classes with the Auto classes


TASK = "zero-shot-audio-classification"
LABELS = ["a dog barking", "an alarm clock ringing", "rain falling", "a person speaking"]
REAL_CLIP = "audio/alarm/fd_alarm_clock_elapsed.flac"  # 6.1 s: several 208-frame chunks of the tiny model


def read_mono(path) -> tuple[np.ndarray, int]:
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return data.mean(axis=1), rate


@pytest.fixture(scope="module")
def clip(real_sounds_dir) -> np.ndarray:
    audio, rate = read_mono(real_sounds_dir / REAL_CLIP)
    assert rate == 16000
    return audio


@pytest.fixture(scope="module")
def classifier(tiny_clap_dir):
    return pipeline(TASK, model=str(tiny_clap_dir))


def direct_scores(model_dir, audio: np.ndarray, labels: list[str], template: str) -> torch.Tensor:
    """softmax over the labels of the model's own logits_per_audio, computed without the pipeline."""
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir)
    inputs = processor(text=[template.format(label) for label in labels], audio=audio, sampling_rate=16000)
    with torch.no_grad():
        logits = model(**inputs).logits_per_audio[0]
    return logits.softmax(-1)


def as_dict(predictions: list[dict]) -> dict[str, float]:
    return {p["label"]: p["score"] for p in predictions}


def test_pipeline_on_array_matches_model(classifier, tiny_clap_dir, clip):
    predictions = classifier(clip, candidate_labels=LABELS, hypothesis_template="{} can be heard")

    assert sorted(p["label"] for p in predictions) == sorted(LABELS)
    scores = [p["score"] for p in predictions]
    assert scores == sorted(scores, reverse=True)
    assert sum(scores) == pytest.approx(1.0, abs=1e-6)
    expected = direct_scores(tiny_clap_dir, clip, LABELS, "{} can be heard")
    assert predictions[0]["label"] == LABELS[int(expected.argmax())]
    got = as_dict(predictions)
    np.testing.assert_allclose([got[label] for label in LABELS], expected.numpy(), atol=1e-6)


def test_hypothesis_template_is_used(classifier, tiny_clap_dir, clip):
    by_template = {}
    for template in ("{} can be heard", "This is a sound of {}."):
        got = as_dict(classifier(clip, candidate_labels=LABELS, hypothesis_template=template))
        expected = direct_scores(tiny_clap_dir, clip, LABELS, template)
        np.testing.assert_allclose([got[label] for label in LABELS], expected.numpy(), atol=1e-6)
        by_template[template] = np.array([got[label] for label in LABELS])
    # The prompts reach the text tower: another template gives other scores.
    assert np.abs(by_template["{} can be heard"] - by_template["This is a sound of {}."]).max() > 1e-4


def test_the_default_prompt_is_the_models_own(classifier, tiny_clap_dir, clip, tmp_path):
    """Without hypothesis_template the pipeline prompts as the CLI and the evaluations do: with the model's
    `zero_shot_template`, not transformers' "This is a sound of {}."."""
    default = as_dict(classifier(clip, candidate_labels=LABELS))
    expected = direct_scores(tiny_clap_dir, clip, LABELS, classifier.model.config.zero_shot_template)
    np.testing.assert_allclose([default[label] for label in LABELS], expected.numpy(), atol=1e-6)
    custom_dir = tmp_path / "custom"
    shutil.copytree(tiny_clap_dir, custom_dir)
    config = AutoConfig.from_pretrained(custom_dir)
    config.zero_shot_template = "the sound of {}"
    config.save_pretrained(custom_dir)
    custom = as_dict(pipeline(TASK, model=str(custom_dir))(clip, candidate_labels=LABELS))
    expected = direct_scores(tiny_clap_dir, clip, LABELS, "the sound of {}")
    np.testing.assert_allclose([custom[label] for label in LABELS], expected.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="zero_shot_template must hold one"):
        M2D2Config(zero_shot_template="no placeholder")


def test_pipeline_on_file_path(classifier, real_sounds_dir, clip):
    from_path = as_dict(classifier(str(real_sounds_dir / REAL_CLIP), candidate_labels=LABELS))
    from_array = as_dict(classifier(clip, candidate_labels=LABELS))
    assert sum(from_path.values()) == pytest.approx(1.0, abs=1e-6)
    # The package's decoder reads the 16 kHz 16-bit FLAC to the same float samples soundfile gives.
    np.testing.assert_allclose(
        [from_path[label] for label in LABELS], [from_array[label] for label in LABELS], atol=1e-6
    )


@pytest.mark.slow
def test_converted_model_scores_are_softmax_of_scaled_cosine(converted_dir, real_sounds_dir):
    with open(real_sounds_dir / "metadata.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    labels = sorted({row["label"] for row in rows})[:6]
    audio, rate = read_mono(real_sounds_dir / rows[0]["file_name"])
    prompts = [f"{label.replace('_', ' ')} can be heard" for label in labels]

    classifier = pipeline(TASK, model=str(converted_dir))
    got = as_dict(classifier(audio, candidate_labels=prompts, hypothesis_template="{}"))

    processor = AutoProcessor.from_pretrained(converted_dir)
    model = AutoModel.from_pretrained(converted_dir)
    with torch.no_grad():
        audio_embeds = model.get_audio_features(**processor(audio=audio, sampling_rate=rate)).pooler_output
        text_embeds = model.get_text_features(**processor(text=prompts)).pooler_output
    # The released model stores logit_scale = ln 100.
    expected = (100.0 * audio_embeds @ text_embeds.T)[0].softmax(-1)
    np.testing.assert_allclose([got[prompt] for prompt in prompts], expected.numpy(), atol=1e-5)
