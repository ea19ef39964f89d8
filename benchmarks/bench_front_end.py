"""The log-mel front end on 8 x 10 s clips: `M2D2FeatureExtractor` against a plain conv1d Fourier-kernel log-mel
written here (the original runtime's approach: nnAudio-style STFT as two strided convolutions, one with cosine and
one with sine kernels) and against transformers' `ClapFeatureExtractor` on the same audio at 48 kHz.

    python benchmarks/bench_front_end.py [--repeats 7]

All three take the clips as a list of float32 numpy arrays and return a torch tensor; resampling to 48 kHz for
`ClapFeatureExtractor` happens before the timing. Contenders are timed round-robin (median of `--repeats` rounds).
"""

import argparse
import math

import numpy as np
import torch
import torch.nn.functional as F
from common import describe_machine, interleaved_seconds

from m2d2_hf import M2D2FeatureExtractor
from m2d2_hf.feature_extraction_m2d2 import slaney_mel_filter_bank


class Conv1dLogMel:
    """A straightforward log-mel as the original's nnAudio front end computes it: reflect padding, STFT as two conv1d
    with windowed cosine and sine kernels, magnitude raised to the power 2, Slaney mel matrix, natural log with a
    float32-eps floor, dataset normalisation."""

    def __init__(
        self,
        n_fft: int = 400,
        hop: int = 160,
        n_mels: int = 80,
        sampling_rate: int = 16000,
        f_min: float = 50.0,
        f_max: float = 8000.0,
        norm_stats: tuple[float, float] = (-7.1, 4.2),
    ):
        n = torch.arange(n_fft, dtype=torch.float64)
        window = 0.5 - 0.5 * torch.cos(2 * math.pi * n / n_fft)
        angles = 2 * math.pi * torch.arange(n_fft // 2 + 1, dtype=torch.float64)[:, None] * n[None, :] / n_fft
        self.cos_kernels = (torch.cos(angles) * window).float()[:, None, :]
        self.sin_kernels = (torch.sin(angles) * window).float()[:, None, :]
        self.mel = torch.from_numpy(slaney_mel_filter_bank(n_mels, n_fft, sampling_rate, f_min, f_max))
        self.n_fft, self.hop, self.norm_stats = n_fft, hop, norm_stats

    def __call__(self, clips: list[np.ndarray]) -> torch.Tensor:
        x = torch.from_numpy(np.stack(clips))[:, None, :]
        x = F.pad(x, (self.n_fft // 2, self.n_fft // 2), mode="reflect")
        real = F.conv1d(x, self.cos_kernels, stride=self.hop)
        imag = F.conv1d(x, self.sin_kernels, stride=self.hop)
        power = torch.sqrt(real.pow(2) + imag.pow(2)).pow(2)  # nnAudio: magnitude, then raised to the power 2
        log_mel = torch.log(torch.matmul(self.mel, power) + torch.finfo(torch.float32).eps)
        return (log_mel - self.norm_stats[0]) / self.norm_stats[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    import torchaudio
    from transformers import ClapFeatureExtractor

    print(f"machine: {describe_machine()}")
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal(int(16000 * args.seconds)).astype(np.float32) * 0.1 for _ in range(args.clips)]
    clips48 = [torchaudio.functional.resample(torch.from_numpy(c), 16000, 48000).numpy() for c in clips]

    ours = M2D2FeatureExtractor()
    ours_fft = M2D2FeatureExtractor(stft="fft")
    plain = Conv1dLogMel()
    clap = ClapFeatureExtractor(truncation="rand_trunc")  # the unfused LAION model's front end

    with torch.inference_mode():
        reference = ours(clips, sampling_rate=16000, return_tensors="pt")["input_features"]
        difference = (plain(clips) - reference).abs().max().item()
        fft_difference = ours_fft(clips, sampling_rate=16000, return_tensors="pt")["input_features"] - reference
        fft_difference = fft_difference.abs().max().item()
        # The exact default computes its STFT on oneDNN-prepacked kernels without autograd, and with F.conv1d (the
        # original's call) under it: whether the two give the same bits on this CPU.
        wave = torch.from_numpy(np.stack(clips))
        prepacked = ours.log_mel(wave)
    with torch.enable_grad():
        conv1d = ours.log_mel(wave.clone().requires_grad_(True)).detach()
    with torch.inference_mode():
        seconds = interleaved_seconds(
            {
                "M2D2FeatureExtractor (16 kHz)": lambda: ours(clips, sampling_rate=16000, return_tensors="pt"),
                "M2D2FeatureExtractor stft=fft (16 kHz)": lambda: ours_fft(
                    clips, sampling_rate=16000, return_tensors="pt"
                ),
                "conv1d Fourier-kernel log-mel (16 kHz)": lambda: plain(clips),
                "ClapFeatureExtractor (48 kHz)": lambda: clap(clips48, sampling_rate=48000, return_tensors="pt"),
            },
            repeats=args.repeats,
            warmup=2,
            settle=0.2,
        )
    audio = args.clips * args.seconds
    print(
        f"input: {args.clips} x {args.seconds:g} s clips; the conv1d log-mel is within {difference:.1e} of ours, "
        f"stft=fft within {fft_difference:.1e} (normalised features); the prepacked STFT and F.conv1d give "
        + ("the same bits" if torch.equal(prepacked, conv1d) else f"{(prepacked - conv1d).abs().max():.1e} apart")
        + " on this CPU"
    )
    ours_t = seconds["M2D2FeatureExtractor (16 kHz)"]
    for name, value in seconds.items():
        print(
            f"{name:>40}: {value * 1000:7.1f} ms, {audio / value:7.0f}x real time, "
            f"M2D2FeatureExtractor is {value / ours_t:5.2f}x as fast"
        )
    for name in ("M2D2FeatureExtractor (16 kHz)", "M2D2FeatureExtractor stft=fft (16 kHz)"):
        own = seconds[name]
        print(
            f"{name}: vs the conv1d Fourier-kernel log-mel "
            f"{seconds['conv1d Fourier-kernel log-mel (16 kHz)'] / own:.2f}x "
            f"(target >= 1x); vs ClapFeatureExtractor {seconds['ClapFeatureExtractor (48 kHz)'] / own:.1f}x "
            "(target >= 5x)"
        )


if __name__ == "__main__":
    main()
