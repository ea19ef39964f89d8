"""Audio in, mono float32 at a rate out: the one decoder of the package (training streams, evaluations, the search
index, the command line).

A source is a path (local, or remote as streamed hub datasets give them), encoded bytes, a binary file object, a
`datasets` audio cell (undecoded `{"bytes", "path"}`, decoded `{"array", "sampling_rate"}`, or the torchcodec
`AudioDecoder` of datasets >= 4), or a float array / tensor (`[samples]` or `[channels, samples]`) with its rate.
Encoded audio is decoded with soundfile (no ffmpeg binary needed), torchcodec/FFmpeg being the fallback (m4a, or a
format the installed libsndfile lacks). Channels are averaged (the channel mean as the feature extractor takes it)
and the result is resampled with `torchaudio.functional.resample` (windowed sinc, its defaults: the resampler the
feature extractor uses). Every failure is one `AudioDecodeError`.

Encoded audio from someone else (an upload to the search page) is bounded by what it decodes to, not by its size: a
few hundred kilobytes of FLAC can hold an hour of 8-channel silence. `audio_header` reads its length, channels and
rate from the container header without decoding it, and `decode_within` refuses audio beyond `AudioLimits` before
decoding at most their length.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
import torchaudio


AUDIO_EXTENSIONS = ("flac", "wav", "mp3", "ogg", "opus", "m4a", "aac", "aiff", "aif", "au", "wma", "webm")


class AudioDecodeError(ValueError):
    """A source that cannot become a waveform; the message names the source (where it has a name) and the problem.
    Training streams keep it as the short reason of a skipped item; the command line prints it as one line."""


# ---------------------------------------------------------------------------------------------------------------------
# Files checked before any model is loaded (the command line)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AudioFile:
    """An input file as its header describes it (rate and length in samples per channel)."""

    path: Path
    sampling_rate: int
    num_samples: int


def inspect_audio_files(paths: Sequence[Path]) -> list[AudioFile]:
    """Checks that every file exists and is decodable audio (from its header) before any model is loaded.

    Raises:
        AudioDecodeError: for the first file that is missing, not a file, unreadable or empty.
    """
    files = []
    for path in paths:
        if not path.exists():
            raise AudioDecodeError(f"no such file: {path}")
        if not path.is_file():
            raise AudioDecodeError(f"not a file: {path}")
        try:
            info = sf.info(str(path))
        except (sf.SoundFileError, RuntimeError) as error:
            raise AudioDecodeError(f"cannot read audio file {path}: {error}") from error
        if info.frames < 1:
            raise AudioDecodeError(f"audio file {path} holds no samples")
        files.append(AudioFile(path, int(info.samplerate), int(info.frames)))
    return files


def read_audio(file: AudioFile) -> np.ndarray:
    """The file's samples as float32 [channels, samples], at the file's rate (for the feature extractor's own
    `mono=True` averaging)."""
    try:
        data, _ = sf.read(str(file.path), dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError) as error:
        raise AudioDecodeError(f"cannot decode audio file {file.path}: {error}") from error
    return np.ascontiguousarray(data.T)


# ---------------------------------------------------------------------------------------------------------------------
# Decoding any source
# ---------------------------------------------------------------------------------------------------------------------


def _open_bytes(path: str) -> bytes:
    """Bytes of a local or remote (hf://, https://, zip://...) file."""
    if os.path.exists(path):
        with open(path, "rb") as handle:
            return handle.read()
    from datasets.utils.file_utils import xopen  # remote paths of streamed hub datasets

    with xopen(path, "rb") as handle:
        return handle.read()


def _decode_soundfile(data: bytes, max_seconds: float | None) -> tuple[torch.Tensor, int]:
    with sf.SoundFile(io.BytesIO(data)) as handle:
        rate = handle.samplerate
        frames = -1 if max_seconds is None else int(math.ceil(max_seconds * rate))
        samples = handle.read(frames=frames, dtype="float32", always_2d=True)  # [samples, channels]
    return torch.from_numpy(np.ascontiguousarray(samples.T)), rate


def _decode_torchcodec(data: bytes, max_seconds: float | None) -> tuple[torch.Tensor, int]:
    from torchcodec.decoders import AudioDecoder

    decoder = AudioDecoder(data)
    if max_seconds is None:
        decoded = decoder.get_all_samples()
    else:
        decoded = decoder.get_samples_played_in_range(start_seconds=0.0, stop_seconds=max_seconds)
    return decoded.data, int(decoded.sample_rate)  # [channels, samples] float32


def _decode_encoded(data: bytes, max_seconds: float | None) -> tuple[torch.Tensor, int]:
    if len(data) == 0:
        raise AudioDecodeError("empty file (0 bytes)")
    try:
        return _decode_soundfile(data, max_seconds)
    except Exception as sf_error:  # noqa: BLE001 - any soundfile failure hands over to FFmpeg
        try:
            return _decode_torchcodec(data, max_seconds)
        except Exception as tc_error:  # noqa: BLE001
            raise AudioDecodeError(
                f"undecodable (soundfile: {type(sf_error).__name__}: {sf_error}; "
                f"torchcodec: {type(tc_error).__name__}: {tc_error})"
            ) from None


def _read_path(path: str, max_seconds: float | None) -> tuple[torch.Tensor, int]:
    try:
        data = _open_bytes(path)
    except Exception as error:  # noqa: BLE001 - any I/O failure is one undecodable item
        raise AudioDecodeError(f"cannot read {path}: {type(error).__name__}: {error}") from None
    try:
        return _decode_encoded(data, max_seconds)
    except AudioDecodeError as error:
        raise AudioDecodeError(f"{path}: {error}") from None


# torchaudio's windowed-sinc resampler builds one filter per output phase, new/gcd filters of orig/gcd + 2 x width
# taps: common rates need under 300k taps, but rates that share no large factor need hundreds of millions whatever
# the audio's length (16001 Hz to 16000 Hz: 256M taps, 5 GB and 16 s for a 2 s clip). Above this bound (about
# 250 MB while the filter is built) the rate is refused with the fix instead.
MAX_RESAMPLING_TAPS = 2**24


def _resampling_taps(orig: int, new: int) -> int:
    """Taps of the filter `torchaudio.functional.resample` builds (its defaults: 6 zero crossings, rolloff 0.99)."""
    gcd = math.gcd(orig, new)
    orig, new = orig // gcd, new // gcd
    width = math.ceil(6 * orig / (min(orig, new) * 0.99))
    return new * (orig + 2 * width)


def audio_path(source: Any) -> str | None:
    """The path a source names (a path, or the `path` of a `datasets` audio cell), else None."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, dict) and source.get("path"):
        return str(source["path"])
    return None


def _samples_of(source: Any, rate: int | None, max_seconds: float | None) -> tuple[torch.Tensor, int | None]:
    """([samples] or [channels, samples] float32 tensor, its rate or None for 'already at the output rate')."""
    if source is None:
        raise AudioDecodeError("no audio (empty cell)")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode_encoded(bytes(source), max_seconds)
    if isinstance(source, (str, os.PathLike)):
        return _read_path(os.fspath(source), max_seconds)
    if isinstance(source, dict):
        if source.get("bytes") is not None:
            return _decode_encoded(bytes(source["bytes"]), max_seconds)
        if source.get("array") is not None:
            return _samples_of(source["array"], source.get("sampling_rate"), max_seconds)
        if source.get("path"):
            return _read_path(str(source["path"]), max_seconds)
        raise AudioDecodeError(f"no audio (a cell with neither bytes, array nor path: keys {sorted(source)})")
    if hasattr(source, "get_all_samples"):  # torchcodec's AudioDecoder, as datasets >= 4 decodes Audio columns
        samples = source.get_all_samples()
        return samples.data, int(samples.sample_rate)
    if hasattr(source, "read"):
        return _decode_encoded(source.read(), max_seconds)
    if isinstance(source, (np.ndarray, torch.Tensor, list, tuple)):
        clip = torch.as_tensor(np.asarray(source) if isinstance(source, (list, tuple)) else source)
        if not clip.is_floating_point():
            # Casting integer PCM to float would keep its scale (int16 peaks at 32767): a silently wrong waveform.
            raise AudioDecodeError(
                f"an audio array of dtype {clip.dtype}: pass float samples in [-1, 1] (integer PCM divided by its full"
                f" scale, e.g. samples / 32768 for int16)"
            )
        return clip.float(), rate
    raise AudioDecodeError(
        f"unsupported audio source of type {type(source).__name__}: pass a path, bytes, a binary file, a datasets "
        f"audio cell or a float array with its rate"
    )


def decode_audio(
    source: Any, sampling_rate: int = 16000, *, rate: int | None = None, max_seconds: float | None = None
) -> np.ndarray:
    """
    Decode one audio source (see the module docstring) to a mono float32 waveform at `sampling_rate`.

    Args:
        source: a path, encoded bytes, a binary file object, a `datasets` audio cell or `AudioDecoder`, or a float
            array / tensor `[samples]` or `[channels, samples]`.
        sampling_rate: the output rate.
        rate: the rate of an array source (default: already `sampling_rate`); encoded sources carry their own.
        max_seconds: keep only the first `max_seconds` (encoded sources decode no further); None keeps everything.

    Non-finite samples are set to 0 when some remain finite.

    Raises:
        AudioDecodeError: for a missing, unreadable, undecodable, empty or all-NaN/Inf source, or an array of more
            than two dimensions.
    """
    clip, source_rate = _samples_of(source, rate, max_seconds)
    if clip.ndim == 2:
        clip = clip.mean(dim=0)
    if clip.ndim != 1:
        raise AudioDecodeError(f"expected audio of shape [samples] or [channels, samples], got {tuple(clip.shape)}")
    if clip.numel() == 0:
        raise AudioDecodeError("zero-length audio (0 samples)")
    finite = torch.isfinite(clip)
    if not bool(finite.all()):
        if not bool(finite.any()):
            raise AudioDecodeError("all samples are NaN/Inf")
        clip = torch.where(finite, clip, torch.zeros((), dtype=clip.dtype))
    if source_rate is not None and int(source_rate) != sampling_rate:
        taps = _resampling_taps(int(source_rate), sampling_rate)
        if taps > MAX_RESAMPLING_TAPS:
            raise AudioDecodeError(
                f"sampled at {int(source_rate)} Hz, which shares no large factor with {sampling_rate} Hz: resampling "
                f"would need a {taps / 1e6:.0f}M-tap filter; convert it to a common rate (16000, 22050, 44100 or "
                "48000 Hz) first"
            )
        clip = torchaudio.functional.resample(clip.contiguous(), int(source_rate), sampling_rate)
    if max_seconds is not None:
        clip = clip[: int(round(max_seconds * sampling_rate))]
    if clip.numel() == 0:
        raise AudioDecodeError("zero-length audio after resampling")
    return np.ascontiguousarray(clip.numpy(), dtype=np.float32)


def mono_at(file: AudioFile, sampling_rate: int) -> np.ndarray:
    """A checked file (`inspect_audio_files`) as a mono float32 waveform at `sampling_rate`."""
    return decode_audio(file.path, sampling_rate)


# ---------------------------------------------------------------------------------------------------------------------
# Headers and limits of encoded audio from someone else
# ---------------------------------------------------------------------------------------------------------------------


class AudioTooLargeError(AudioDecodeError):
    """Encoded audio whose header exceeds the `AudioLimits` it is checked against."""


@dataclass(frozen=True)
class AudioHeader:
    """What an encoded file's container header says: samples per channel (None where the header does not say, as
    in a streamed FLAC), channels and sampling rate."""

    frames: int | None
    channels: int
    sampling_rate: int

    @property
    def seconds(self) -> float | None:
        return None if self.frames is None else self.frames / self.sampling_rate


# libsndfile reports a length it does not know (a FLAC header with 0 total samples) as SF_COUNT_MAX.
_UNKNOWN_FRAMES = 2**62


def audio_header(data: bytes) -> AudioHeader:
    """The header of encoded audio, read without decoding it: soundfile's, else torchcodec's stream metadata (for
    the formats only FFmpeg reads, as `decode_audio` falls back).

    Raises:
        AudioDecodeError: for empty data, or a header neither can read or that names no channels or rate.
    """
    if len(data) == 0:
        raise AudioDecodeError("empty file (0 bytes)")
    try:
        info = sf.info(io.BytesIO(data))
        frames = None if info.frames >= _UNKNOWN_FRAMES else int(info.frames)
        header = AudioHeader(frames, int(info.channels), int(info.samplerate))
    except Exception as sf_error:  # noqa: BLE001 - any soundfile failure hands over to FFmpeg
        try:
            from torchcodec.decoders import AudioDecoder

            stream = AudioDecoder(data).metadata
            seconds = stream.duration_seconds_from_header
            rate = int(stream.sample_rate or 0)
            frames = None if seconds is None else int(math.ceil(seconds * rate))
            header = AudioHeader(frames, int(stream.num_channels or 0), rate)
        except Exception as tc_error:  # noqa: BLE001
            raise AudioDecodeError(
                f"unreadable audio header (soundfile: {type(sf_error).__name__}: {sf_error}; "
                f"torchcodec: {type(tc_error).__name__}: {tc_error})"
            ) from None
    if header.channels < 1 or header.sampling_rate < 1:
        raise AudioDecodeError(
            f"the audio header names {header.channels} channels at {header.sampling_rate} Hz: not playable audio"
        )
    return header


@dataclass(frozen=True)
class AudioLimits:
    """What encoded audio from someone else may decode to. The defaults fit a laptop: a minute of stereo at up to
    96 kHz decodes to at most 46 MB of float32 samples (about 120 MB while it is mixed down and resampled)."""

    max_seconds: float = 60.0
    max_channels: int = 2
    max_sampling_rate: int = 96_000

    def check(self, header: AudioHeader) -> None:
        """Raises `AudioTooLargeError` naming the first limit the header exceeds."""
        if header.channels > self.max_channels:
            raise AudioTooLargeError(f"{header.channels} channels, above the limit of {self.max_channels}")
        if header.sampling_rate > self.max_sampling_rate:
            raise AudioTooLargeError(
                f"sampled at {header.sampling_rate} Hz, above the limit of {self.max_sampling_rate} Hz"
            )
        if header.seconds is not None and header.seconds > self.max_seconds:
            raise AudioTooLargeError(f"{header.seconds:.1f} s long, above the limit of {self.max_seconds:g} s")


def decode_within(data: bytes, limits: AudioLimits, sampling_rate: int = 16000) -> np.ndarray:
    """Encoded audio from someone else as `decode_audio` gives it, checked against `limits` from its header first
    and decoded no further than `limits.max_seconds` (a header may understate the length, or not state it).

    Raises:
        AudioTooLargeError: when the header exceeds `limits`.
        AudioDecodeError: for an unreadable header or undecodable audio.
    """
    limits.check(audio_header(data))
    return decode_audio(data, sampling_rate, max_seconds=limits.max_seconds)


__all__ = [
    "AUDIO_EXTENSIONS",
    "MAX_RESAMPLING_TAPS",
    "AudioDecodeError",
    "AudioFile",
    "AudioHeader",
    "AudioLimits",
    "AudioTooLargeError",
    "audio_header",
    "audio_path",
    "decode_audio",
    "decode_within",
    "inspect_audio_files",
    "mono_at",
    "read_audio",
]
