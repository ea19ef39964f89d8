"""Long recordings with bounded memory: the log-mel front end and the encoder run over windows of chunks.

[`M2D2AudioModel`] encodes a clip as independent `chunk_frames`-frame chunks (1001 frames = 10 s for the 2025
model), and its forward puts every chunk of every clip into one batch: ideal for short clips, but an hour of audio
would mean the activations of 360 chunks and a 580 MB STFT at once. `embed_long_audio` instead walks the
recording `chunks_per_window` chunks at a time:

- the log-mel of a window is computed from the waveform samples its STFT frames actually read (the frames near a
  cut need `n_fft // 2` samples of the neighbouring window, and only the clip's two ends are reflect-padded), so it
  equals the whole clip's log-mel (bit for bit on the CPU: each window is computed over at least one chunk of
  frames, which keeps torch on the same convolution and matmul kernels as the whole clip);
- each window's chunks are encoded in one batched forward; since windows start on chunk boundaries, every chunk is
  exactly the chunk the whole-clip forward would have encoded;
- the clip embedding (mean of the frame features) is accumulated in float64;
- the CLAP audio embedding of [`M2D2ClapModel`] is streamed too: the released semantic projector is one transformer
  block whose output is read at its learned token only, so its attention needs that token's query against the keys
  and values of all patch tokens. These are folded window by window into an online softmax (running maximum, sum and
  weighted value sum, in float64), so the patch tokens of the whole recording are never held. Projectors with more
  than one block (not the released geometry) fall back to collecting all tokens; the MLP projector averages them.

Only the waveform (230 MB for an hour at 16 kHz in float32) and the outputs you ask for are held for the whole clip:
the frame features of an hour (22,299 x 3840 values) take 171 MB in bf16 and 343 MB in fp32; pass
`return_frame_features=False` to keep just the embeddings. The results equal the model's whole-clip forward
within float rounding (tested at 1e-5 relative; the encoder outputs are usually bit for bit the same). An hour on a
2-core CPU: about 64 s with a bf16 M2D2ClapModel at a peak RSS under 1.9 GB (benchmarks/bench_long_audio.py).
"""

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
from transformers.utils import ModelOutput

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


class WindowedLogMel:
    """The normalised log-mel of frames `[start, end)` of one waveform, equal to the same frames of the whole clip's
    `M2D2FeatureExtractor` output.

    Frame `i` reads the samples `[i * hop - n_fft // 2, i * hop - n_fft // 2 + n_fft)` of the clip (the whole-clip
    front end reflect-pads `n_fft // 2` samples at both ends): a window takes exactly those samples of its frames,
    reflect-padding only where it touches an end of the clip.
    """

    def __init__(self, feature_extractor: M2D2FeatureExtractor, waveform: torch.Tensor, min_frames: int = 1001):
        if waveform.ndim != 1:
            raise ValueError(f"WindowedLogMel takes one 1-D waveform, got shape {tuple(waveform.shape)}")
        if feature_extractor.n_fft % 2:
            raise ValueError("windowed log-mel needs an even n_fft (the frame count formula assumes it)")
        self.fe = feature_extractor
        self.waveform = waveform
        self.num_frames = feature_extractor.num_frames(waveform.shape[-1])
        # Windows are computed over at least this many frames (cropped afterwards): a handful of frames would run
        # torch's matmul / convolution on other kernels than the whole clip's, which round differently (~1 ulp).
        self.min_frames = min_frames

    def __call__(self, start: int, end: int) -> torch.Tensor:
        """`[feature_size, end - start]` normalised float32 log-mel of frames `[start, end)`."""
        if not 0 <= start < end <= self.num_frames:
            raise ValueError(f"frames [{start}, {end}) are outside the clip's {self.num_frames} frames")
        first = max(0, min(start, end - self.min_frames))
        hop, pad, length = self.fe.hop_length, self.fe.n_fft // 2, self.waveform.shape[-1]
        begin, stop = first * hop - pad, (end - 1) * hop - pad + self.fe.n_fft
        samples = self.waveform[max(begin, 0) : min(stop, length)]
        left, right = max(0, -begin), max(0, stop - length)
        if left or right:
            samples = F.pad(samples.view(1, 1, -1), (left, right), mode="reflect").view(-1)
        log_mel = self.fe._log_mel_of_padded(samples.float()[None])[0]
        return self.fe.normalize(log_mel[:, start - first :])


class _SemanticProjectorStream:
    """A one-block semantic projector fed window by window: the learned token's attention over all patch tokens as
    an online softmax, then the block's MLP and the final LayerNorm, on that token only (the only output read)."""

    def __init__(self, projector: torch.nn.Module):
        layer = projector.layers[0]
        attention = layer.attention
        self.projector, self.layer = projector, layer
        self.heads, self.head_dim, self.scaling = attention.num_attention_heads, attention.head_dim, attention.scaling
        dim = self.heads * self.head_dim
        weight, bias = attention.qkv.weight, attention.qkv.bias
        self.query_weight, self.key_value_weight = weight[:dim], weight[dim:]
        self.query_bias = None if bias is None else bias[:dim]
        self.key_value_bias = None if bias is None else bias[dim:]
        self.token = projector.sem_token[0]  # [1, D]
        normed = layer.norm1(self.token)
        # [H, 1, head_dim] in float64 for the accumulation.
        self.query = F.linear(normed, self.query_weight, self.query_bias).view(self.heads, 1, self.head_dim).double()
        self.max = torch.full((self.heads, 1, 1), -torch.inf, dtype=torch.float64, device=normed.device)
        self.denominator = torch.zeros((self.heads, 1, 1), dtype=torch.float64, device=normed.device)
        self.numerator = torch.zeros((self.heads, 1, self.head_dim), dtype=torch.float64, device=normed.device)
        self.add(self.token)  # the learned token attends to itself too

    def add(self, tokens: torch.Tensor) -> None:
        """Folds the keys and values of `tokens` [n, D] (patch tokens of one window) into the softmax state."""
        key_value = F.linear(self.layer.norm1(tokens), self.key_value_weight, self.key_value_bias)
        key, value = key_value.view(-1, 2, self.heads, self.head_dim).permute(1, 2, 0, 3).double().unbind(0)
        scores = self.query @ key.transpose(1, 2) * self.scaling  # [H, 1, n]
        new_max = torch.maximum(self.max, scores.amax(-1, keepdim=True))
        rescale = torch.exp(self.max - new_max)
        weights = torch.exp(scores - new_max)
        self.denominator = self.denominator * rescale + weights.sum(-1, keepdim=True)
        self.numerator = self.numerator * rescale + weights @ value
        self.max = new_max

    def finish(self) -> torch.Tensor:
        """The L2-normalised projector output [1, projection_dim]."""
        dtype = self.token.dtype
        attended = (self.numerator / self.denominator).to(dtype).reshape(1, -1)
        hidden = self.token + self.layer.attention.proj(attended)
        hidden = hidden + self.layer.mlp(self.layer.norm2(hidden))
        return F.normalize(self.projector.layernorm(hidden), dim=-1)


def _as_waveform(
    feature_extractor: M2D2FeatureExtractor, audio: Any, sampling_rate: int | None, mono: bool
) -> torch.Tensor:
    clips = feature_extractor._to_clips(audio, mono)
    if len(clips) != 1:
        raise ValueError(f"embed_long_audio takes one recording, got a batch of {len(clips)}: call it per clip")
    clip = clips[0]
    if sampling_rate is not None and int(sampling_rate) != feature_extractor.sampling_rate:
        clip = torchaudio.functional.resample(clip, int(sampling_rate), feature_extractor.sampling_rate)
    if clip.shape[-1] < feature_extractor.min_samples:
        raise ValueError(
            f"the recording has {clip.shape[-1]} samples at {feature_extractor.sampling_rate} Hz, fewer than one "
            f"patch ({feature_extractor.min_samples} samples)"
        )
    return clip


def _chunk_columns(num_frames: int, chunk_frames: int, patch_width: int) -> list[int]:
    """Patch columns of each chunk, as `ChunkLayout` plans them."""
    columns = []
    for start in range(0, num_frames, chunk_frames):
        frames = min(chunk_frames, num_frames - start)
        columns.append(min(-(-frames // patch_width) * patch_width, chunk_frames) // patch_width)
    return columns


@torch.inference_mode()
def embed_long_audio(
    model: torch.nn.Module,
    audio: np.ndarray | torch.Tensor | list[float],
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
            extractor. The waveform is resampled once (whole) if `sampling_rate` differs from the model's.
        sampling_rate (`int`, *optional*): rate of `audio`; the model's rate if omitted.
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
    from .modeling_m2d2 import M2D2AudioModel, M2D2ClapModel, M2D2MLPProjector

    if isinstance(model, M2D2ClapModel):
        encoder, projector = model.audio_model, model.audio_projection
    elif isinstance(model, M2D2AudioModel):
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
    device = encoder.device
    waveform = _as_waveform(feature_extractor, audio, sampling_rate, mono)
    if waveform.device != device:
        waveform = waveform.to(device)
    log_mel = WindowedLogMel(feature_extractor, waveform, min_frames=config.chunk_frames)
    total_frames = log_mel.num_frames

    patch_width, rows = config.patch_size[1], config.frequency_patches
    columns = _chunk_columns(total_frames, config.chunk_frames, patch_width)
    dtype = encoder.layernorm.weight.dtype
    frame_features = last_hidden_state = None
    if return_frame_features:
        frame_features = torch.empty(1, sum(columns), config.frame_feature_size, dtype=dtype, device=device)
    if return_last_hidden_state:
        last_hidden_state = torch.empty(1, rows * sum(columns), config.hidden_size, dtype=dtype, device=device)

    semantic = projector is not None and not isinstance(projector, M2D2MLPProjector)
    stream = _SemanticProjectorStream(projector) if semantic and len(projector.layers) == 1 else None
    collected_tokens = [] if semantic and stream is None else None
    frame_sum = torch.zeros(config.frame_feature_size, dtype=torch.float64, device=device)
    token_sum = torch.zeros(config.hidden_size, dtype=torch.float64, device=device)

    window_frames = chunks_per_window * config.chunk_frames
    frame_offset = token_offset = 0
    for start in range(0, total_frames, window_frames):
        end = min(start + window_frames, total_frames)
        outputs = encoder(log_mel(start, end)[None])
        frames, tokens = outputs.frame_features[0], outputs.last_hidden_state[0]
        frame_sum += frames.sum(0, dtype=torch.float64)
        if frame_features is not None:
            frame_features[0, frame_offset : frame_offset + len(frames)] = frames
        if last_hidden_state is not None:
            last_hidden_state[0, token_offset : token_offset + len(tokens)] = tokens
        if stream is not None:
            stream.add(tokens)
        elif collected_tokens is not None:
            collected_tokens.append(tokens)
        elif projector is not None:
            token_sum += tokens.sum(0, dtype=torch.float64)
        frame_offset += len(frames)
        token_offset += len(tokens)

    audio_embeds = None
    if stream is not None:
        audio_embeds = stream.finish()
    elif collected_tokens is not None:
        audio_embeds = F.normalize(projector(torch.cat(collected_tokens)[None]), dim=-1)
    elif projector is not None:
        audio_embeds = F.normalize(projector((token_sum / token_offset).to(dtype)[None, None]), dim=-1)
    return M2D2LongAudioOutput(
        pooler_output=(frame_sum / frame_offset).to(dtype)[None],
        frame_features=frame_features,
        audio_embeds=audio_embeds,
        last_hidden_state=last_hidden_state,
    )


__all__ = ["M2D2LongAudioOutput", "WindowedLogMel", "embed_long_audio"]
