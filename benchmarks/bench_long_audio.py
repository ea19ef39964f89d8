"""Long audio with the ViT-B M2D2 encoder (random weights).

1. A 60 s clip: all its 1001-frame chunks packed into one batched forward (`M2D2AudioModel`) against encoding the
   chunks one after another (the original runtime's loop), fp32, with the outputs checked to agree (<= 1e-5 rel);
   both again after `optimize_for_cpu_inference` (prepacked Linear weights).
2. A 1-hour recording (a 16 kHz FLAC file) through each documented path, each in a fresh process: the file given
   to `embed_long_audio` (read a window at a time), the file decoded whole then `embed_long_audio` on the array,
   and decoded whole then feature extractor + one forward; CLAP model in bf16 tuned by `optimize_for_cpu_inference`
   by default. Peak RSS and throughput as x real time.

    python benchmarks/bench_long_audio.py [--repeats 5] [--minutes 60] [--hour-dtype bf16] [--hour-model clap]
        [--chunks-per-window 8] [--no-hour-optimize] [--hour-paths file,array,features]
"""

import argparse
import copy
import json
import math
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import count_flops, describe_machine, interleaved_seconds, matmul_peak_fn, peak_rss_bytes

from m2d2_hf import M2D2AudioConfig, M2D2AudioModel, M2D2FeatureExtractor, optimize_for_cpu_inference


SAMPLING_RATE = 16000


def synthetic_audio(seconds: float, seed: int = 0) -> torch.Tensor:
    """Noise under a slowly varying envelope plus a few tones: a float32 waveform at 16 kHz, made in place."""
    generator = torch.Generator().manual_seed(seed)
    samples = int(seconds * SAMPLING_RATE)
    wave = torch.empty(samples)
    block = SAMPLING_RATE * 60  # one minute at a time keeps the temporaries small
    for start in range(0, samples, block):
        t = torch.arange(start, min(start + block, samples), dtype=torch.float64) / SAMPLING_RATE
        envelope = 0.05 + 0.05 * torch.sin(2 * math.pi * t / 7.3) ** 2
        tones = 0.1 * torch.sin(2 * math.pi * 440 * t) * (torch.sin(2 * math.pi * t / 3.1) > 0)
        noise = torch.randn(len(t), generator=generator)
        wave[start : start + len(t)] = noise * envelope.float() + tones.float()
    return wave


def encode_chunk_by_chunk(model: M2D2AudioModel, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The original runtime's way for one clip [1, F, T]: zero-pad to whole patches, then encode each
    `chunk_frames`-frame chunk in its own forward and concatenate (tokens, frame features)."""
    unit, width = model.config.chunk_frames, model.config.patch_size[1]
    frames = features.shape[-1]
    padded = torch.nn.functional.pad(features, (0, (width - frames % unit % width) % width))
    tokens, frame_features = [], []
    for start in range(0, frames, unit):
        out = model(padded[..., start : start + unit])
        tokens.append(out.last_hidden_state)
        frame_features.append(out.frame_features)
    return torch.cat(tokens, 1), torch.cat(frame_features, 1)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def packed_vs_sequential(repeats: int) -> None:
    torch.manual_seed(0)
    model = M2D2AudioModel(M2D2AudioConfig()).eval()
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    optimized = optimize_for_cpu_inference(copy.deepcopy(model))
    features = M2D2FeatureExtractor()(synthetic_audio(60.0), sampling_rate=SAMPLING_RATE, return_tensors="pt")
    frames = features["input_features"].shape[-1]
    chunks = math.ceil(frames / model.config.chunk_frames)
    with torch.inference_mode():
        packed = model(**features)
        tokens, frame_features = encode_chunk_by_chunk(model, features["input_features"])
        errors = {
            "tokens": relative_error(packed.last_hidden_state, tokens),
            "frame features": relative_error(packed.frame_features, frame_features),
            "clip embedding": relative_error(packed.pooler_output, frame_features.mean(1)),
        }
        optimized_error = relative_error(optimized(**features).frame_features, frame_features)
        sequential_flops = count_flops(lambda: encode_chunk_by_chunk(model, features["input_features"]))
        peak, peak_flops = matmul_peak_fn(torch.float32, kernel="onednn")
        seconds = interleaved_seconds(
            {
                "fp32 matmul peak (onednn)": peak,
                "sequential fp32": lambda: encode_chunk_by_chunk(model, features["input_features"]),
                "packed fp32": lambda: model(**features),
                "sequential fp32 optimized": lambda: encode_chunk_by_chunk(optimized, features["input_features"]),
                "packed fp32 optimized": lambda: optimized(**features),
                "packed bf16": lambda: model_bf16(**features),
            },
            repeats=repeats,
            warmup=1,
        )
        cosine = torch.nn.functional.cosine_similarity(
            model_bf16(**features).pooler_output.float(), packed.pooler_output
        ).item()
    print(f"60 s clip: {frames} frames = {chunks} chunks of {model.config.chunk_frames} frames, ViT-B fp32")
    print(
        "  packed vs chunk-by-chunk outputs, relative error: "
        + ", ".join(f"{name} {value:.1e}" for name, value in errors.items())
        + f" ({'OK' if max(errors.values()) <= 1e-5 else 'ABOVE'} the 1e-5 bound)"
    )
    base = seconds["sequential fp32"]
    peak_rate = peak_flops / seconds.pop("fp32 matmul peak (onednn)")
    for name, value in seconds.items():
        print(f"  {name:>25}: {value:6.3f} s, {60.0 / value:5.1f}x real time, {base / value:5.2f}x chunk-by-chunk")
    print(f"  packed fp32 speed-up over chunk-by-chunk fp32: {base / seconds['packed fp32']:.2f}x (target >= 2.5x)")
    # Packing cannot remove FLOPs: at equal numerics no method beats the chunks' FLOPs at the matmul peak.
    print(
        f"  chunk by chunk already runs at {sequential_flops / base / peak_rate:.0%} of the fp32 oneDNN matmul peak "
        f"({peak_rate / 1e9:.0f} GFLOP/s, same run): {sequential_flops / 1e9:.0f} GFLOP at that peak would take "
        f"{sequential_flops / peak_rate:.2f} s, a {base * peak_rate / sequential_flops:.2f}x ceiling for any fp32 "
        "method"
    )
    print(
        f"  packed fp32 after optimize_for_cpu_inference (frame features {optimized_error:.1e} rel. to chunk by "
        f"chunk): {base / seconds['packed fp32 optimized']:.2f}x; like for like, packing gains "
        f"{seconds['sequential fp32 optimized'] / seconds['packed fp32 optimized']:.2f}x"
    )
    print(f"  packed bf16 (cosine {cosine:.5f} to fp32, not the 1e-5 bound): {base / seconds['packed bf16']:.2f}x")


# The documented ways to embed a recording, each measured in a fresh process on the same 1-hour FLAC file:
# "file": `model.embed_long_audio(path)`, read a window at a time; "array": the file decoded whole
# (`decode_audio`), then `model.embed_long_audio(wave, rate)`; "features": decoded whole, then the feature extractor
# and one forward (`get_audio_features` / the audio model), the short-clip path.
HOUR_PATHS = ("file", "array", "features")


@dataclass(frozen=True)
class HourSettings:
    """How the hour is embedded (the `--hour-*` options), passed on to each worker process."""

    dtype_name: str
    chunks_per_window: int
    model_name: str
    optimize: bool
    frame_features_wanted: bool

    def worker_arguments(self) -> list[str]:
        return [
            "--hour-dtype",
            self.dtype_name,
            "--chunks-per-window",
            str(self.chunks_per_window),
            "--hour-model",
            self.model_name,
            "--hour-optimize" if self.optimize else "--no-hour-optimize",
            "--hour-frame-features" if self.frame_features_wanted else "--no-hour-frame-features",
        ]


def hour_worker(audio_file: str, path_name: str, settings: HourSettings) -> None:
    """Runs in its own process so that its peak RSS is one path's alone; prints one JSON line."""
    dtype_name, chunks_per_window, model_name = settings.dtype_name, settings.chunks_per_window, settings.model_name
    optimize, frame_features_wanted = settings.optimize, settings.frame_features_wanted
    from m2d2_hf import M2D2ClapModel, M2D2Config
    from m2d2_hf.training.data import decode_audio

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    after_import = peak_rss_bytes()
    torch.manual_seed(0)
    if model_name == "clap":
        model = M2D2ClapModel._from_config(M2D2Config(), dtype=dtype).eval()
        audio_config = model.config.audio_config
    else:
        model = M2D2AudioModel._from_config(M2D2AudioConfig(), dtype=dtype).eval()
        audio_config = model.config
    if optimize:
        optimize_for_cpu_inference(model)
    after_model = peak_rss_bytes()
    start = time.perf_counter()
    with torch.inference_mode():
        if path_name == "file":
            out = model.embed_long_audio(
                audio_file, chunks_per_window=chunks_per_window, return_frame_features=frame_features_wanted
            )
            outputs = [out.pooler_output, out.frame_features]
        else:
            wave = decode_audio(audio_file, sampling_rate=SAMPLING_RATE, max_seconds=None)
            if path_name == "array":
                out = model.embed_long_audio(
                    wave,
                    SAMPLING_RATE,
                    chunks_per_window=chunks_per_window,
                    return_frame_features=frame_features_wanted,
                )
                outputs = [out.pooler_output, out.frame_features]
            else:
                features = M2D2FeatureExtractor.from_audio_config(audio_config)(
                    wave, sampling_rate=SAMPLING_RATE, return_tensors="pt"
                )
                encode = model.get_audio_features if model_name == "clap" else model
                out = encode(**features)
                outputs = [out.pooler_output, out.frame_features]
    elapsed = time.perf_counter() - start
    num_frames = M2D2FeatureExtractor().num_frames(round(sf_frames(audio_file)))
    report = {
        "path": path_name,
        "minutes": sf_frames(audio_file) / SAMPLING_RATE / 60,
        "dtype": dtype_name,
        "chunks_per_window": chunks_per_window,
        "model": type(model).__name__,
        "optimized": optimize,
        "chunks": math.ceil(num_frames / audio_config.chunk_frames),
        "seconds": elapsed,
        "peak_rss": peak_rss_bytes(),
        "rss_after_import": after_import,
        "rss_after_model": after_model,
        "waveform_bytes": sf_frames(audio_file) * 4,
        "frame_features_bytes": sum(t.numel() * t.element_size() for t in outputs[1:] if t is not None),
        "embeddings_finite": all(bool(torch.isfinite(t).all()) for t in outputs if t is not None),
    }
    print(json.dumps(report))


def sf_frames(audio_file: str) -> int:
    import soundfile as sf

    return sf.info(audio_file).frames


def write_recording(minutes: float, folder: str) -> str:
    """The synthetic recording as a 16 kHz FLAC file, written a minute at a time."""
    import soundfile as sf

    path = str(Path(folder) / "recording.flac")
    wave = synthetic_audio(minutes * 60).numpy()
    with sf.SoundFile(path, "w", SAMPLING_RATE, 1, subtype="PCM_16") as handle:
        for start in range(0, len(wave), SAMPLING_RATE * 60):
            handle.write(wave[start : start + SAMPLING_RATE * 60])
    return path


def one_hour(minutes: float, paths: list[str], settings: HourSettings) -> None:
    import tempfile

    dtype_name, chunks_per_window, model_name = settings.dtype_name, settings.chunks_per_window, settings.model_name
    optimize, frame_features_wanted = settings.optimize, settings.frame_features_wanted

    mb = 1 / 2**20
    with tempfile.TemporaryDirectory() as folder:
        audio_file = write_recording(minutes, folder)
        print(
            f"{minutes:g} min recording (16 kHz FLAC), {model_name} model {dtype_name}"
            f"{' optimized for CPU inference' if optimize else ''}, {chunks_per_window} chunks per window, "
            f"{'frame features + ' if frame_features_wanted else ''}clip embeddings (embed_long_audio), each path in "
            "a fresh process (target: peak RSS < 1.5 GB on every path)"
        )
        for path_name in paths:
            command = [sys.executable, str(Path(__file__).resolve()), "--hour-worker", audio_file, "--hour-paths"]
            command += [path_name, *settings.worker_arguments()]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                # A worker killed by a signal (the kernel's OOM killer sends SIGKILL) leaves no traceback.
                last_line = result.stderr.strip().splitlines()[-1:] or [
                    f"killed by {signal.Signals(-result.returncode).name}"
                    if result.returncode < 0
                    else f"exit status {result.returncode}"
                ]
                print(f"  {path_name:>8}: failed ({last_line[0]})")
                continue
            report = json.loads(result.stdout.strip().splitlines()[-1])
            print(
                f"  {path_name:>8}: peak RSS {report['peak_rss'] * mb:5.0f} MB "
                f"({'met' if report['peak_rss'] < 1.5 * 2**30 else 'NOT met'}), {report['seconds']:6.1f} s = "
                f"{report['minutes'] * 60 / report['seconds']:5.1f}x real time; after imports "
                f"{report['rss_after_import'] * mb:.0f} MB, + model {report['rss_after_model'] * mb:.0f} MB "
                f"(waveform {report['waveform_bytes'] * mb:.0f} MB, frame features "
                f"{report['frame_features_bytes'] * mb:.0f} MB)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--minutes", type=float, default=60.0, help="length of the long recording")
    parser.add_argument("--hour-dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument(
        "--hour-model",
        choices=("clap", "audio"),
        default="clap",
        help="M2D2ClapModel (with its BERT text tower) or the audio encoder alone",
    )
    parser.add_argument("--chunks-per-window", type=int, default=8)
    parser.add_argument(
        "--hour-optimize",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="apply optimize_for_cpu_inference to the hour's model",
    )
    parser.add_argument(
        "--hour-frame-features",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="embed_long_audio also returns the frame features (171 MB in bf16 for an hour)",
    )
    parser.add_argument("--skip-60s", action="store_true")
    parser.add_argument("--skip-hour", action="store_true")
    parser.add_argument(
        "--hour-paths",
        default=",".join(HOUR_PATHS),
        help=f"comma-separated ways to embed the hour, of {HOUR_PATHS}",
    )
    parser.add_argument("--hour-worker", metavar="AUDIO_FILE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    paths = [name.strip() for name in args.hour_paths.split(",") if name.strip()]
    if unknown := sorted(set(paths) - set(HOUR_PATHS)):
        parser.error(f"unknown --hour-paths {unknown}: choose from {HOUR_PATHS}")
    settings = HourSettings(
        args.hour_dtype, args.chunks_per_window, args.hour_model, args.hour_optimize, args.hour_frame_features
    )
    if args.hour_worker:
        (path_name,) = paths
        hour_worker(args.hour_worker, path_name, settings)
        return
    print(f"machine: {describe_machine()}")
    if not args.skip_60s:
        packed_vs_sequential(args.repeats)
    if not args.skip_hour:
        one_hour(args.minutes, paths, settings)


if __name__ == "__main__":
    main()
