"""Parity with the ORIGINAL runtime: the fixture checkpoint is regenerated, converted by the project's converter,
loaded through the Auto classes, and every reference array of the original NTT runtime is compared."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoFeatureExtractor, AutoModel, AutoProcessor, AutoTokenizer

from m2d2_hf import M2D2ClapModel, M2D2FeatureExtractor, M2D2Processor, frame_timestamps


pytestmark = pytest.mark.slow

# The contract (fixture README); the README of this project states the achieved figures.
LOG_MEL_ABS = 1e-3
ENCODER_REL = 1e-4
CLAP_REL = 1e-5


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def unit(x: np.ndarray) -> np.ndarray:
    """The original's CLAP outputs are not normalised; the model's embeddings are."""
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def loaded(converted_dir):
    model = AutoModel.from_pretrained(converted_dir).eval()
    return model, AutoFeatureExtractor.from_pretrained(converted_dir), AutoTokenizer.from_pretrained(converted_dir)


def test_converted_folder_is_complete(converted_dir, loaded):
    model, feature_extractor, _ = loaded
    assert isinstance(model, M2D2ClapModel) and isinstance(feature_extractor, M2D2FeatureExtractor)
    assert isinstance(AutoProcessor.from_pretrained(converted_dir), M2D2Processor)
    config = json.loads((converted_dir / "config.json").read_text())
    assert config["model_type"] == "m2d2" and config["audio_config"]["chunk_frames"] == 1001
    assert feature_extractor.norm_stats == pytest.approx([-7.261779308319092, 4.3511505126953125])
    assert "norm_stats" not in config["audio_config"]  # the feature extractor owns the front end
    assert (converted_dir / "model.safetensors").exists()


def test_resized_positional_table_is_kept(fixture_checkpoint, loaded):
    """The released table is the 5x38 grid resized to 5x62, not the formula's: it must be loaded, not rebuilt."""
    original = torch.load(fixture_checkpoint, map_location="cpu", weights_only=False)["model"]["backbone.pos_embed"]
    assert torch.equal(loaded[0].audio_model.embeddings.position_embeddings, original)


def test_audio_parity_with_the_original_runtime(reference, loaded):
    model, feature_extractor, _ = loaded
    worst = {}
    with torch.no_grad():
        for tag in reference["input_tags"]:
            wave = reference[f"wave__{tag}"]
            inputs = feature_extractor(wave, sampling_rate=16000, return_tensors="pt")
            out = model.audio_model(**inputs)
            clap = model.get_audio_features(**inputs).pooler_output[0].numpy()
            ts = frame_timestamps(len(wave), out.frame_features.shape[1])
            errors = {
                "normalised log-mel abs": np.abs(
                    inputs["input_features"][0].numpy() - reference[f"lms_norm__{tag}"]
                ).max(),
                "frames rel": relative_error(out.frame_features[0].numpy(), reference[f"frames__{tag}"]),
                "tokens rel": relative_error(out.last_hidden_state[0].numpy(), reference[f"tokens__{tag}"]),
                "clip rel": relative_error(out.pooler_output[0].numpy(), reference[f"clip__{tag}"]),
                "timestamp embeddings rel": relative_error(
                    model.audio_model.timestamp_embeddings(out)[0].numpy(), reference[f"ts_frames__{tag}"]
                ),
                "timestamps ms abs": np.abs(ts - reference[f"ts_ms__{tag}"]).max(),
                "clap audio rel": relative_error(clap, unit(reference[f"clap_audio__{tag}"])),
            }
            for name, value in errors.items():
                worst[name] = max(worst.get(name, 0.0), float(value))
    print("worst errors over all reference inputs:", worst)
    assert worst["normalised log-mel abs"] <= LOG_MEL_ABS / reference["norm_stats"][1]
    for name in ("frames rel", "tokens rel", "clip rel", "timestamp embeddings rel"):
        assert worst[name] <= ENCODER_REL, (name, worst[name])
    assert worst["timestamps ms abs"] == 0.0
    assert worst["clap audio rel"] <= CLAP_REL


def test_batched_inputs_match_the_original(reference, loaded):
    """One call of the feature extractor and one batched forward over clips of 1 s to 20 s."""
    model, feature_extractor, _ = loaded
    tags = ["sine1k_1s", "chirp_12p3s", "noise_20s", "noise_10s", "noise_20p01s"]
    inputs = feature_extractor([reference[f"wave__{t}"] for t in tags], sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        out = model.get_audio_features(**inputs)
    for i, tag in enumerate(tags):
        frames = reference[f"frames__{tag}"]
        assert int(out.frame_mask[i].sum()) == len(frames)
        assert relative_error(out.frame_features[i, : len(frames)].numpy(), frames) <= ENCODER_REL
        assert relative_error(out.pooler_output[i].numpy(), unit(reference[f"clap_audio__{tag}"])) <= CLAP_REL
    ten_seconds = feature_extractor(
        [reference[f"wave__{t}_10s"] for t in ("sine1k", "noise", "chirp")], sampling_rate=16000, return_tensors="pt"
    )
    with torch.no_grad():
        embeddings = model.get_audio_features(**ten_seconds).pooler_output.numpy()
    assert relative_error(embeddings, unit(reference["batch10s_clap_audio"])) <= CLAP_REL


def test_text_parity_with_the_original_runtime(reference, loaded):
    model, _, tokenizer = loaded
    with torch.no_grad():
        fixed = model.get_text_features(
            input_ids=torch.from_numpy(reference["text_input_ids"]),
            attention_mask=torch.from_numpy(reference["text_attention_mask"]),
        ).pooler_output.numpy()
        tokens = tokenizer(list(reference["text_sentences"]), padding=True, return_tensors="pt")
        sentences = model.get_text_features(**tokens).pooler_output.numpy()
    np.testing.assert_array_equal(tokens["input_ids"].numpy(), reference["text_sentences_input_ids"])
    np.testing.assert_array_equal(tokens["attention_mask"].numpy(), reference["text_sentences_attention_mask"])
    assert relative_error(fixed, unit(reference["clap_text"])) <= CLAP_REL
    assert relative_error(sentences, unit(reference["clap_text_sentences"])) <= CLAP_REL


def test_eager_matches_sdpa_on_the_full_model(reference, loaded):
    model, feature_extractor, _ = loaded
    inputs = feature_extractor(
        [reference["wave__chirp_12p3s"], reference["wave__noise_1s"]], sampling_rate=16000, return_tensors="pt"
    )
    with torch.no_grad():
        sdpa = model.get_audio_features(**inputs)
        model.set_attn_implementation("eager")
        try:
            eager = model.get_audio_features(**inputs)
        finally:
            model.set_attn_implementation("sdpa")
    assert relative_error(eager.frame_features.numpy(), sdpa.frame_features.numpy()) <= 1e-5
    assert relative_error(eager.pooler_output.numpy(), sdpa.pooler_output.numpy()) <= 1e-5
