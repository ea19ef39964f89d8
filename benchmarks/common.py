"""Timing helpers shared by the benchmarks: warm-up, median of repetitions, measured matmul peaks, FLOP counting."""

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


def describe_machine() -> str:
    import os
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
