"""The HEAR 2021 API over an M2D2 folder: sizes, shapes, timestamps, and agreement with the model's own features."""

import numpy as np
import pytest
import torch

import m2d2_hf.hear as hear
from m2d2_hf import M2D2FeatureExtractor, frame_timestamps


@pytest.fixture(scope="module")
def model(tiny_clap_dir):
    return hear.load_model(str(tiny_clap_dir))


def test_model_attributes(model):
    assert model.sample_rate == 16000
    assert model.scene_embedding_size == 5 * 32 and model.timestamp_embedding_size == 32


def test_scene_and_timestamp_embeddings(model):
    torch.manual_seed(0)
    audio = torch.rand(3, 16000 * 5) - 0.5
    scene = hear.get_scene_embeddings(audio, model)
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)
    assert scene.shape == (3, 160)
    frames = model.audio_model(
        **M2D2FeatureExtractor()(audio, sampling_rate=16000, return_tensors="pt")
    ).frame_features
    assert embeddings.shape == (3, frames.shape[1], 32) and timestamps.shape == (3, frames.shape[1])
    torch.testing.assert_close(scene, frames.mean(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(embeddings, frames.reshape(3, frames.shape[1], 5, 32).mean(2), rtol=1e-5, atol=1e-6)
    # HEAR's centred timestamps at the real 160 ms hop (not the original's evenly spread frame starts).
    np.testing.assert_allclose(timestamps[1].numpy(), (np.arange(frames.shape[1]) + 0.5) * 160.0, rtol=1e-6)
    assert not np.allclose(timestamps[1].numpy(), frame_timestamps(16000 * 5, frames.shape[1]))
    assert torch.all(timestamps[:, 1:] > timestamps[:, :-1])


def test_bad_inputs(model):
    with pytest.raises(ValueError, match="n_sounds, n_samples"):
        hear.get_scene_embeddings(torch.zeros(16000), model)
    with pytest.raises(ValueError, match="path"):
        hear.load_model("")
