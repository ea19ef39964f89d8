"""Inference on 8 x 10 s clips with the ViT-B M2D2 encoder (random weights): fp32 and bf16 FLOP/s as fractions of
the same-run matmul peak of their dtype (the best `torch.mm` rate over the encoder's own GEMM shapes, output
preallocated), bf16 (`dtype=torch.bfloat16` weights) against fp32, each
as loaded and after `optimize_for_cpu_inference`, and transformers' `ClapModel` (LAION HTSAT, the `ClapConfig()`
defaults, random weights) on the same clips at 48 kHz, all timed in one run.

    python benchmarks/bench_inference.py [--repeats 5] [--compile {none,default,freezing}] [--tune-malloc]

Contenders are timed round-robin (warm-up round, then the median of `--repeats` rounds), so all of them see the same
machine load. The features are computed once beforehand (the front end has its own benchmark).
"""

import argparse
import copy
import time

import numpy as np
import torch
from common import (
    count_flops,
    describe_machine,
    flops_by_operator,
    gemm_peak_contenders,
    gemm_shapes,
    interleaved_seconds,
    load_average,
)

from m2d2_hf import M2D2AudioConfig, M2D2AudioModel, M2D2FeatureExtractor, optimize_for_cpu_inference
from m2d2_hf.host_memory import keep_freed_memory_mapped


# Self-time keys of the profiler for the Linear layers (prepacked or not) and for the attention kernels.
LINEAR_KERNELS = ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "aten::linear")
ATTENTION_KERNELS = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::bmm", "aten::_softmax")


def time_breakdown(fn, linear_flops: int, attention_flops: int) -> dict[str, tuple[float, float]]:
    """Where one call of `fn` spends its time (torch profiler, self CPU time): `{part: (share of the time, GFLOP/s)}`
    for the Linear layers, the attention kernels and the rest (LayerNorm, the patch embedding, copies)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    times = {"Linear layers": 0.0, "attention": 0.0, "the rest": 0.0}
    for event in profile.key_averages():
        part = (
            "Linear layers"
            if event.key in LINEAR_KERNELS
            else "attention"
            if event.key in ATTENTION_KERNELS
            else "the rest"
        )
        times[part] += event.self_cpu_time_total / 1e6
    total = sum(times.values())
    flops = {"Linear layers": linear_flops, "attention": attention_flops, "the rest": 0}
    return {
        part: (seconds / total, flops[part] / seconds / 1e9 if seconds else 0.0) for part, seconds in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--compile",
        choices=("none", "default", "freezing"),
        default="none",
        help="also time torch.compile'd fp32 and bf16 encoders (freezing: inductor's inference-only weight freezing, "
        "which prepacks the weights for oneDNN and fuses bias / GELU into the matmuls)",
    )
    parser.add_argument(
        "--tune-malloc",
        action="store_true",
        help="keep freed memory mapped first (m2d2_hf.host_memory, as the training programs do on the CPU)",
    )
    parser.add_argument("--no-peer", action="store_true", help="skip transformers' ClapModel")
    args = parser.parse_args()

    tuned = keep_freed_memory_mapped() if args.tune_malloc else False
    torch.manual_seed(0)
    print(f"machine: {describe_machine()}{', glibc malloc tuned' if tuned else ''}")
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal(int(16000 * args.seconds)).astype(np.float32) * 0.1 for _ in range(args.clips)]
    features = M2D2FeatureExtractor()(clips, sampling_rate=16000, return_tensors="pt")

    model = M2D2AudioModel(M2D2AudioConfig()).eval()
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)  # the same weights, rounded to bf16
    optimized = optimize_for_cpu_inference(copy.deepcopy(model))
    optimized_bf16 = optimize_for_cpu_inference(copy.deepcopy(model_bf16))

    with torch.inference_mode():
        flops_per_operator = flops_by_operator(lambda: model(**features))
        m2d2_flops = sum(flops_per_operator.values())
        attention_flops = sum(flops for op, flops in flops_per_operator.items() if "attention" in op or "bmm" in op)
        fp32_shapes = gemm_shapes(lambda: model(**features))
        linear_flops = sum(2 * m * k * n * count for (m, k, n, _), count in fp32_shapes.items())
        peaks = {
            **gemm_peak_contenders(fp32_shapes, torch.float32),
            **gemm_peak_contenders(gemm_shapes(lambda: model_bf16(**features)), torch.bfloat16),
            # Not the peak, but the kernel optimize_for_cpu_inference runs: it explains fp32 figures above
            # 100 % of the torch.mm peak on CPUs where MKL's sgemm is the slower of the two.
            **gemm_peak_contenders(fp32_shapes, torch.float32, keep=1, kernel="onednn"),
        }
        contenders = {name: fn for name, (fn, _) in peaks.items()}
        contenders.update(
            {
                "M2D2 fp32": lambda: model(**features),
                "M2D2 fp32 optimized": lambda: optimized(**features),
                "M2D2 bf16": lambda: model_bf16(**features),
                "M2D2 bf16 optimized": lambda: optimized_bf16(**features),
            }
        )
        if args.compile != "none":
            if args.compile == "freezing":
                from torch._inductor import config as inductor_config

                inductor_config.freezing = True
            from torch._dynamo import config as dynamo_config

            # Each of the 12 layers is its own frame (transformers' checkpointing wrapper): allow a graph per layer.
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
            compiled, compiled_bf16 = torch.compile(model), torch.compile(model_bf16)
            for name, fn in (("M2D2 fp32 compiled", compiled), ("M2D2 bf16 compiled", compiled_bf16)):
                start = time.perf_counter()
                fn(**features)
                print(f"{name}: first call (compilation) {time.perf_counter() - start:.1f} s")
                contenders[name] = lambda fn=fn: fn(**features)
        if not args.no_peer:
            from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

            peer = ClapModel(ClapConfig()).eval()
            # The unfused LAION model's front end (clap-htsat-unfused: rand_trunc / repeatpad); 10 s clips are used
            # whole. Resampled to 48 kHz outside the timing.
            import torchaudio

            clips48 = [torchaudio.functional.resample(torch.from_numpy(c), 16000, 48000).numpy() for c in clips]
            peer_features = ClapFeatureExtractor(truncation="rand_trunc")(
                clips48, sampling_rate=48000, return_tensors="pt"
            )
            peer_flops = count_flops(lambda: peer.get_audio_features(**peer_features))
            contenders["ClapModel (HTSAT) fp32"] = lambda: peer.get_audio_features(**peer_features)
        seconds = interleaved_seconds(contenders, repeats=args.repeats, warmup=1)
        breakdown = time_breakdown(lambda: optimized(**features), linear_flops, attention_flops)
        reference = model(**features).pooler_output
        cosines = {
            name: torch.nn.functional.cosine_similarity(reference, m(**features).pooler_output.float()).min().item()
            for name, m in (("bf16", model_bf16), ("bf16 optimized", optimized_bf16))
        }

    rates = {name: flops / seconds[name] for name, (_, flops) in peaks.items()}
    # The peak of a dtype: the fastest of its GEMM shapes in this run.
    best = {
        dtype: max(rate for name, rate in rates.items() if name.startswith(label))
        for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))
    }
    n = args.clips
    print(
        f"input: {n} x {args.seconds:g} s clips, M2D2 ViT-B {m2d2_flops / 1e9:.1f} GFLOP per batch "
        f"({m2d2_flops / n / 1e9:.1f} GFLOP/clip; Linear layers {linear_flops / 1e9:.1f}, attention "
        f"{attention_flops / 1e9:.1f})"
    )
    print(
        f"matmul peaks (torch.mm over the encoder's own shapes, preallocated output, same run; {load_average()}): "
        + ", ".join(
            f"{name} {rate / 1e9:.1f} GFLOP/s" for name, rate in rates.items() if not name.startswith("oneDNN")
        )
    )
    t32, t32_opt = seconds["M2D2 fp32"], seconds["M2D2 fp32 optimized"]
    for name, t in seconds.items():
        if "peak" in name:
            continue
        dtype = torch.bfloat16 if "bf16" in name else torch.float32
        flops = peer_flops if name.startswith("ClapModel") else m2d2_flops
        achieved = flops / t
        print(
            f"{name:>24}: {t:6.3f} s, {n / t:6.2f} clips/s, {achieved / 1e9:6.1f} GFLOP/s = "
            f"{achieved / best[dtype]:6.1%} of the {'bf16' if dtype == torch.bfloat16 else 'fp32'} peak, "
            f"{t32 / t:5.2f}x M2D2 fp32, "
            f"{t32_opt / t:5.2f}x fp32 optimized"
        )
    print(
        "fp32 fraction of the fp32 matmul peak (target >= 85%): "
        f"as loaded {m2d2_flops / t32 / best[torch.float32]:.1%}, "
        f"optimized {m2d2_flops / t32_opt / best[torch.float32]:.1%}"
    )
    ((onednn_name, onednn_rate),) = ((name, rate) for name, rate in rates.items() if name.startswith("oneDNN"))
    print(
        f"{onednn_name} (the kernel of optimize_for_cpu_inference, output allocated per call): "
        f"{onednn_rate / 1e9:.1f} GFLOP/s = {onednn_rate / best[torch.float32]:.2f}x the torch.mm peak; fp32 "
        f"optimized at {m2d2_flops / t32_opt / onednn_rate:.1%} of it"
    )
    print(
        "where fp32 optimized spends its time (profiler): "
        + ", ".join(
            f"{part} {share:.0%}"
            + (f" at {rate:.0f} GFLOP/s = {rate * 1e9 / best[torch.float32]:.0%} of the peak" if rate else "")
            for part, (share, rate) in breakdown.items()
        )
    )
    t16, t16_opt = seconds["M2D2 bf16"], seconds["M2D2 bf16 optimized"]
    print(
        f"bf16 speed-up over fp32 (target >= 2x): bf16 optimized {t32 / t16_opt:.2f}x the default fp32 path "
        f"({t32_opt / t16_opt:.2f}x fp32 optimized, like for like; the bf16 / fp32 best-peak ratio is "
        f"{best[torch.bfloat16] / best[torch.float32]:.2f}x); plain bf16 weights {t32 / t16:.2f}x"
    )
    fastest = min(("M2D2 bf16", "M2D2 bf16 optimized"), key=seconds.get)
    print(
        f"fastest bf16 path ({fastest}): {m2d2_flops / seconds[fastest] / best[torch.bfloat16]:.1%} of the bf16 "
        f"matmul peak (target >= 60%); optimized / as loaded bf16 {t16 / t16_opt:.2f}x (must be >= 1)"
    )
    print(
        "bf16 vs fp32 clip-embedding cosine (random weights), min: "
        + ", ".join(f"{name} {value:.5f}" for name, value in cosines.items())
    )
    if not args.no_peer:
        t_peer = seconds["ClapModel (HTSAT) fp32"]
        print(
            f"peer: ClapModel HTSAT {n / t_peer:.2f} clips/s ({peer_flops / n / 1e9:.1f} GFLOP/clip) vs M2D2 fp32 "
            f"{n / t32:.2f} clips/s, fp32 optimized {n / t32_opt:.2f}, bf16 optimized {n / t16_opt:.2f} clips/s "
            f"({m2d2_flops / n / 1e9:.1f} GFLOP/clip); M2D2 does {m2d2_flops / peer_flops:.1f}x the FLOPs per clip"
        )


if __name__ == "__main__":
    main()
