"""Tests of the one audio decoder (`m2d2_hf.data.audio`): every source kind to the same mono waveform at a rate, the
header checks of the command line and of uploads (limits read from the header, decoding no further), and one error
type naming the problem."""

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torchaudio

from m2d2_hf.data.audio import (
    AudioDecodeError,
    AudioFile,
    AudioHeader,
    AudioLimits,
    AudioTooLargeError,
    audio_header,
    audio_path,
    decode_audio,
    decode_within,
    inspect_audio_files,
    mono_at,
    read_audio,
)
from tests.test_training_data import _wav_bytes


RATE = 22050


@pytest.fixture(scope="module")
def stereo() -> np.ndarray:
    """[channels, samples] float32: two tones at 22.05 kHz, 0.5 s."""
    t = np.arange(RATE // 2) / RATE
    return np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.25 * np.sin(2 * np.pi * 1000 * t)]).astype(np.float32)


@pytest.fixture(scope="module")
def stereo_file(tmp_path_factory, stereo) -> Path:
    path = tmp_path_factory.mktemp("audio") / "tones.wav"
    soundfile.write(path, stereo.T, RATE, subtype="FLOAT")
    return path


def encoded(samples: np.ndarray, rate: int, format: str = "FLAC", subtype: str = "PCM_16") -> bytes:
    """`samples` ([samples] or [samples, channels]) as an encoded file's bytes."""
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=format, subtype=subtype)
    return buffer.getvalue()


def with_flac_total_samples(data: bytes, total: int) -> bytes:
    """The FLAC `data` with a STREAMINFO header stating `total` samples per channel (0: unknown), whatever it holds:
    the low 36 bits of the 8 bytes after the block sizes (the header starts after "fLaC" and the block's 4 bytes)."""
    fields = int.from_bytes(data[18:26], "big")
    fields = (fields & ~(2**36 - 1)) | total
    return data[:18] + fields.to_bytes(8, "big") + data[26:]


def expected_16k(stereo: np.ndarray) -> np.ndarray:
    return torchaudio.functional.resample(torch.from_numpy(stereo).mean(dim=0), RATE, 16000).numpy()


def test_every_source_kind_decodes_to_the_same_waveform(stereo, stereo_file):
    data = stereo_file.read_bytes()
    sources = {
        "str path": str(stereo_file),
        "Path": stereo_file,
        "bytes": data,
        "memoryview": memoryview(data),
        "file object": io.BytesIO(data),
        "undecoded cell": {"bytes": data, "path": "tones.wav"},
        "path cell": {"bytes": None, "path": str(stereo_file)},
    }
    expected = expected_16k(stereo)
    for name, source in sources.items():
        wave = decode_audio(source, 16000)
        assert wave.dtype == np.float32 and wave.shape == expected.shape, name
        np.testing.assert_allclose(wave, expected, atol=1e-6, err_msg=name)
    arrays = {
        "decoded cell": {"array": stereo, "sampling_rate": RATE},
        "array with rate": stereo,
        "tensor with rate": torch.from_numpy(stereo),
        "list with rate": stereo.tolist(),
    }
    for name, source in arrays.items():
        rate = None if isinstance(source, dict) else RATE
        np.testing.assert_array_equal(decode_audio(source, 16000, rate=rate), expected, err_msg=name)
    # An array without a rate is already at the output rate: averaged, not resampled.
    np.testing.assert_array_equal(decode_audio(stereo, RATE), stereo.mean(axis=0))


def test_torchcodec_audio_decoder_cells(stereo, stereo_file):
    decoders = pytest.importorskip("torchcodec.decoders")
    wave = decode_audio(decoders.AudioDecoder(str(stereo_file)), 16000)
    np.testing.assert_allclose(wave, expected_16k(stereo), atol=1e-6)


def test_max_seconds_cuts_encoded_and_array_sources(stereo, stereo_file):
    assert decode_audio(stereo_file, 16000, max_seconds=0.25).shape == (4000,)
    assert decode_audio(stereo, 16000, rate=RATE, max_seconds=0.1).shape == (1600,)
    # Decoding stops at the cut (plus the resampler's edge, where the two differ): the rest is the whole clip's.
    cut, whole = decode_audio(stereo_file, 16000, max_seconds=0.25), decode_audio(stereo_file, 16000)
    np.testing.assert_allclose(cut[:3900], whole[:3900], atol=1e-5)


@pytest.mark.parametrize("channels", [2, 3, 4, 6, 8])
def test_the_channel_mean_matches_the_streams_former_numpy_mean(channels):
    """The training streams averaged channels with numpy, the evaluations and the command line with torch; the one
    decoder takes torch's. Both are the same to the letter up to six channels and within one float32 step above."""
    samples = np.random.default_rng(channels).standard_normal((4800, channels)).astype(np.float32)
    numpy_mean = samples.mean(axis=1, dtype=np.float32)
    decoded = decode_audio(_wav_bytes(samples, 16000, "FLOAT"), 16000)
    if channels <= 6:
        np.testing.assert_array_equal(decoded, numpy_mean)
    else:
        np.testing.assert_allclose(decoded, numpy_mean, rtol=0, atol=4e-7)


def test_torchcodec_fallback_decodes_m4a(tmp_path):
    """soundfile cannot read AAC; the decoder falls back to torchcodec (FFmpeg)."""
    import shutil
    import subprocess

    pytest.importorskip("torchcodec.decoders")
    if shutil.which("ffmpeg") is None:
        pytest.skip("needs the ffmpeg command to make an m4a file")
    path = tmp_path / "tone.m4a"
    # fmt: skip below: the ffmpeg command stays on two lines, as one would type it, not one argument a line.
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=22050:duration=1.2",
         "-ac", "2", "-c:a", "aac", str(path)],
        check=True,
    )  # fmt: skip
    with pytest.raises(soundfile.LibsndfileError):
        soundfile.read(path)
    header = audio_header(path.read_bytes())  # torchcodec's stream metadata
    assert (header.channels, header.sampling_rate) == (2, 22050) and header.seconds == pytest.approx(1.2, abs=0.05)
    audio = decode_audio(path.read_bytes(), max_seconds=1.0)
    assert audio.dtype == np.float32 and audio.shape == (16000,)
    spectrum = np.abs(np.fft.rfft(audio[4000:]))
    assert abs(np.fft.rfftfreq(12000, 1 / 16000)[np.argmax(spectrum)] - 440) < 2


def test_decode_audio_reasons():
    silence = np.zeros(1600, np.float32)
    for cell, reason in (
        (None, "no audio"),
        (b"", "empty file"),
        (b"RIFF\x00\x00garbage" * 10, "undecodable"),
        (_wav_bytes(silence[:0], 16000), "zero-length"),
        (_wav_bytes(np.full(100, np.nan, np.float32), 16000, "FLOAT"), "NaN"),
        ({"bytes": None, "path": "/nonexistent/x.flac"}, "cannot read"),
    ):
        with pytest.raises(AudioDecodeError, match=reason):
            decode_audio(cell)
    partly_nan = np.array([0.1, np.nan, -0.2, np.inf], np.float32)
    np.testing.assert_array_equal(
        decode_audio(_wav_bytes(partly_nan, 16000, "FLOAT")), np.array([0.1, 0.0, -0.2, 0.0], np.float32)
    )


def test_audio_header_reads_length_channels_and_rate_without_decoding(stereo):
    flac = encoded(stereo.T, RATE)
    assert audio_header(flac) == AudioHeader(RATE // 2, 2, RATE) and audio_header(flac).seconds == 0.5
    assert audio_header(encoded(stereo.T, RATE, "WAV", "FLOAT")) == AudioHeader(RATE // 2, 2, RATE)
    # What a header claims, not what the file holds; a streamed FLAC states no length.
    assert audio_header(with_flac_total_samples(flac, 3600 * RATE)).seconds == 3600.0
    assert audio_header(with_flac_total_samples(flac, 0)) == AudioHeader(None, 2, RATE)
    for data, reason in ((b"", "empty file"), (b"RIFF\x00\x00garbage" * 10, "unreadable audio header")):
        with pytest.raises(AudioDecodeError, match=reason):
            audio_header(data)


def test_decode_within_refuses_what_exceeds_the_limits_and_decodes_no_further():
    assert AudioLimits() == AudioLimits(max_seconds=60.0, max_channels=2, max_sampling_rate=96000)
    limits = AudioLimits(max_seconds=1.0, max_channels=2, max_sampling_rate=48000)
    short = np.zeros(RATE // 10, np.float32)
    for data, reason in (
        (encoded(np.zeros((RATE // 10, 3), np.float32), RATE), "3 channels, above the limit of 2"),
        (encoded(np.zeros(9600, np.float32), 96000), "sampled at 96000 Hz, above the limit of 48000 Hz"),
        (encoded(np.zeros(2 * RATE, np.float32), RATE), "2.0 s long, above the limit of 1 s"),
        (with_flac_total_samples(encoded(short, RATE), 3600 * RATE), "3600.0 s long, above the limit of 1 s"),
    ):
        with pytest.raises(AudioTooLargeError, match=reason):
            decode_within(data, limits)
    assert issubclass(AudioTooLargeError, AudioDecodeError)
    # A header that states no length (or understates it) is decoded up to the limit, no further.
    tone = np.sin(np.arange(3 * RATE) / 10).astype(np.float32) / 2
    assert decode_within(with_flac_total_samples(encoded(tone, RATE), 0), limits).shape == (16000,)
    assert decode_within(encoded(tone[: RATE // 2], RATE), limits).shape == (8000,)


def test_rates_that_resample_only_through_a_huge_filter_are_refused():
    # 1251 Hz shares no factor with 16 kHz: torchaudio would build a 20M-tap filter for any length of audio.
    with pytest.raises(AudioDecodeError, match="1251 Hz, which shares no large factor with 16000 Hz.*common rate"):
        decode_audio(np.zeros(1251, np.float32), rate=1251)
    for rate in (8000, 11025, 22050, 44100, 48000, 96000):
        assert decode_audio(np.zeros(rate // 10, np.float32), rate=rate).shape == (1600,)


def test_errors_name_the_source_and_the_fix(tmp_path):
    assert issubclass(AudioDecodeError, ValueError)  # library callers catch ValueError; the CLI prints one line
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x00\x00garbage" * 10)
    cases = {
        "a path that is not audio": (broken, f"{broken}: undecodable"),
        "a missing path": (tmp_path / "absent.flac", "cannot read .*absent.flac"),
        "an unsupported type": (object(), "unsupported audio source of type object: pass a path"),
        "a cell without audio": ({"caption": "x"}, r"neither bytes, array nor path: keys \['caption'\]"),
        "three dimensions": (np.zeros((1, 2, 3), np.float32), r"\[channels, samples\], got \(1, 2, 3\)"),
        "an empty array": (np.zeros(0, np.float32), "zero-length"),
        "integer PCM": (np.zeros(4, np.int16), "dtype torch.int16: pass float samples in \\[-1, 1\\]"),
        "all NaN": (np.full(10, np.nan), "all samples are NaN/Inf"),
    }
    for source, message in cases.values():
        with pytest.raises(AudioDecodeError, match=message):
            decode_audio(source)


def test_inspect_read_and_mono_at(stereo, stereo_file, tmp_path):
    (file,) = inspect_audio_files([stereo_file])
    assert file == AudioFile(stereo_file, RATE, stereo.shape[1])
    np.testing.assert_array_equal(read_audio(file), stereo)
    np.testing.assert_array_equal(mono_at(file, 16000), decode_audio(stereo_file, 16000))
    text = tmp_path / "notes.wav"
    text.write_text("not audio")
    empty = tmp_path / "empty.wav"
    soundfile.write(empty, np.zeros(0, np.float32), 16000)
    for path, message in (
        (tmp_path / "absent.wav", "no such file"),
        (tmp_path, "not a file"),
        (text, "cannot read audio file"),
        (empty, "holds no samples"),
    ):
        with pytest.raises(AudioDecodeError, match=message):
            inspect_audio_files([stereo_file, path])
    with pytest.raises(AudioDecodeError, match="cannot decode audio file"):
        read_audio(AudioFile(text, 16000, 1))


def test_audio_path():
    assert audio_path("a/b.flac") == "a/b.flac"
    assert audio_path(Path("a/b.flac")) == "a/b.flac"
    assert audio_path({"bytes": b"x", "path": "c.wav"}) == "c.wav"
    assert audio_path({"bytes": b"x", "path": None}) is None
    assert audio_path(b"bytes") is None
