"""Timing helpers shared by the benchmarks: warm-up, median of repetitions, measured matmul peaks, FLOP counting,
interleaved timing of several contenders, peak memory, and a description of the machine."""

import os
import platform
import resource
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 2) -> float:
    """Median wall time of `fn` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_seconds(
    fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1, settle: float = 0.1
) -> dict[str, float]:
    """Median wall time of each of `fns`, run round-robin (`warmup` rounds, then `repeats` timed rounds).

    On a shared machine the load drifts over seconds; alternating the contenders exposes each of them to the same
    drift, so the ratios of these medians are fairer than those of back-to-back `median_seconds` calls. Each timed
    call starts after `settle` seconds of sleep, so that the thread pools the previous contender woke (OpenMP,
    BLAS) stop spinning on the cores instead of slowing the next one down.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            time.sleep(settle)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def matmul_peak_fn(
    dtype: torch.dtype = torch.float32, size: int = 2048, inner: int = 8, kernel: str = "mm"
) -> tuple[Callable, int]:
    """A `size`² matmul repeated `inner` times and its FLOPs: time it next to a model to get the practical peak.

    `kernel="mm"` is `torch.mm` (MKL for fp32 on x86); `kernel="onednn"` is the package's `PrepackedLinear` (a
    weight prepacked for oneDNN, as `optimize_for_cpu_inference` uses it), which runs faster on AVX-512 machines.
    """
    a = torch.randn(size, size, dtype=dtype)
    if kernel == "onednn":
        from m2d2_hf.cpu_inference import PrepackedLinear

        linear = PrepackedLinear(size, size, bias=False, dtype=dtype).requires_grad_(False)

        def run() -> None:
            for _ in range(inner):
                linear(a)

    else:
        b = torch.randn(size, size, dtype=dtype)

        def run() -> None:
            for _ in range(inner):
                torch.mm(a, b)

    return run, 2 * size**3 * inner


def matmul_flops_per_second(dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 10) -> float:
    """The machine's practical peak: FLOP/s of a square matmul, measured in this process."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    seconds = median_seconds(lambda: a @ b, repeats=repeats, warmup=3)
    return 2 * size**3 / seconds


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of `fn` as torch's FLOP counter sees them (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far: Linux's `VmHWM` (which, unlike `ru_maxrss`, does not inherit
    the parent's peak across fork + exec), else `ru_maxrss`."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if platform.system() == "Darwin" else 1024  # bytes on macOS, kilobytes on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def load_average() -> str:
    try:
        return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "load average unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            info = handle.read()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    extras = [flag for flag in ("avx512f", "avx512_bf16", "amx_bf16") if flag in flags]
    return f"{name or platform.machine()}{' (' + ', '.join(extras) + ')' if extras else ''}"


def describe_machine() -> str:
    import transformers

    settings = [
        f"{name}={os.environ[name]}"
        for name in ("OMP_NUM_THREADS", "OMP_PROC_BIND", "OMP_PLACES")
        if name in os.environ
    ]
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads{', ' + ' '.join(settings) if settings else ''}, {load_average()}"
    )
