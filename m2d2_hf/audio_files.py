"""Audio files as the `m2d2-hf` command line and the evaluations read them: checked from their headers before any model
is loaded, decoded with soundfile (no ffmpeg binary needed), averaged to mono and resampled with torchaudio's resampler
(the one the feature extractor uses)."""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio


class AudioFileError(ValueError):
    """An input audio file that is missing, not a regular file, or not decodable audio; the message names the file."""


@dataclass(frozen=True)
class AudioFile:
    """An input file as its header describes it (rate and length in samples per channel)."""

    path: Path
    sampling_rate: int
    num_samples: int


def inspect_audio_files(paths: Sequence[Path]) -> list[AudioFile]:
    """Checks that every file exists and is decodable audio (from its header) before any model is loaded.

    Raises:
        AudioFileError: for the first file that is missing, not a file, unreadable or empty.
    """
    files = []
    for path in paths:
        if not path.exists():
            raise AudioFileError(f"no such file: {path}")
        if not path.is_file():
            raise AudioFileError(f"not a file: {path}")
        try:
            info = sf.info(str(path))
        except (sf.SoundFileError, RuntimeError) as error:
            raise AudioFileError(f"cannot read audio file {path}: {error}") from error
        if info.frames < 1:
            raise AudioFileError(f"audio file {path} holds no samples")
        files.append(AudioFile(path, int(info.samplerate), int(info.frames)))
    return files


def read_audio(file: AudioFile) -> np.ndarray:
    """The file's samples as float32 [channels, samples] (soundfile gives [samples, channels])."""
    try:
        data, _ = sf.read(str(file.path), dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError) as error:
        raise AudioFileError(f"cannot decode audio file {file.path}: {error}") from error
    return np.ascontiguousarray(data.T)


def resample_to_mono(samples: np.ndarray | torch.Tensor, rate: int, sampling_rate: int) -> np.ndarray:
    """[samples] or [channels, samples] float audio at `rate` → mono float32 at `sampling_rate`: the channel mean,
    then torchaudio's resampler (the one the feature extractor uses)."""
    clip = torch.as_tensor(samples, dtype=torch.float32)
    if clip.ndim == 2:
        clip = clip.mean(dim=0)
    if clip.ndim != 1:
        raise ValueError(f"expected audio of shape [samples] or [channels, samples], got {tuple(clip.shape)}")
    if int(rate) != sampling_rate:
        clip = torchaudio.functional.resample(clip, int(rate), sampling_rate)
    return clip.numpy()


def mono_at(file: AudioFile, sampling_rate: int) -> np.ndarray:
    """The file averaged to mono and resampled as the feature extractor would (decoding here spares the ffmpeg
    binary the pipeline needs for paths)."""
    return resample_to_mono(read_audio(file), file.sampling_rate, sampling_rate)


__all__ = ["AudioFile", "AudioFileError", "inspect_audio_files", "mono_at", "read_audio", "resample_to_mono"]
