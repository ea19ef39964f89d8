"""Tests of M2D2FeatureExtractor: parity with the original front end, batching, input forms, errors, serialisation."""

import copy
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from transformers.testing_utils import CaptureLogger

from m2d2_hf import feature_extraction_m2d2
from m2d2_hf.feature_extraction_m2d2 import M2D2FeatureExtractor


# The log-mel contract for clips on the original's own conv1d path (>= 1.3 s): the original's values to 1e-5 abs,
# ten times the 1-ulp differences that CPUs with other oneDNN kernels (Intel Xeon AMX) give.
LONG_CLIP_LOG_MEL_TOLERANCE = 1e-5


def _sine(sampling_rate: int, seconds: float, hz: float = 1000.0) -> np.ndarray:
    t = np.arange(int(round(sampling_rate * seconds))) / sampling_rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


@pytest.fixture(scope="module")
def fe(reference) -> M2D2FeatureExtractor:
    return M2D2FeatureExtractor(norm_stats=reference["norm_stats"].tolist())


def _features(fe: M2D2FeatureExtractor, audio, **kwargs) -> np.ndarray:
    return fe(audio, sampling_rate=fe.sampling_rate, **kwargs)["input_features"]


def test_mel_basis_matches_original(fe, reference):
    error = np.abs(fe.mel_basis.numpy() - reference["mel_basis"]).max()
    print(f"mel basis max abs error: {error:.3g}")
    assert fe.mel_basis.dtype == torch.float32
    assert error <= 1e-7


def test_log_mel_matches_original_for_every_tag(fe, reference):
    errors = {}
    for tag in reference["input_tags"]:
        wave = torch.from_numpy(reference[f"wave__{tag}"])
        log_mel = fe.log_mel(wave[None])[0].numpy()
        expected = reference[f"lms__{tag}"]
        assert log_mel.shape == expected.shape == (80, 1 + wave.numel() // 160), tag
        errors[str(tag)] = float(np.abs(log_mel - expected).max())
    print("log-mel max abs error per tag:", errors)
    assert max(errors.values()) <= 1e-3
    # Clips longer than ~1.3 s take the original's own conv1d path: bit-exact on the AMD EPYC machines, within one
    # float32 ulp of the log-mel (<= 9.5e-7 seen) on Intel Xeon with AMX, whose oneDNN conv1d kernel sums in another
    # order. The 1 s ones are kept on the same path too (batch invariance), which the original only takes when
    # batched, hence their looser bound above.
    long_tags = [tag for tag in errors if not tag.endswith("_1s")]
    assert long_tags and all(errors[tag] <= LONG_CLIP_LOG_MEL_TOLERANCE for tag in long_tags), errors


def test_normalised_features_match_original(fe, reference):
    errors = {}
    for tag in reference["input_tags"]:
        out = fe(reference[f"wave__{tag}"], sampling_rate=16000)
        features, mask = out["input_features"], out["input_features_mask"]
        expected = reference[f"lms_norm__{tag}"]
        assert features.shape == (1, *expected.shape) and features.dtype == np.float32
        assert mask.dtype == np.int64 and mask.shape == (1, expected.shape[1]) and mask.all()
        errors[str(tag)] = float(np.abs(features[0] - expected).max())
    print("normalised max abs error per tag:", errors)
    assert max(errors.values()) <= 1e-3 / reference["norm_stats"][1]


def test_normalize_uses_norm_stats(fe):
    log_mel = torch.tensor([[-7.261779308319092, 0.0]])
    mean, std = fe.norm_stats
    assert torch.equal(fe.normalize(log_mel), (log_mel - mean) / std)
    assert fe.normalize(log_mel)[0, 0] == 0.0


def test_batch_of_different_lengths_equals_single_clips(fe, reference):
    tags = ["chirp_1s", "noise_10s", "sine1k_12p3s", "chirp_12p3s"]
    waves = [reference[f"wave__{tag}"] for tag in tags]
    out = fe(waves, sampling_rate=16000)
    features, mask = out["input_features"], out["input_features_mask"]
    num_frames = [1 + len(wave) // 160 for wave in waves]
    assert features.shape == (len(tags), 80, max(num_frames)) and mask.shape == (len(tags), max(num_frames))
    for i, (wave, frames) in enumerate(zip(waves, num_frames)):
        single = _features(fe, wave)[0]
        assert single.shape[-1] == frames
        assert np.abs(features[i, :, :frames] - single).max() <= 1e-6, tags[i]
        assert mask[i, :frames].all() and not mask[i, frames:].any()
        assert np.all(features[i, :, frames:] == 0.0)


def test_padding_value_fills_padded_frames(reference):
    fe = M2D2FeatureExtractor(padding_value=-3.0)
    out = fe([reference["wave__noise_1s"], reference["wave__noise_10s"]], sampling_rate=16000)
    assert np.all(out["input_features"][0, :, 101:] == -3.0)
    assert not np.any(out["input_features"][0, :, :101] == -3.0)


def test_two_d_array_is_a_batch(fe, reference):
    tags = ["sine1k_10s", "noise_10s", "chirp_10s"]
    batch = np.stack([reference[f"wave__{tag}"] for tag in tags])
    features = _features(fe, batch)
    assert features.shape == (3, 80, 1001)
    np.testing.assert_array_equal(features, _features(fe, list(batch)))
    for i, tag in enumerate(tags):
        assert np.abs(features[i] - reference[f"lms_norm__{tag}"]).max() <= 1e-6


def test_list_of_floats_is_one_clip(fe, reference):
    wave = reference["wave__noise_1s"]
    from_list = _features(fe, wave.tolist())
    assert from_list.shape == (1, 80, 101)
    np.testing.assert_array_equal(from_list, _features(fe, wave))


def test_torch_input_and_return_tensors(fe, reference):
    wave = torch.from_numpy(reference["wave__chirp_1s"])
    out = fe(wave, sampling_rate=16000, return_tensors="pt")
    assert isinstance(out["input_features"], torch.Tensor) and out["input_features"].device == wave.device
    assert out["input_features_mask"].dtype == torch.int64
    np.testing.assert_array_equal(out["input_features"].numpy(), _features(fe, wave.numpy()))
    as_np = fe(wave, sampling_rate=16000, return_tensors="np")
    assert isinstance(as_np["input_features"], np.ndarray)
    assert "input_features_mask" not in fe(wave, sampling_rate=16000, return_attention_mask=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_input_is_processed_on_its_device(fe, reference):
    wave = torch.from_numpy(reference["wave__chirp_10s"]).cuda()
    out = fe(wave, sampling_rate=16000, return_tensors="pt")
    assert out["input_features"].device == wave.device
    assert np.abs(out["input_features"][0].cpu().numpy() - reference["lms_norm__chirp_10s"]).max() <= 1e-3 / 4.35
    log_mel = fe.log_mel(wave[None])
    assert log_mel.device == wave.device
    assert np.abs(log_mel[0].cpu().numpy() - reference["lms__chirp_10s"]).max() <= 1e-3


def test_int16_and_int32_are_scaled(fe, reference):
    wave = reference["wave__noise_1s"]
    pcm16 = np.round(wave * 32767).astype(np.int16)
    np.testing.assert_array_equal(_features(fe, pcm16), _features(fe, pcm16.astype(np.float32) / 32768))
    pcm32 = pcm16.astype(np.int32) * 65536
    np.testing.assert_array_equal(_features(fe, pcm32), _features(fe, pcm16.astype(np.float32) / 32768))
    np.testing.assert_array_equal(_features(fe, torch.from_numpy(pcm16)), _features(fe, pcm16))


@pytest.mark.parametrize("rate", [44100, 48000])
def test_resampling_to_16k(fe, rate):
    at_16k = _features(fe, _sine(16000, 1.0))[0]
    out = fe(_sine(rate, 1.0), sampling_rate=rate)
    resampled = out["input_features"][0]
    assert resampled.shape == at_16k.shape == (80, 101)
    loud = at_16k > at_16k.max() - 1.0
    assert loud.sum() > 100
    assert np.abs(resampled - at_16k)[loud].max() < 0.01
    assert resampled.mean(axis=1).argmax() == at_16k.mean(axis=1).argmax()
    # Frame count follows the resampled length: 0.5 s at 44.1 kHz -> 8000 samples at 16 kHz -> 51 frames.
    assert fe(_sine(44100, 0.5), sampling_rate=44100)["input_features"].shape == (1, 80, 51)


def test_missing_sampling_rate_warns(fe, reference):
    logger = feature_extraction_m2d2.logger
    with CaptureLogger(logger) as captured:
        fe(reference["wave__noise_1s"])
    assert "16000" in captured.out and "sampling_rate" in captured.out
    with CaptureLogger(logger) as captured:
        fe(reference["wave__noise_1s"], sampling_rate=16000)
    assert captured.out == ""


def test_mono_averages_channels(fe, reference):
    left, right = reference["wave__noise_10s"], reference["wave__chirp_10s"]
    stereo = np.stack([left, right])
    mean = stereo.mean(axis=0)
    one = _features(fe, stereo, mono=True)
    assert one.shape == (1, 80, 1001)
    np.testing.assert_array_equal(one, _features(fe, mean))
    batch = _features(fe, np.stack([stereo, stereo[::-1]]), mono=True)
    assert batch.shape == (2, 80, 1001)
    np.testing.assert_array_equal(batch[0], one[0])
    np.testing.assert_array_equal(batch[1], one[0])
    ragged = _features(fe, [stereo, stereo[:, :16000]], mono=True)
    np.testing.assert_array_equal(ragged[1, :, :101], _features(fe, mean[:16000])[0])


@pytest.mark.parametrize(
    "audio, match",
    [
        (np.zeros((2, 2, 16000), dtype=np.float32), r"\(2, 2, 16000\).*mono=True"),
        (np.zeros(0, dtype=np.float32), "Clip 0 is empty"),
        ([np.zeros(16000, dtype=np.float32), np.array([0.0] * 100 + [np.nan] + [0.0] * 16000)], "Clip 1.*NaN"),
        (np.array([0.0] * 100 + [np.inf] + [0.0] * 16000), "Clip 0.*Inf"),
        ("a sound", "type str"),
        (["a", "b"], "Clip 0 is not numeric"),
        ([], "empty list"),
    ],
)
def test_invalid_inputs_raise(fe, audio, match):
    with pytest.raises(ValueError, match=match):
        fe(audio, sampling_rate=16000)


def test_shortest_accepted_clip_gives_one_patch(fe):
    assert fe(np.zeros(2400, dtype=np.float32), sampling_rate=16000)["input_features"].shape == (1, 80, 16)


def test_save_and_load_round_trip(tmp_path: Path, reference):
    fe = M2D2FeatureExtractor(norm_stats=reference["norm_stats"], min_frames=8, padding_value=-1.0)
    fe.save_pretrained(tmp_path)
    config_file = tmp_path / "preprocessor_config.json"
    assert config_file.stat().st_size < 2048
    saved = json.loads(config_file.read_text())
    assert saved["feature_extractor_type"] == "M2D2FeatureExtractor"
    assert saved["norm_stats"] == reference["norm_stats"].tolist()
    loaded = M2D2FeatureExtractor.from_pretrained(tmp_path)
    assert loaded.to_dict() == fe.to_dict()
    for name in ["feature_size", "sampling_rate", "n_fft", "hop_length", "f_min", "f_max", "min_frames"]:
        assert getattr(loaded, name) == getattr(fe, name), name
    assert loaded.norm_stats == fe.norm_stats and loaded.padding_value == -1.0
    waves = [reference["wave__chirp_1s"], reference["wave__noise_10s"]]
    np.testing.assert_array_equal(_features(loaded, waves), _features(fe, waves))


def test_log_mel_equals_call_without_normalisation(fe, reference):
    batch = torch.from_numpy(np.stack([reference["wave__sine1k_10s"], reference["wave__chirp_10s"]]))
    log_mel = fe.log_mel(batch)
    assert log_mel.shape == (2, 80, 1001) and log_mel.dtype == torch.float32
    features = fe(batch, sampling_rate=16000, return_tensors="pt")["input_features"]
    assert torch.equal(fe.normalize(log_mel), features)
    mean, std = fe.norm_stats
    assert (features * std + mean - log_mel).abs().max() <= 1e-5
    with pytest.raises(ValueError, match=r"\[batch, samples\]"):
        fe.log_mel(batch[0])


def test_log_mel_ignores_autocast(fe, reference):
    wave = torch.from_numpy(reference["wave__chirp_10s"])[None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        log_mel = fe.log_mel(wave)
    assert log_mel.dtype == torch.float32
    # The same kernel as without autocast (so the same bits on this CPU), and the original's values within the
    # cross-CPU bound: a bf16 conv1d would miss both by about 1e-2.
    torch.testing.assert_close(log_mel, fe.log_mel(wave), rtol=0, atol=0)
    np.testing.assert_allclose(
        log_mel[0].numpy(), reference["lms__chirp_10s"], rtol=0, atol=LONG_CLIP_LOG_MEL_TOLERANCE
    )


def test_prepacked_stft_agrees_with_the_differentiable_conv1d(reference):
    # Without autograd the CPU STFT runs on kernels prepacked for oneDNN (`_fourier_conv`); with it, `F.conv1d`. Both
    # sum the same products; on the CPUs seen here they give the same bits, the contract is the cross-CPU bound.
    fe = M2D2FeatureExtractor()
    for seconds in (1.0, 10.0, 31.3):
        wave = torch.from_numpy(np.resize(reference["wave__chirp_10s"], int(16000 * seconds)))[None]
        with torch.no_grad():
            fast = fe.log_mel(wave)
        differentiable = fe.log_mel(wave.clone().requires_grad_(True))
        assert differentiable.requires_grad and fast.shape == differentiable.shape
        torch.testing.assert_close(fast, differentiable.detach(), rtol=0, atol=LONG_CLIP_LOG_MEL_TOLERANCE)
    if feature_extraction_m2d2._onednn_convolution_available():
        assert fe._packed_fourier is not None
    # The packed kernels are opaque oneDNN tensors: copies and pickles leave them out and repack on first use.
    copied = pickle.loads(pickle.dumps(fe))
    assert copied._packed_fourier is None and copy.deepcopy(fe)._packed_fourier is None
    assert torch.equal(copied.log_mel(wave), fe.log_mel(wave))
    assert "_packed_fourier" not in fe.to_dict()


def test_real_clip(fe, real_sounds_dir):
    path = sorted(real_sounds_dir.glob("audio/*/*.flac"))[0]
    wave, rate = soundfile.read(path, dtype="float32")
    assert rate == 16000 and wave.ndim == 1
    out = fe(wave, sampling_rate=rate)
    features = out["input_features"]
    assert features.shape == (1, 80, 1 + len(wave) // 160)
    assert np.isfinite(features).all() and out["input_features_mask"].all()
    # Real audio lands roughly in the normalised range the encoder was trained on.
    assert -5 < features.mean() < 5 and 0.1 < features.std() < 5


def test_fft_stft_stays_within_the_parity_contract(reference, real_sounds_dir):
    """stft="fft" (torch.stft) against the original's log-mel: the 1e-3 contract, on the fixture inputs and real
    clips."""
    fast = M2D2FeatureExtractor(norm_stats=reference["norm_stats"].tolist(), stft="fft")
    exact = M2D2FeatureExtractor(norm_stats=reference["norm_stats"].tolist())
    for tag in ("sine1k_10s", "chirp_10s", "noise_10s"):
        log_mel = fast.log_mel(torch.from_numpy(reference[f"wave__{tag}"])[None])[0].numpy()
        assert np.abs(log_mel - reference[f"lms__{tag}"]).max() <= 1e-3, tag
    clips = [soundfile.read(path, dtype="float32")[0] for path in sorted(real_sounds_dir.glob("audio/*/*.flac"))[:40]]
    clips = [clip for clip in clips if len(clip) >= fast.min_samples]
    got = fast(clips, sampling_rate=16000, return_tensors="pt")["input_features"]
    expected = exact(clips, sampling_rate=16000, return_tensors="pt")["input_features"]
    assert (got - expected).abs().max() * exact.norm_stats[1] <= 1e-3
    assert not torch.equal(got, expected)  # a different computation, not the conv1d under another name


def test_stft_method_is_saved_and_checked(tmp_path):
    M2D2FeatureExtractor(stft="fft").save_pretrained(tmp_path)
    assert M2D2FeatureExtractor.from_pretrained(tmp_path).stft == "fft"
    with pytest.raises(ValueError, match="stft must be one of"):
        M2D2FeatureExtractor(stft="wavelet")


@pytest.mark.parametrize("samples", [1, 200, 1600, 2399])
def test_clips_shorter_than_one_patch_are_padded_to_one(samples):
    """A clip under 0.15 s no longer aborts its batch: its own frames, then padding up to one 16-frame patch."""
    fe = M2D2FeatureExtractor()
    rng = np.random.default_rng(samples)
    short, long = rng.uniform(-0.5, 0.5, samples).astype(np.float32), rng.uniform(-0.5, 0.5, 16000).astype(np.float32)
    alone = fe(short, sampling_rate=16000)
    real = fe.num_frames(max(samples, fe.n_fft // 2 + 1))
    assert alone["input_features"].shape == (1, 80, 16)
    assert alone["input_features_mask"][0].tolist() == [1] * real + [0] * (16 - real)
    assert np.all(alone["input_features"][0, :, real:] == fe.padding_value)
    batch = fe([long, short], sampling_rate=16000)
    np.testing.assert_allclose(batch["input_features"][1, :, :real], alone["input_features"][0, :, :real], atol=1e-5)
    # A longer clip's features do not change.
    np.testing.assert_array_equal(batch["input_features"][0], fe(long, sampling_rate=16000)["input_features"][0])
