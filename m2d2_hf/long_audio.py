"""Long recordings with bounded memory: the log-mel front end and the encoder run over windows of chunks.

[`M2D2AudioModel`] encodes a clip as independent `chunk_frames`-frame chunks (1001 frames = 10 s for the 2025
model), and its forward puts every chunk of every clip into one batch: ideal for short clips, but an hour of audio
would mean the activations of 360 chunks and a 580 MB STFT at once. `embed_long_audio` instead walks the
recording `chunks_per_window` chunks at a time, on the public pieces of the other modules:

- the log-mel of a window is [`M2D2FeatureExtractor.windowed_log_mel`]: computed from the waveform samples its STFT
  frames actually read, so it equals the whole clip's log-mel (bit for bit on the CPU);
- the chunks are planned by `ChunkLayout.plan_clip`, the plan the model's forward uses; windows start on chunk
  boundaries, so every chunk is exactly the chunk the whole-clip forward would have encoded;
- the clip embedding (mean of the frame features) is accumulated in float64;
- the CLAP audio embedding of [`M2D2ClapModel`] is streamed by the projector's own `streaming_pooler()`: for the
  released one-block semantic projector an online softmax of its learned token's attention, so the patch tokens of
  the whole recording are never held.

A recording given as a file path is read a window at a time ([`AudioFileSamples`]), so not even its waveform
(230 MB for an hour at 16 kHz in float32, 2.4x that while decoding it whole) is held; only the outputs you ask for
are: the frame features of an hour (22,299 x 3840 values) take 171 MB in bf16 and 343 MB in fp32; pass
`return_frame_features=False` to keep just the embeddings. The results equal the model's whole-clip forward within
float rounding (tested at 1e-5 relative; the encoder outputs are usually bit for bit the same). Figures for an hour
on a CPU: benchmarks/README.md (benchmarks/bench_long_audio.py).
"""

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .chunking import ChunkLayout
from .configuration_m2d2 import M2D2AudioConfig, M2D2Config
from .feature_extraction_m2d2 import M2D2FeatureExtractor


@dataclass
class M2D2LongAudioOutput(ModelOutput):
    r"""
    pooler_output (`torch.FloatTensor` of shape `(1, frequency_patches * hidden_size)`):
        Clip embedding: the mean of the frame features over all frames, as `M2D2AudioModel(...).pooler_output`.
    frame_features (`torch.FloatTensor` of shape `(1, num_frames, frequency_patches * hidden_size)`, *optional*):
        One feature per patch column (160 ms), as `M2D2AudioModel(...).frame_features`; `None` unless requested.
    audio_embeds (`torch.FloatTensor` of shape `(1, projection_dim)`, *optional*):
        The L2-normalised CLAP audio embedding (`M2D2ClapModel.get_audio_features(...).pooler_output`); only when a
        CLAP model is given.
    last_hidden_state (`torch.FloatTensor` of shape `(1, num_tokens, hidden_size)`, *optional*):
        All patch tokens, as `M2D2AudioModel(...).last_hidden_state`; `None` unless requested.
    """

    pooler_output: torch.FloatTensor | None = None
    frame_features: torch.FloatTensor | None = None
    audio_embeds: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None


# Container formats whose samples libsndfile seeks to exactly (PCM or lossless): read a window at a time. Other
# formats soundfile reads (MP3, Ogg) are decoded whole once, as `decode_audio` does.
_SEEKABLE_FORMATS = frozenset({"WAV", "WAVEX", "RF64", "W64", "FLAC", "AIFF", "CAF", "AU"})
# torchaudio.functional.resample's defaults: its sinc kernel reaches ceil(width * rate / (rolloff * lower rate))
# input samples either side of each output sample.
_RESAMPLE_LOWPASS_WIDTH, _RESAMPLE_ROLLOFF = 6, 0.99


class AudioFileSamples:
    """
    A mono float32 audio file at `sampling_rate`, read a span at a time with soundfile, so an hour-long file is never
    held whole: the samples equal those of decoding the whole file with `m2d2_hf.data.audio.decode_audio`
    (channels averaged in float32, non-finite samples set to 0, `torchaudio.functional.resample` with its defaults).

    A file at another rate is resampled span by span: each span is read with a margin of whole resampling periods
    beyond the sinc kernel's reach on both sides, resampled, and cropped, which gives the whole file's resampled
    samples within float rounding (~1e-7). Formats libsndfile cannot seek in exactly (MP3, Ogg) are decoded whole.

    Use as a context manager, or call `close`.
    """

    def __init__(self, path: str | os.PathLike, sampling_rate: int):
        import soundfile as sf

        self.path = os.fspath(path)
        try:
            self._file = sf.SoundFile(self.path)
        except (sf.LibsndfileError, RuntimeError, OSError) as error:
            raise ValueError(
                f"soundfile cannot read {self.path} ({error}): decode it to an array first (for example with "
                f"m2d2_hf.data.audio.decode_audio) and pass the array with its sampling_rate"
            ) from None
        self.file_rate, self.sampling_rate = self._file.samplerate, int(sampling_rate)
        divisor = math.gcd(self.file_rate, self.sampling_rate)
        # One resampling period: `period_in` file samples give `period_out` output samples.
        self._period_in, self._period_out = self.file_rate // divisor, self.sampling_rate // divisor
        reach = math.ceil(
            _RESAMPLE_LOWPASS_WIDTH * self._period_in / (_RESAMPLE_ROLLOFF * min(self._period_in, self._period_out))
        )
        self._margin_periods = -(-reach // self._period_in) + 1
        frames = self._file.frames
        self.num_samples = -(-frames * self._period_out // self._period_in)  # torchaudio's output length
        self._whole = None
        if self._file.format not in _SEEKABLE_FORMATS or not self._file.seekable():
            self._whole = self._resample(self._read_file(0, frames))
            self.num_samples = len(self._whole)
            self._file.close()

    def __enter__(self) -> "AudioFileSamples":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def read(self, begin: int, stop: int) -> torch.Tensor:
        """The samples `[begin, stop)` at `sampling_rate`, 1-D float32 on the CPU."""
        if not 0 <= begin <= stop <= self.num_samples:
            raise ValueError(f"samples [{begin}, {stop}) are outside the file's {self.num_samples} samples")
        if self._whole is not None:
            return self._whole[begin:stop]
        if self._period_in == self._period_out:
            return self._read_file(begin, stop)
        first_period = max(0, begin // self._period_out - self._margin_periods)
        last_period = -(-stop // self._period_out) + self._margin_periods
        frames = self._file.frames
        resampled = self._resample(
            self._read_file(first_period * self._period_in, min(last_period * self._period_in, frames))
        )
        offset = first_period * self._period_out
        return resampled[begin - offset : stop - offset]

    def _read_file(self, begin: int, stop: int) -> torch.Tensor:
        # decode_audio's channel mean and NaN/Inf → 0, written here again: this module ships in the folders that load
        # with trust_remote_code, which can only import the package's top-level modules, not m2d2_hf/data.
        self._file.seek(begin)
        samples = self._file.read(stop - begin, dtype="float32", always_2d=True)  # [samples, channels]
        mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] != 1 else samples[:, 0]
        return torch.from_numpy(np.where(np.isfinite(mono), mono, np.float32(0.0)))

    def _resample(self, samples: torch.Tensor) -> torch.Tensor:
        if self.file_rate == self.sampling_rate:
            return samples
        return torchaudio.functional.resample(samples, self.file_rate, self.sampling_rate)


class WindowedLogMel:
    """The normalised log-mel of frames `[start, end)` of one recording, equal to the same frames of the whole clip's
    `M2D2FeatureExtractor` output, from only the samples those frames read
    ([`~M2D2FeatureExtractor.windowed_log_mel`]).

    `waveform` is a 1-D tensor, or an [`AudioFileSamples`] (a file read a span at a time).
    """

    def __init__(
        self,
        feature_extractor: M2D2FeatureExtractor,
        waveform: torch.Tensor | AudioFileSamples,
        min_frames: int = 1001,
    ):
        if isinstance(waveform, torch.Tensor) and waveform.ndim != 1:
            raise ValueError(f"WindowedLogMel takes one 1-D waveform, got shape {tuple(waveform.shape)}")
        self.fe = feature_extractor
        self.waveform = waveform
        self.num_samples = waveform.shape[-1] if isinstance(waveform, torch.Tensor) else waveform.num_samples
        self.num_frames = feature_extractor.num_frames(self.num_samples)
        # Windows are computed over at least this many frames (see `M2D2FeatureExtractor.windowed_log_mel`).
        self.min_frames = min_frames

    def __call__(self, start: int, end: int, device: torch.device | None = None) -> torch.Tensor:
        """`[feature_size, end - start]` normalised float32 log-mel of frames `[start, end)` (on `device`, by default
        where the waveform is)."""
        begin, stop = self.fe.window_sample_range(start, end, self.num_samples, self.min_frames)
        if isinstance(self.waveform, torch.Tensor):
            samples = self.waveform[begin:stop]
        else:
            samples = self.waveform.read(begin, stop)
        if device is not None:
            samples = samples.to(device)
        return self.fe.windowed_log_mel(samples, start, end, self.num_samples, self.min_frames)


def _as_waveform(
    feature_extractor: M2D2FeatureExtractor, audio: Any, sampling_rate: int | None, mono: bool
) -> torch.Tensor:
    """The one clip of `audio`, validated as the feature extractor validates its input, at the model's rate."""
    clips = feature_extractor.to_clips(audio, mono=mono)
    if len(clips) != 1:
        raise ValueError(f"embed_long_audio takes one recording, got a batch of {len(clips)}: call it per clip")
    if sampling_rate is not None and int(sampling_rate) != feature_extractor.sampling_rate:
        return torchaudio.functional.resample(clips[0], int(sampling_rate), feature_extractor.sampling_rate)
    return clips[0]


@torch.inference_mode()
def embed_long_audio(
    model: PreTrainedModel,
    audio: np.ndarray | torch.Tensor | list[float] | str | os.PathLike | AudioFileSamples,
    sampling_rate: int | None = None,
    feature_extractor: M2D2FeatureExtractor | None = None,
    chunks_per_window: int = 8,
    return_frame_features: bool = True,
    return_last_hidden_state: bool = False,
    mono: bool = False,
) -> M2D2LongAudioOutput:
    """
    Embeds one long recording (minutes to hours) with bounded memory, equal to the model's whole-clip outputs.

    Args:
        model ([`M2D2AudioModel`] or [`M2D2ClapModel`]): the encoder; a CLAP model also gives `audio_embeds`. Any
            dtype (a `dtype=torch.bfloat16` model runs the whole encoder in bf16 on the float32 log-mel).
        audio: one clip, a 1-D array / tensor (or `[channels, samples]` with `mono=True`), as for the feature
            extractor, resampled once (whole) if `sampling_rate` differs from the model's; or the path of an audio
            file soundfile reads, which is read a window at a time (channels averaged, resampled per window; see
            [`AudioFileSamples`], which may also be passed open), so not even the waveform is held whole.
        sampling_rate (`int`, *optional*): rate of an array `audio`; the model's rate if omitted. A file carries its
            own.
        feature_extractor ([`M2D2FeatureExtractor`], *optional*): defaults to the one the model config describes.
        chunks_per_window (`int`, defaults to 8): `chunk_frames`-frame chunks encoded per forward. Peak memory grows
            with it (some 10 to 20 MB of activations per ViT-B chunk); on a CPU one chunk already keeps the matmuls
            busy, so a few chunks per window lose next to nothing against one forward over the whole clip.
        return_frame_features (`bool`, defaults to `True`): also return all frame features (1001 frames → 62).
        return_last_hidden_state (`bool`, defaults to `False`): also return all patch tokens.
        mono (`bool`, defaults to `False`): average the channels of a `[channels, samples]` clip.

    Returns:
        [`M2D2LongAudioOutput`] with `pooler_output`, and `frame_features`, `audio_embeds`, `last_hidden_state`
        where requested / available; each with a batch dimension of 1 and in the model's dtype.
    """
    # By config, not by class: the model module imports this one (its `embed_long_audio` methods).
    config = getattr(model, "config", None)
    if isinstance(config, M2D2Config):
        encoder, projector = model.audio_model, model.audio_projection
    elif isinstance(config, M2D2AudioConfig) and not hasattr(model, "audio_model"):
        encoder, projector = model, None
    else:
        raise TypeError(f"embed_long_audio takes an M2D2AudioModel or M2D2ClapModel, got {type(model).__name__}")
    if chunks_per_window < 1:
        raise ValueError(f"chunks_per_window must be at least 1, got {chunks_per_window}")
    config = encoder.config
    if feature_extractor is None:
        # The front end saved with the model (the rate, mels and `norm_stats` it was trained with).
        folder = model.config.name_or_path
        if folder:
            feature_extractor = M2D2FeatureExtractor.from_model_folder(folder, config)
        else:
            feature_extractor = M2D2FeatureExtractor.from_audio_config(config)
    if feature_extractor.feature_size != config.num_mel_bins:
        raise ValueError(
            f"the feature extractor makes {feature_extractor.feature_size} mel bins, "
            f"the model reads {config.num_mel_bins}"
        )

    def embed(waveform: torch.Tensor | AudioFileSamples) -> M2D2LongAudioOutput:
        return _embed_windows(
            encoder,
            projector,
            feature_extractor,
            waveform,
            chunks_per_window,
            return_frame_features,
            return_last_hidden_state,
        )

    if isinstance(audio, (str, os.PathLike, AudioFileSamples)):
        if sampling_rate is not None:
            raise ValueError(
                f"sampling_rate={sampling_rate} was given with an audio file: a file carries its own rate (and is "
                f"resampled to the model's); pass sampling_rate only with an array"
            )
        if isinstance(audio, AudioFileSamples):
            if audio.sampling_rate != feature_extractor.sampling_rate:
                raise ValueError(
                    f"{audio.path} is read at {audio.sampling_rate} Hz, the model takes "
                    f"{feature_extractor.sampling_rate} Hz: open it with AudioFileSamples(path, "
                    f"{feature_extractor.sampling_rate})"
                )
            return embed(audio)
        with AudioFileSamples(audio, feature_extractor.sampling_rate) as samples:
            return embed(samples)
    return embed(_as_waveform(feature_extractor, audio, sampling_rate, mono).to(encoder.device))


def _embed_windows(
    encoder: PreTrainedModel,
    projector: torch.nn.Module | None,
    feature_extractor: M2D2FeatureExtractor,
    waveform: torch.Tensor | AudioFileSamples,
    chunks_per_window: int,
    return_frame_features: bool,
    return_last_hidden_state: bool,
) -> M2D2LongAudioOutput:
    config, device = encoder.config, encoder.device
    log_mel = WindowedLogMel(feature_extractor, waveform, min_frames=config.chunk_frames)
    if log_mel.num_samples < feature_extractor.min_samples:
        raise ValueError(
            f"the recording has {log_mel.num_samples} samples at {feature_extractor.sampling_rate} Hz, fewer than "
            f"one patch ({feature_extractor.min_samples} samples)"
        )
    total_frames = log_mel.num_frames
    plan = ChunkLayout.plan_clip(total_frames, config.chunk_frames, config.patch_size[1])
    total_columns = sum(columns for _, columns in plan)
    dtype = encoder.layernorm.weight.dtype
    frame_features = last_hidden_state = None
    if return_frame_features:
        frame_features = torch.empty(1, total_columns, config.frame_feature_size, dtype=dtype, device=device)
    if return_last_hidden_state:
        rows = config.frequency_patches
        last_hidden_state = torch.empty(1, rows * total_columns, config.hidden_size, dtype=dtype, device=device)

    stream = None if projector is None else projector.streaming_pooler()
    frame_sum = torch.zeros(config.frame_feature_size, dtype=torch.float64, device=device)
    frame_offset = token_offset = 0
    # Windows start on chunk boundaries, so each window's chunks are exactly those the whole-clip forward encodes.
    for first_chunk in range(0, len(plan), chunks_per_window):
        start = plan[first_chunk][0]
        end = min(start + chunks_per_window * config.chunk_frames, total_frames)
        outputs = encoder(log_mel(start, end, device)[None])
        frames, tokens = outputs.frame_features[0], outputs.last_hidden_state[0]
        frame_sum += frames.sum(0, dtype=torch.float64)
        if frame_features is not None:
            frame_features[0, frame_offset : frame_offset + len(frames)] = frames
        if last_hidden_state is not None:
            last_hidden_state[0, token_offset : token_offset + len(tokens)] = tokens
        if stream is not None:
            stream.add(tokens)
        frame_offset += len(frames)
        token_offset += len(tokens)

    return M2D2LongAudioOutput(
        pooler_output=(frame_sum / frame_offset).to(dtype)[None],
        frame_features=frame_features,
        audio_embeds=None if stream is None else F.normalize(stream.finish(), dim=-1),
        last_hidden_state=last_hidden_state,
    )


__all__ = ["AudioFileSamples", "M2D2LongAudioOutput", "WindowedLogMel", "embed_long_audio"]
