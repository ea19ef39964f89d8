"""Long recordings read from their files a window at a time (`m2d2_hf.long_audio.AudioFileSamples`): the samples,
the embeddings and the timeline's windows equal those of the decoded whole file, and the memory a long file costs
stays far below decoding it whole. (The window-by-window embedding of arrays is tested against the whole-clip
forward in test_performance_equivalence.py.)"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from m2d2_hf import M2D2FeatureExtractor
from m2d2_hf.data.audio import decode_audio
from m2d2_hf.long_audio import AudioFileSamples, embed_long_audio
from m2d2_hf.timeline import window_embeddings

from .test_modeling import tiny_clap_model
from .test_performance_equivalence import relative_error, tiny_clap


def write_noise(path: Path, seconds: float, rate: int, channels: int = 1, seed: int = 0, **kwargs) -> Path:
    """Noise with a near-silent stretch and a loud burst: rounding and resampling errors would show there."""
    rng = np.random.default_rng(seed)
    wave = (rng.standard_normal((int(seconds * rate), channels)) * 0.1).astype(np.float32)
    wave[rate : 2 * rate] *= 1e-4
    wave[3 * rate : 3 * rate + rate // 10] *= 8
    sf.write(path, wave, rate, **kwargs)
    return path


@pytest.mark.parametrize(
    "rate, channels, suffix", [(16000, 1, "wav"), (44100, 2, "flac"), (8000, 1, "flac"), (22050, 1, "ogg")]
)
def test_file_samples_equal_decoding_the_whole_file(tmp_path, rate, channels, suffix):
    path = write_noise(tmp_path / f"noise.{suffix}", 13.3, rate, channels)
    whole = decode_audio(str(path), sampling_rate=16000, max_seconds=None)
    with AudioFileSamples(path, 16000) as samples:
        assert samples.num_samples == len(whole)
        spans = [(0, 5000), (0, len(whole)), (123_457, 160_001), (len(whole) - 999, len(whole)), (40_000, 40_000)]
        for begin, stop in spans:
            piece = samples.read(begin, stop)
            assert piece.dtype == torch.float32 and piece.shape == (stop - begin,)
            if rate == 16000:  # no resampling: the very samples
                assert np.array_equal(piece.numpy(), whole[begin:stop])
            else:  # each span resampled with a margin: the whole file's resampling within float rounding
                np.testing.assert_allclose(piece.numpy(), whole[begin:stop], rtol=0, atol=1e-6)
        with pytest.raises(ValueError, match="outside the file's"):
            samples.read(0, len(whole) + 1)


def test_embeddings_and_windows_of_a_file_equal_those_of_its_decoded_waveform(tmp_path):
    model = tiny_clap()
    fe = M2D2FeatureExtractor()
    path = write_noise(tmp_path / "stereo.flac", 9.0, 44100, channels=2, seed=3)
    wave = decode_audio(str(path), sampling_rate=16000, max_seconds=None)
    expected = embed_long_audio(model, wave, 16000, feature_extractor=fe, chunks_per_window=2)
    for audio in (path, str(path)):
        out = model.embed_long_audio(audio, feature_extractor=fe, chunks_per_window=2)
        assert out.frame_features.shape == expected.frame_features.shape
        assert relative_error(out.frame_features, expected.frame_features) <= 1e-5
        assert relative_error(out.pooler_output, expected.pooler_output) <= 1e-5
        assert relative_error(out.audio_embeds, expected.audio_embeds) <= 1e-5

    class Processor:  # the audio half of M2D2Processor, enough for window_embeddings
        feature_extractor = fe

        def __call__(self, audio, sampling_rate, return_tensors):
            return self.feature_extractor(audio, sampling_rate=sampling_rate, return_tensors=return_tensors)

    starts, window, windows = window_embeddings(model, Processor(), wave, 2.0, 0.75, batch_size=4)
    file_starts, file_window, file_windows = window_embeddings(model, Processor(), path, 2.0, 0.75, batch_size=4)
    assert np.array_equal(starts, file_starts) and window == file_window
    assert relative_error(file_windows, windows) <= 1e-5


def test_bad_file_inputs_say_what_to_do(tmp_path):
    model = tiny_clap_model()
    path = write_noise(tmp_path / "noise.wav", 3.0, 16000)
    with pytest.raises(ValueError, match="a file carries its own rate"):
        embed_long_audio(model, path, 16000)
    with AudioFileSamples(path, 8000) as samples, pytest.raises(ValueError, match=r"AudioFileSamples\(path, 16000\)"):
        embed_long_audio(model, samples)
    (tmp_path / "text.wav").write_text("not audio")
    with pytest.raises(ValueError, match="soundfile cannot read .*text.wav.*decode it to an array first"):
        embed_long_audio(model, tmp_path / "text.wav")
    fe = M2D2FeatureExtractor()
    begin, stop = fe.window_sample_range(10, 20, 48000)
    assert (begin, stop) == (10 * 160 - 200, 19 * 160 + 200)
    with pytest.raises(ValueError, match=r"pass those 1840 samples"):
        fe.windowed_log_mel(torch.zeros(100), 10, 20, 48000)
    with pytest.raises(ValueError, match="outside the clip's 301 frames"):
        fe.window_sample_range(290, 302, 48000)


def _peak_growth(run) -> int:
    """How far `run()` raises this process's peak RSS above its RSS at the start (Linux: writing 5 to
    /proc/self/clear_refs resets the peak, VmHWM, to the current RSS)."""

    def status(key: str) -> int:
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(key))

    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    start = status("VmRSS")
    run()
    return status("VmHWM") - start


def _can_reset_the_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def _growths(folder: str) -> dict:
    """Embeds a 25-minute file of `folder` from disk, then reads it whole, each under `_peak_growth`."""
    rate, block = 16000, np.random.default_rng(0).standard_normal(16000 * 60).astype(np.float32) * 0.1
    long = Path(folder) / "long.wav"
    with sf.SoundFile(long, "w", rate, 1, subtype="PCM_16") as handle:
        for minute in range(25):
            handle.write(np.roll(block, minute * 997))
    model = tiny_clap_model()
    embed_long_audio(model, write_noise(Path(folder) / "short.wav", 30.0, rate), return_frame_features=False)  # warm
    outputs = []
    streamed = _peak_growth(lambda: outputs.append(embed_long_audio(model, long, return_frame_features=False)))
    whole = _peak_growth(lambda: outputs.append(sf.read(long, dtype="float32")[0]))
    finite = bool(torch.isfinite(outputs[0].audio_embeds).all())
    return {"streamed": streamed, "whole": whole, "waveform_bytes": outputs[1].nbytes, "finite": finite}


@pytest.mark.skipif(not _can_reset_the_peak(), reason="measures the peak RSS through /proc/self (Linux)")
def test_a_long_file_is_embedded_in_bounded_memory(tmp_path):
    """25 minutes at 16 kHz (96 MB as float32): embedding it from disk grows the peak RSS by a few MB, where merely
    reading it whole grows it by the waveform's size (decoding it, resampling and the log-mel cost more still).
    Measured in a new interpreter: in a long test session, pages that earlier tests freed stay resident (the
    allocator keeps them), so even a whole-file read there may not raise the peak."""
    code = "import json, sys; from tests.test_long_audio import _growths; print(json.dumps(_growths(sys.argv[1])))"
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    growths = json.loads(result.stdout.strip().splitlines()[-1])
    waveform_bytes = growths["waveform_bytes"]
    assert waveform_bytes == 25 * 60 * 16000 * 4
    assert growths["whole"] >= 0.9 * waveform_bytes, growths  # the measurement sees a whole-file read
    assert growths["streamed"] < 0.1 * waveform_bytes, growths
    assert growths["finite"]
