"""Log-mel front end of M2D2 (M2D-CLAP 2025): waveforms in, normalised log-mel spectrograms out.

The numbers reproduce the original runtime's nnAudio front end on the CPU bit for bit (clips of 1 s: within 6e-4, see
`M2D2FeatureExtractor._log_mel_of_padded`): the STFT is a strided `conv1d` with float32 windowed Fourier kernels (not
`torch.stft`, whose FFT rounds differently and moves near-silent bins by up to ~1e-3 in log space), the power is
`sqrt(re² + im²)²`, the mel matrix is librosa's Slaney filter bank and the log is `ln(mel + 2**-23)`.
"""

import copy
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
from transformers import BatchFeature, SequenceFeatureExtractor
from transformers.utils import FEATURE_EXTRACTOR_NAME, PROCESSOR_NAME, TensorType, logging

from .configuration_m2d2 import auto_map_kept_on_disk_only, is_installed_package_object, is_own_auto_map


# Dataset statistics the original loaders fall back to for weights saved without `norm_stats` (2022 releases).
DEFAULT_NORM_STATS = (-7.1, 4.2)


logger = logging.get_logger(__name__)

# Natural-log floor of the original front end: `torch.finfo(torch.float32).eps`.
LOG_OFFSET = 2.0**-23

# Smallest single-clip conv1d input that torch's CPU heuristic sends to oneDNN (see `_log_mel_of_padded`).
_ONEDNN_MIN_SAMPLES = 20481

# How the STFT is computed: the original's Fourier-kernel conv1d (bit-exact), or torch.stft (faster, <= 6e-4 apart).
STFT_METHODS = ("conv1d", "fft")

# Attributes derived from the settings; rebuilt by `__init__`, so never written to preprocessor_config.json.
_CACHE_ATTRIBUTES = ("_kernels", "_packed_fourier")

# Integer PCM formats: (offset, full scale), sample value = (pcm - offset) / full scale. 8-bit WAV is unsigned offset
# binary (scipy.io.wavfile returns it as uint8, silence = 128); the wider formats are two's complement.
_PCM_SCALES = {
    torch.uint8: (128.0, 128.0),
    torch.int8: (0.0, 128.0),
    torch.int16: (0.0, 32768.0),
    torch.int32: (0.0, 2.0**31),
}


def _onednn_convolution_available() -> bool:
    """Whether torch runs CPU convolutions on oneDNN and has the prepacked-weight convolution op inductor uses."""
    return (
        torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight")
    )


@contextmanager
def _ieee_float32(device: torch.device) -> Iterator[None]:
    """Run float32 CUDA convolutions and matmuls in full precision (cuDNN convolutions default to TF32)."""
    if device.type != "cuda":
        yield
        return
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved


# Slaney mel scale: linear (200/3 Hz per mel) below 1 kHz, logarithmic (factor 6.4 per 27 mels) above.
_SLANEY_HZ_PER_MEL = 200.0 / 3.0
_SLANEY_LOG_START_HZ = 1000.0
_SLANEY_LOG_START_MEL = _SLANEY_LOG_START_HZ / _SLANEY_HZ_PER_MEL
_SLANEY_LOG_STEP = math.log(6.4) / 27.0


def _hz_to_mel_slaney(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    mels = hz / _SLANEY_HZ_PER_MEL
    above = hz >= _SLANEY_LOG_START_HZ
    mels[above] = _SLANEY_LOG_START_MEL + np.log(hz[above] / _SLANEY_LOG_START_HZ) / _SLANEY_LOG_STEP
    return mels


def _mel_to_hz_slaney(mels: np.ndarray) -> np.ndarray:
    mels = np.asarray(mels, dtype=np.float64)
    hz = mels * _SLANEY_HZ_PER_MEL
    above = mels >= _SLANEY_LOG_START_MEL
    hz[above] = _SLANEY_LOG_START_HZ * np.exp(_SLANEY_LOG_STEP * (mels[above] - _SLANEY_LOG_START_MEL))
    return hz


def slaney_mel_filter_bank(
    num_mel_bins: int, n_fft: int, sampling_rate: int, f_min: float, f_max: float
) -> np.ndarray:
    """
    Slaney-scale, area-normalised triangular filters as the original front end builds them (librosa's algorithm).

    The rounding steps matter for bit-exactness: band edges and triangle slopes in float64, the triangle weights
    stored into a float32 array, then scaled in place by the float64 area factor `2 / (upper edge - lower edge)`.
    `transformers.audio_utils.mel_filter_bank(norm="slaney", mel_scale="slaney")` computes the same bank in float64
    (within 1.2e-9), but its float32 cast differs from the original's by one ulp in ~0.5 % of the weights, so the
    front end keeps these steps (tests/test_library_equivalence.py).

    Returns:
        `np.ndarray` of shape `[num_mel_bins, n_fft // 2 + 1]`, float32.
    """
    fft_freqs = np.linspace(0.0, sampling_rate / 2.0, n_fft // 2 + 1)
    edge_mels = np.linspace(
        _hz_to_mel_slaney(np.array([f_min]))[0], _hz_to_mel_slaney(np.array([f_max]))[0], num_mel_bins + 2
    )
    edges = _mel_to_hz_slaney(edge_mels)
    widths = np.diff(edges)
    distance = edges[:, None] - fft_freqs[None, :]
    weights = np.zeros((num_mel_bins, n_fft // 2 + 1), dtype=np.float32)
    for i in range(num_mel_bins):
        rising = -distance[i] / widths[i]
        falling = distance[i + 2] / widths[i + 1]
        weights[i] = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights


def periodic_hann_window(n_fft: int) -> np.ndarray:
    """The periodic Hann window of the original front end, computed in float64 and rounded to float32."""
    n = np.arange(n_fft, dtype=np.float64)
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * n / n_fft)).astype(np.float32)


def windowed_fourier_kernels(n_fft: int) -> np.ndarray:
    """
    Real and imaginary STFT kernels stacked for one `conv1d`: `[2 * (n_fft // 2 + 1), 1, n_fft]`, float32.

    Rows `0..n_fft//2` are `cos(2πkn/N)·w[n]`, the next `n_fft//2 + 1` rows `sin(2πkn/N)·w[n]`, with `w` the
    periodic Hann window. As in the original, the sinusoids and the window are each computed in float64 and rounded to
    float32 first, and only then multiplied (in float32); multiplying in float64 moves the log-mel by up to 4e-4.
    """
    n = np.arange(n_fft, dtype=np.float64)
    window = periodic_hann_window(n_fft)
    angles = 2.0 * np.pi * np.arange(n_fft // 2 + 1, dtype=np.float64)[:, None] * n[None, :] / n_fft
    cos_kernels = np.cos(angles).astype(np.float32) * window
    sin_kernels = np.sin(angles).astype(np.float32) * window
    return np.concatenate([cos_kernels, sin_kernels])[:, None, :]


class M2D2FeatureExtractor(SequenceFeatureExtractor):
    r"""
    Turns raw audio into the normalised log-mel spectrograms M2D2 encoders read.

    Pipeline (all in float32 torch, on the device of torch inputs): optional channel averaging (`mono=True`),
    resampling to `sampling_rate`, reflect padding of `n_fft // 2` samples at both ends of each clip, STFT power via
    one strided `conv1d` over the whole batch, Slaney mel filter bank, `ln(mel + 2**-23)`, then
    `(log_mel - norm_stats[0]) / norm_stats[1]`. A clip of `L` samples gives `1 + L // hop_length` frames. Clips of
    a batch are padded at the end to the longest one with `padding_value` (in normalised space, where the model pads
    chunks with zeros too); `input_features_mask` marks the real frames.

    `stft="fft"` computes the same STFT power with `torch.stft` (an FFT) instead of the Fourier-kernel `conv1d`:
    faster on a CPU (see benchmarks/README.md), within 6e-4 of the default in log-mel on the real test clips (at
    near-silent bins; 3e-5 on noise; the parity contract allows 1e-3), but no longer bit-exact with the original
    runtime. The default, `"conv1d"`, is the original's computation.

    Args:
        feature_size (`int`, defaults to 80): number of mel bins (`num_mel_bins` of the model config).
        sampling_rate (`int`, defaults to 16000): rate the features are computed at; other input rates are resampled.
        n_fft (`int`, defaults to 400): STFT size and (periodic Hann) window length.
        hop_length (`int`, defaults to 160): STFT hop in samples.
        f_min, f_max (`float`, defaults to 50 and 8000): mel filter bank edges in Hz.
        norm_stats (`list[float]`, defaults to `[-7.1, 4.2]`): mean and std used to normalise the log-mel; must equal
            the model config's `norm_stats` (the 2025 release: `[-7.261779308319092, 4.3511505126953125]`).
        min_frames (`int`, defaults to 16): one patch width in frames: the outputs are at least this long. Shorter
            clips (under 0.15 s) are not refused: their frames are padded to one patch, marked as padding in
            `input_features_mask`, as the model pads a clip's last chunk (zeros in normalised space); clips of at
            most `n_fft // 2` samples get trailing zero samples first, for the reflect padding.
        padding_value (`float`, defaults to 0.0): value of the padded frames of shorter clips, in normalised space.
        return_attention_mask (`bool`, defaults to `True`): whether `__call__` returns `input_features_mask`.
        stft (`str`, defaults to `"conv1d"`): `"conv1d"` (bit-exact with the original) or `"fft"` (faster).
    """

    # Not `attention_mask`: pipelines call `model(**tokenizer_output, **feature_output)` and the tokenizer already
    # emits an `attention_mask` for the text.
    model_input_names = ["input_features", "input_features_mask"]
    # The STFT kernels in oneDNN's layout (`_fourier_conv`), made on first use.
    _packed_fourier: torch.Tensor | None = None

    def __init__(
        self,
        feature_size: int = 80,
        sampling_rate: int = 16000,
        n_fft: int = 400,
        hop_length: int = 160,
        f_min: float = 50.0,
        f_max: float = 8000.0,
        norm_stats: list[float] | tuple[float, float] = DEFAULT_NORM_STATS,
        min_frames: int = 16,
        padding_value: float = 0.0,
        return_attention_mask: bool = True,
        stft: str = "conv1d",
        **kwargs,
    ):
        if is_installed_package_object(self) and is_own_auto_map(kwargs.get("auto_map")):
            # As the configs: with the package installed, its own `auto_map` lives on disk only (`save_pretrained`
            # writes it again), so a loaded extractor's `to_dict()` is the saved one's.
            kwargs.pop("auto_map")
        super().__init__(
            feature_size=feature_size,
            sampling_rate=sampling_rate,
            padding_value=padding_value,
            return_attention_mask=return_attention_mask,
            **kwargs,
        )
        self.n_fft = int(n_fft)
        self.hop_length = int(hop_length)
        self.f_min = float(f_min)
        self.f_max = float(f_max)
        self.norm_stats = [float(v) for v in norm_stats]
        self.min_frames = int(min_frames)
        if len(self.norm_stats) != 2 or not self.norm_stats[1] > 0:
            raise ValueError(f"norm_stats must be [mean, std] with std > 0, got {self.norm_stats}")
        if not 0 <= self.f_min < self.f_max:
            raise ValueError(f"Need 0 <= f_min < f_max, got f_min={self.f_min}, f_max={self.f_max}")
        if self.min_frames < 1:
            raise ValueError(f"min_frames must be at least 1, got {self.min_frames}")
        if stft not in STFT_METHODS:
            raise ValueError(f"stft must be one of {STFT_METHODS}, got {stft!r}")
        self.stft = stft
        # float32 (Fourier kernels, Hann window, mel matrix) per device, built once on the CPU and copied to other
        # devices on first use.
        cpu = torch.device("cpu")
        self._kernels: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {
            cpu: (
                torch.from_numpy(windowed_fourier_kernels(self.n_fft)),
                torch.from_numpy(periodic_hann_window(self.n_fft)),
                torch.from_numpy(
                    slaney_mel_filter_bank(self.feature_size, self.n_fft, self.sampling_rate, self.f_min, self.f_max)
                ),
            )
        }

    @classmethod
    def from_audio_config(cls, config) -> "M2D2FeatureExtractor":
        """A front end for an [`M2D2AudioConfig`]: its mel bins and one patch minimum, and the rate, STFT, mel bank
        and `norm_stats` that a config written by an older version carried (folders saved without a
        `preprocessor_config.json` then get back the front end they were trained with); the defaults otherwise."""
        return cls(feature_size=config.num_mel_bins, min_frames=config.patch_size[1], **config.legacy_front_end)

    @classmethod
    def from_model_folder(cls, folder: str | os.PathLike, config) -> "M2D2FeatureExtractor":
        """The feature extractor saved with a model (its `preprocessor_config.json`, or its processor's); for a
        local folder an older version wrote without one, the front end its config describes
        ([`from_audio_config`]). Hub ids load as `from_pretrained`."""
        path = Path(folder)
        if path.is_dir() and not any((path / name).is_file() for name in (FEATURE_EXTRACTOR_NAME, PROCESSOR_NAME)):
            return cls.from_audio_config(config)
        return cls.from_pretrained(folder)

    def to_dict(self) -> dict[str, Any]:
        """Settings to serialise, without the derived kernels (they are rebuilt from the settings on load)."""
        output = copy.deepcopy({key: value for key, value in self.__dict__.items() if key not in _CACHE_ATTRIBUTES})
        output["feature_extractor_type"] = type(self).__name__
        return output

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> list[str]:
        """Saves `preprocessor_config.json` (with the `auto_map` for `trust_remote_code` loading); unlike
        transformers' default, saving does not add that `auto_map` to this object, so `to_dict()` is unchanged."""
        with auto_map_kept_on_disk_only(self):
            return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    @property
    def mel_basis(self) -> torch.Tensor:
        """The Slaney mel filter bank, `[feature_size, n_fft // 2 + 1]` float32 on the CPU."""
        return self._kernels[torch.device("cpu")][2]

    @property
    def min_samples(self) -> int:
        """Fewest samples (at `sampling_rate`) that give `min_frames` frames."""
        return (self.min_frames - 1) * self.hop_length + self.n_fft - 2 * (self.n_fft // 2)

    def num_frames(self, num_samples: int) -> int:
        """Frames of a clip of `num_samples` samples: `1 + num_samples // hop_length` for an even `n_fft`."""
        return 1 + (num_samples + 2 * (self.n_fft // 2) - self.n_fft) // self.hop_length

    def window_sample_range(self, start: int, end: int, num_samples: int, min_frames: int = 1) -> tuple[int, int]:
        """
        The samples `[begin, stop)` of a clip of `num_samples` samples that [`~M2D2FeatureExtractor.windowed_log_mel`]
        reads for the clip's frames `[start, end)`: a reader of a long recording supplies just these.

        Frame `i` reads the samples `[i * hop - n_fft // 2, i * hop - n_fft // 2 + n_fft)` (the whole-clip front end
        reflect-pads `n_fft // 2` samples at both ends), so a window needs `n_fft // 2` samples of its neighbours
        at each cut. It is computed over at least `min_frames` frames (extended to the left, cropped afterwards).
        """
        if self.n_fft % 2:
            raise ValueError(
                f"windowed log-mel needs an even n_fft (the frame count formula assumes it), got {self.n_fft}"
            )
        clip_frames = self.num_frames(num_samples)
        if not 0 <= start < end <= clip_frames:
            raise ValueError(f"frames [{start}, {end}) are outside the clip's {clip_frames} frames")
        begin, stop = self._padded_span(self._first_window_frame(start, end, min_frames), end)
        return max(begin, 0), min(stop, num_samples)

    def windowed_log_mel(
        self, samples: torch.Tensor, start: int, end: int, num_samples: int, min_frames: int = 1
    ) -> torch.Tensor:
        """
        Normalised log-mel of the frames `[start, end)` of a clip of `num_samples` samples, equal to the same frames
        of `__call__`'s features for the whole clip (within float rounding; bit for bit on the CPU when windows are
        at least one model chunk of frames), from only the samples the window reads.

        Args:
            samples (`torch.Tensor` of shape `[stop - begin]`): the clip's samples `[begin, stop)` at
                `self.sampling_rate`, with `(begin, stop) = self.window_sample_range(start, end, num_samples,
                min_frames)`; only the clip's two ends are reflect-padded.
            start, end (`int`): the frames wanted.
            num_samples (`int`): the length of the whole clip.
            min_frames (`int`, defaults to 1): compute at least this many frames and crop: a window of a handful of
                frames would run torch's convolution and matmul on other kernels than the whole clip's, which round
                differently (~1 ulp); long-audio embedding passes the model's `chunk_frames`.

        Returns:
            `torch.Tensor` of shape `[feature_size, end - start]`, float32, on `samples.device`.
        """
        begin, stop = self.window_sample_range(start, end, num_samples, min_frames)
        if samples.ndim != 1 or samples.shape[-1] != stop - begin:
            raise ValueError(
                f"frames [{start}, {end}) read the samples [{begin}, {stop}) of the clip: pass those "
                f"{stop - begin} samples as a 1-D tensor, got shape {tuple(samples.shape)}"
            )
        first = self._first_window_frame(start, end, min_frames)
        padded_begin, padded_stop = self._padded_span(first, end)
        left, right = max(0, -padded_begin), max(0, padded_stop - num_samples)
        samples = samples.float()
        if left or right:
            samples = F.pad(samples.view(1, 1, -1), (left, right), mode="reflect").view(-1)
        return self.normalize(self._log_mel_of_padded(samples[None])[0][:, start - first :])

    def _first_window_frame(self, start: int, end: int, min_frames: int) -> int:
        return max(0, min(start, end - min_frames))

    def _padded_span(self, first: int, end: int) -> tuple[int, int]:
        """Sample span (in clip coordinates, possibly past its ends) that frames `[first, end)` read."""
        pad = self.n_fft // 2
        return first * self.hop_length - pad, (end - 1) * self.hop_length - pad + self.n_fft

    def _kernels_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Fourier kernels, Hann window, mel matrix) on `device`."""
        if device not in self._kernels:
            self._kernels[device] = tuple(tensor.to(device) for tensor in self._kernels[torch.device("cpu")])
        return self._kernels[device]

    def _fourier_conv(self, padded: torch.Tensor, fourier: torch.Tensor) -> torch.Tensor:
        """The STFT convolution `[B, 2 * (n_fft // 2 + 1), frames]` of float32 waveforms `[B, samples]`, without
        autograd. On the CPU with oneDNN, the kernels are reordered once into oneDNN's blocked layout and the
        convolution runs as inference (`torch.ops.mkldnn._convolution_pointwise`, the op inductor's `freezing`
        uses): `F.conv1d` reorders them on every call and then its channels-first output, and ran 1.3 to 1.6x slower
        on the 2-core Xeon of `benchmarks/README.md`, with the same bits there on the fixtures and random clips
        (`bench_front_end.py` prints whether they agree on the machine it runs on)."""
        if padded.device.type != "cpu" or not _onednn_convolution_available():
            return F.conv1d(padded.unsqueeze(1), fourier, stride=self.hop_length)
        if self._packed_fourier is None:
            # The layout oneDNN picks for these kernels does not depend on the input length given here.
            shape = [1, 1, 1, _ONEDNN_MIN_SAMPLES]
            self._packed_fourier = torch.ops.mkldnn._reorder_convolution_weight(
                fourier.unsqueeze(2), [0, 0], [1, self.hop_length], [1, 1], 1, shape
            )
        spectrum = torch.ops.mkldnn._convolution_pointwise(
            padded.contiguous()[:, None, None, :],
            self._packed_fourier,
            None,
            [0, 0],
            [1, self.hop_length],
            [1, 1],
            1,
            "none",
            [],
            "",
        )
        return spectrum.squeeze(2)

    def __getstate__(self) -> dict[str, Any]:
        # oneDNN's packed kernels are opaque tensors without storage: copies and pickles repack them on first use.
        state = self.__dict__.copy()
        state.pop("_packed_fourier", None)
        return state

    def _log_mel_of_padded(self, padded: torch.Tensor) -> torch.Tensor:
        """Log-mel `[B, n_mels, frames]` of already reflect-padded float32 waveforms `[B, samples]`."""
        fourier, window, mel = self._kernels_on(padded.device)
        num_frames = self.num_frames(padded.shape[-1] - 2 * (self.n_fft // 2))
        # Mixed-precision autocast or TF32 would compute the STFT with a 7- or 10-bit mantissa and wreck the
        # near-silent bins.
        with torch.autocast(device_type=padded.device.type, enabled=False), _ieee_float32(padded.device):
            if self.stft == "fft":
                spectrum = torch.stft(
                    padded, self.n_fft, self.hop_length, window=window, center=False, return_complex=True
                )
                power = (spectrum.real.pow(2) + spectrum.imag.pow(2))[..., :num_frames]
            else:
                # On the CPU, torch runs a conv1d with a batch of 1 and at most 20480 input samples on its native
                # kernel and every other one on oneDNN; the two round differently (up to ~5e-4 in log-mel on
                # near-silent bins). Zero-padding short inputs past that size keeps every clip on oneDNN, so a clip's
                # features do not depend on its batch; oneDNN is also what the original used for all clips longer
                # than ~1.3 s.
                if padded.shape[-1] < _ONEDNN_MIN_SAMPLES:
                    padded = F.pad(padded, (0, _ONEDNN_MIN_SAMPLES - padded.shape[-1]))
                # sqrt then square (instead of re² + im² directly) rounds like the original.
                if torch.is_grad_enabled() and padded.requires_grad:
                    spectrum = F.conv1d(padded.unsqueeze(1), fourier, stride=self.hop_length)[..., :num_frames]
                    real, imag = spectrum.chunk(2, dim=1)
                    power = torch.sqrt(real.pow(2) + imag.pow(2)).pow(2)
                else:
                    # The same operations in place on the convolution's own output (x * x is what pow(2) computes):
                    # the same bits without more [B, n_fft // 2 + 1, frames] buffers to allocate and fault in.
                    real, imag = self._fourier_conv(padded, fourier)[..., :num_frames].square_().chunk(2, dim=1)
                    power = real.add_(imag).sqrt_().square_()
            log_mel = torch.matmul(mel, power)
            if torch.is_grad_enabled() and log_mel.requires_grad:
                return torch.log(log_mel + LOG_OFFSET)
            return log_mel.add_(LOG_OFFSET).log_()

    def log_mel(self, waveforms: torch.Tensor) -> torch.Tensor:
        """
        Raw (not normalised) log-mel of equal-length waveforms, differentiable and on `waveforms.device`.

        Meant for training loops that keep audio on the accelerator; equals `__call__` before normalisation.

        Args:
            waveforms (`torch.Tensor` of shape `[batch, samples]`): audio at `self.sampling_rate`, more than
                `n_fft // 2` samples long. Cast to float32.

        Returns:
            `torch.Tensor` of shape `[batch, feature_size, 1 + samples // hop_length]`, float32.
        """
        if waveforms.ndim != 2:
            raise ValueError(f"log_mel expects waveforms of shape [batch, samples], got {tuple(waveforms.shape)}")
        if waveforms.shape[-1] <= self.n_fft // 2:
            raise ValueError(
                f"log_mel needs more than {self.n_fft // 2} samples for the reflect padding, got {waveforms.shape[-1]}"
            )
        pad = self.n_fft // 2
        padded = F.pad(waveforms.float().unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
        return self._log_mel_of_padded(padded)

    def normalize(self, log_mel: torch.Tensor) -> torch.Tensor:
        """`(log_mel - norm_stats[0]) / norm_stats[1]`, the scaling the encoder was trained with."""
        return self._normalize_(log_mel.clone())

    def _normalize_(self, log_mel: torch.Tensor) -> torch.Tensor:
        """`normalize` in place, for a log-mel computed here that nothing else holds (no second buffer to fault in)."""
        return log_mel.sub_(self.norm_stats[0]).div_(self.norm_stats[1])

    def __call__(
        self,
        raw_audio: np.ndarray | torch.Tensor | list[float] | list[np.ndarray] | list[torch.Tensor],
        sampling_rate: int | None = None,
        return_tensors: str | TensorType | None = None,
        mono: bool = False,
        return_attention_mask: bool | None = None,
        **kwargs,
    ) -> BatchFeature:
        """
        Compute normalised log-mel features of one clip or a batch of clips.

        Args:
            raw_audio: one clip (a 1-D array / tensor or a list of floats), a batch of clips of any lengths (a list
                of 1-D arrays / tensors), or a batch of equal-length clips as a 2-D `[batch, samples]` array /
                tensor. Integer PCM is scaled to [-1, 1]: int16 by 1/32768, int32 by 1/2**31, int8 by 1/128 and
                uint8 (8-bit WAV) as offset binary, (x - 128) / 128; other integer types and lists of Python ints
                raise (their full scale is unknown). Float audio is cast to float32; samples beyond `max_peak`
                raise instead of giving Inf/NaN features.
            sampling_rate (`int`, *optional*): rate of `raw_audio`. Audio at another rate than
                `self.sampling_rate` is resampled (`torchaudio.functional.resample`). If omitted, the audio is
                assumed to be at `self.sampling_rate` (with a warning).
            return_tensors (`str` or [`~utils.TensorType`], *optional*): `"pt"` for torch tensors (they stay on the
                device of torch inputs, where the features are also computed), `"np"` or `None` for numpy arrays.
            mono (`bool`, defaults to `False`): multi-channel input. Each clip is then `[channels, samples]` and is
                averaged over its channels: one clip is a 2-D array, a batch is a list of 2-D arrays or a 3-D
                `[batch, channels, samples]` array (1-D clips are taken as already mono). Note that soundfile
                returns `[samples, channels]`: transpose it first.
            return_attention_mask (`bool`, *optional*): overrides `self.return_attention_mask`.
            kwargs: accepted for compatibility with generic callers (e.g. `padding=True`) and ignored: clips are
                always padded to the longest and never truncated.

        Returns:
            [`BatchFeature`] with `input_features` `[batch, feature_size, max_frames]` float32 and, if the mask is
            requested, `input_features_mask` `[batch, max_frames]` int64 (1 = real frame, 0 = padding).
        """
        if kwargs:
            logger.warning(f"M2D2FeatureExtractor ignores the keyword arguments {sorted(kwargs)}.")
        if sampling_rate is None:
            logger.warning(
                f"No sampling_rate was passed to M2D2FeatureExtractor: the audio is assumed to be at "
                f"{self.sampling_rate} Hz. Pass `sampling_rate` to have other rates resampled."
            )
        elif sampling_rate != int(sampling_rate) or sampling_rate <= 0:
            raise ValueError(f"sampling_rate must be a positive whole number of Hz, got {sampling_rate}")
        return_attention_mask = self.return_attention_mask if return_attention_mask is None else return_attention_mask

        with torch.no_grad():  # not inference_mode: its tensors could not be fed to a model that is being trained
            clips = self.to_clips(raw_audio, mono)
            if sampling_rate is not None and int(sampling_rate) != self.sampling_rate:
                clips = [
                    torchaudio.functional.resample(clip, int(sampling_rate), self.sampling_rate) for clip in clips
                ]
            # Clips too short for the reflect padding (<= n_fft // 2 samples) get trailing zeros first (F.pad copies
            # even when it adds nothing, so only those).
            shortest = self.n_fft // 2 + 1
            clips = [
                clip if clip.shape[-1] >= shortest else F.pad(clip, (0, shortest - clip.shape[-1])) for clip in clips
            ]
            features, mask = self._batch_features(clips)

        data: dict[str, Any] = {"input_features": features}
        if return_attention_mask:
            data["input_features_mask"] = mask
        if return_tensors is None or TensorType(return_tensors) != TensorType.PYTORCH:
            data = {key: value.cpu().numpy() for key, value in data.items()}
        return BatchFeature(data, tensor_type=return_tensors)

    def batch_log_mel(self, clips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Raw log-mel of clips of different lengths in one convolution, each clip as if computed alone.

        Args:
            clips: 1-D float32 waveforms at `self.sampling_rate`, all on one device (where the work happens).

        Returns:
            (`[B, feature_size, max_frames]` raw log-mel, `[B]` frames per clip). Frames past a clip's own count
            hold values of its zero padding: mask or crop them out.
        """
        pad = self.n_fft // 2
        lengths = [clip.shape[-1] for clip in clips]
        if min(lengths) <= pad:
            raise ValueError(
                f"batch_log_mel needs clips of more than {self.n_fft // 2} samples for the reflect padding, got one "
                f"of {min(lengths)}: pad short clips with trailing zeros first (as __call__ does)"
            )
        # Reflect padding is per clip, so each clip's last frames see its own reflection; the zeros after a short
        # clip's padded signal only reach frames beyond its own count (the last frame, 1 + L // hop, ends at
        # (L // hop) * hop + n_fft <= L + n_fft samples). Each clip and its two reflections are copied straight into
        # one zeroed buffer: F.pad's reflect mode on a single [1, 1, L] clip runs on one thread and cost more than
        # the STFT, and pad_sequence copied everything a second time.
        padded = clips[0].new_zeros(len(clips), max(lengths) + 2 * pad)
        for row, clip, length in zip(padded, clips, lengths, strict=True):
            row[pad : pad + length] = clip
            row[:pad] = clip[1 : pad + 1].flip(0)
            row[pad + length : length + 2 * pad] = clip[length - pad - 1 : length - 1].flip(0)
        num_frames = torch.tensor([self.num_frames(clip.shape[-1]) for clip in clips], device=padded.device)
        return self._log_mel_of_padded(padded), num_frames

    def _batch_features(self, clips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised log-mel `[B, n_mels, max_frames]` (padded with `padding_value`), frame mask `[B, max_frames]`."""
        log_mel, num_frames = self.batch_log_mel(clips)
        features = self._normalize_(log_mel)
        mask = torch.arange(features.shape[-1], device=features.device)[None, :] < num_frames[:, None]
        features.masked_fill_(~mask[:, None, :], self.padding_value)
        # Clips shorter than one patch: padded up to `min_frames` as the model pads a last chunk (frames past the
        # clip's own count are padding in the mask, which the model reads as zeros in normalised space). F.pad
        # copies even when it adds nothing, hence the test.
        short = max(0, self.min_frames - features.shape[-1])
        if short == 0:
            return features, mask.long()
        return F.pad(features, (0, short), value=self.padding_value), F.pad(mask.long(), (0, short))

    def to_clips(self, raw_audio: Any, mono: bool = False) -> list[torch.Tensor]:
        """
        The input split into 1-D float32 clips at its own rate (channels averaged if `mono`), each validated and
        scaled as `__call__` does it (integer PCM to [-1, 1]; empty, NaN / Inf and too loud clips raise): for callers
        that compute the features of a clip themselves, such as long-audio embedding.
        """
        if isinstance(raw_audio, (list, tuple)):
            if len(raw_audio) == 0:
                raise ValueError("Got an empty list: pass one clip (a 1-D array) or a list of clips.")
            if all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in raw_audio):
                items = [raw_audio]  # a list of samples is one clip
            else:
                items = list(raw_audio)
        elif isinstance(raw_audio, (np.ndarray, torch.Tensor)):
            ndim = raw_audio.ndim
            if ndim == 1 or (ndim == 2 and mono):
                items = [raw_audio]
            elif ndim == 2 or (ndim == 3 and mono):
                items = list(raw_audio)
            elif ndim == 3:
                raise ValueError(
                    f"Got audio of shape {tuple(raw_audio.shape)}: without `mono=True` the input must be one clip "
                    f"[samples] or a batch [batch, samples]. Pass `mono=True` for multi-channel audio "
                    f"[batch, channels, samples], or a list of 1-D clips."
                )
            else:
                raise ValueError(
                    f"Got audio of shape {tuple(raw_audio.shape)}: expected [samples] or [batch, samples]"
                    f"{' (or [channels, samples] / [batch, channels, samples] with mono=True)' if mono else ''}."
                )
        else:
            raise ValueError(
                f"Unsupported audio input of type {type(raw_audio).__name__}: pass a numpy array, a torch tensor, a "
                f"list of floats or a list of 1-D arrays / tensors (for a datasets Audio dict `audio`, pass "
                f"`audio['array'], sampling_rate=audio['sampling_rate']`)."
            )
        # Torch inputs are processed where they live; numpy and list inputs on the CPU.
        device = next((item.device for item in items if isinstance(item, torch.Tensor)), torch.device("cpu"))
        return [self._to_clip(item, index, mono, device) for index, item in enumerate(items)]

    def _to_clip(self, item: Any, index: int, mono: bool, device: torch.device) -> torch.Tensor:
        """One clip as a 1-D float32 tensor on `device`, scaled from integer PCM and checked for emptiness/NaN/Inf."""
        if isinstance(item, torch.Tensor):
            clip = item.detach()
            if clip.dtype == torch.bool or clip.is_complex():
                raise ValueError(f"Clip {index} has dtype {clip.dtype}: audio must be real-valued numbers.")
        else:
            array = np.asarray(item)
            if array.dtype.kind not in "iuf":
                raise ValueError(
                    f"Clip {index} is not numeric audio (numpy dtype {array.dtype}, from {type(item).__name__}): "
                    f"pass float or integer PCM samples as an array, tensor or list of numbers."
                )
            if isinstance(item, (list, tuple)) and array.dtype == np.int64:
                # numpy makes a list of Python ints int64: nothing tells their PCM width.
                raise ValueError(
                    f"Clip {index} is a list of integers, whose PCM width is unknown: pass "
                    f"np.asarray(samples, dtype=np.int16) for 16-bit PCM values (or the matching integer dtype), or "
                    f"float samples in [-1, 1]."
                )
            # torch warns about read-only arrays (e.g. zero-copy views of Arrow data) even though nothing here
            # writes to the clip; copying them is cheaper than the noise.
            clip = torch.from_numpy(np.ascontiguousarray(array) if array.flags.writeable else array.copy())
        clip = self._pcm_to_float32(clip, index).to(device)

        expected = "[channels, samples] or [samples]" if mono else "[samples]"
        if clip.ndim == 2 and mono:
            channels, samples = clip.shape
            if channels > samples:
                # More channels than samples: the layout of soundfile / librosa, [samples, channels].
                raise ValueError(
                    f"Clip {index} has shape {tuple(clip.shape)}: with mono=True a clip is [channels, samples], but "
                    f"this looks like {channels} samples of {samples} channels with the channels on the last axis "
                    f"(soundfile's [samples, channels] layout). Pass the transpose (`audio.T`)."
                )
            clip = clip.mean(dim=0)
        elif clip.ndim != 1:
            hint = "" if mono else " Pass `mono=True` for multi-channel clips."
            raise ValueError(f"Clip {index} has shape {tuple(clip.shape)}, expected {expected}.{hint}")
        if clip.numel() == 0:
            raise ValueError(f"Clip {index} is empty (0 samples): every clip needs audio samples.")
        return clip

    @property
    def max_peak(self) -> float:
        """Largest sample magnitude whose features are finite in float32 (no audio in [-1, 1] comes near it).

        An STFT bin's magnitude is at most the peak times the window's sum, so its power at most the square of that,
        and a mel band's energy at most its filter's weight sum times the largest power. The bound keeps both 16x
        below the float32 maximum (headroom for resampling overshoot and rounding); a louder input would overflow
        into Inf, and a zero mel weight times Inf into NaN.
        """
        _, window, mel = self._kernels[torch.device("cpu")]
        headroom = 16.0
        max_power = torch.finfo(torch.float32).max / headroom / max(1.0, float(mel.sum(dim=1).max()))
        return math.sqrt(max_power) / float(window.sum())

    def _pcm_to_float32(self, clip: torch.Tensor, index: int) -> torch.Tensor:
        """float32 samples from float audio (checked finite and in range) or integer PCM (scaled by its full range)."""
        if clip.dtype in _PCM_SCALES:
            offset, full_scale = _PCM_SCALES[clip.dtype]
            return (clip.float() - offset) / full_scale
        if not clip.is_floating_point():
            raise ValueError(
                f"Clip {index} has dtype {clip.dtype}, which is not a PCM sample format with a known full scale "
                f"(uint8, int8, int16 and int32 are scaled to [-1, 1]). Convert it to the integer type of its PCM "
                f"(e.g. .astype(np.int16) for 16-bit values) or to float samples in [-1, 1]."
            )
        if clip.numel() == 0:
            return clip.float()
        low, high = (float(value) for value in torch.aminmax(clip))  # NaN if any sample is NaN
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(
                f"Clip {index} contains NaN or Inf values: clean or replace them (e.g. np.nan_to_num) first."
            )
        peak = max(-low, high)
        if peak > self.max_peak:
            raise ValueError(
                f"Clip {index} peaks at {peak:g}, too loud for float32 spectra (features would be Inf or NaN above "
                f"{self.max_peak:.3g}): audio is expected in [-1, 1]; divide it by its full scale first."
            )
        return clip.float()
