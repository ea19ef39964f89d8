"""Timing helpers shared by the benchmarks: warm-up, median of repetitions, measured matmul peaks, FLOP counting,
interleaved timing of several contenders, peak memory, and a description of the machine."""

import math
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode


def _register_cpu_flash_attention_flops() -> None:
    """Teach torch's FLOP counter the CPU flash-attention kernels SDPA runs on the CPU: it has formulas for the CUDA
    ones only, so every CPU attention (2 x 2 x batch x heads x tokens^2 x head_dim per layer forward, twice that
    backward) would count as zero FLOPs and every fraction of the matmul peak would leave it out."""
    forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    if forward not in flop_counter.flop_registry:

        @flop_counter.register_flop_formula(forward)
        def _forward_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    if backward not in flop_counter.flop_registry:

        @flop_counter.register_flop_formula(backward)
        def _backward_flops(grad_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_backward_flop_count(grad_shape, query_shape, key_shape, value_shape)


_register_cpu_flash_attention_flops()


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
    fns: dict[str, Callable[[], object]],
    repeats: int = 5,
    warmup: int = 1,
    settle: float = 0.1,
    primed: bool = False,
) -> dict[str, float]:
    """Median wall time of each of `fns`, run round-robin (`warmup` rounds, then `repeats` timed rounds).

    On a shared machine the load drifts over seconds; alternating the contenders exposes each of them to the same
    drift, so the ratios of these medians are fairer than those of back-to-back `median_seconds` calls. Each timed
    call starts after `settle` seconds of sleep, so that the thread pools the previous contender woke (OpenMP,
    BLAS) stop spinning on the cores instead of slowing the next one down. `primed` runs each contender once more,
    untimed, right before its timed call: for contenders whose working sets evict each other's from the caches (a
    PyTorch forward right after onnxruntime's unfused graphs ran up to 1.8x slower than right after its own).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if primed:
                fn()
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


class _GemmShapeRecorder(TorchDispatchMode):
    """Records (m, k, n, dtype) of every 2-D matmul ATen runs: `mm` and `addmm` (Linear layers under autograd,
    forward and backward) and `linear` (which inference mode dispatches undecomposed; its input folded to 2-D)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: dict[tuple[int, int, int, torch.dtype], int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet, key = func.overloadpacket, None
        if packet in (torch.ops.aten.mm, torch.ops.aten.addmm):
            a, b = (args[0], args[1]) if packet is torch.ops.aten.mm else (args[1], args[2])
            key = (a.shape[0], a.shape[1], b.shape[1], a.dtype)
        elif packet is torch.ops.aten.linear:
            x, weight = args[0], args[1]
            key = (x.numel() // x.shape[-1], x.shape[-1], weight.shape[0], x.dtype)
        if key is not None:
            self.shapes[key] = self.shapes.get(key, 0) + 1
        return func(*args, **(kwargs or {}))


def gemm_shapes(fn: Callable[[], object]) -> dict[tuple[int, int, int, torch.dtype], int]:
    """The 2-D GEMM shapes (m, k, n, dtype) of one call of `fn`, with how often each occurs."""
    with _GemmShapeRecorder() as recorder:
        fn()
    return recorder.shapes


def mm_fn(m: int, k: int, n: int, dtype: torch.dtype, min_flops: float = 4e9) -> tuple[Callable[[], None], int]:
    """`torch.mm` of an [m, k] by [k, n] product into a preallocated output, repeated to about `min_flops`, and its
    FLOPs. The output is allocated once: allocating it per call (page faults) halves the bf16 rate on AMX."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    out = torch.empty(m, n, dtype=dtype)
    inner = max(1, math.ceil(min_flops / (2 * m * k * n)))

    def run() -> None:
        for _ in range(inner):
            torch.mm(a, b, out=out)

    return run, 2 * m * k * n * inner


def prepacked_linear_fn(
    m: int, k: int, n: int, dtype: torch.dtype, min_flops: float = 4e9
) -> tuple[Callable[[], None], int]:
    """The same [m, k] by [k, n] product through the package's `PrepackedLinear` (a weight prepacked for oneDNN, as
    `optimize_for_cpu_inference` runs the encoder's Linear layers), repeated to about `min_flops`, and its FLOPs.
    oneDNN allocates each output; on AVX-512 CPUs without AMX this kernel beats `torch.mm` (MKL) in fp32."""
    from m2d2_hf.cpu_inference import PrepackedLinear

    a = torch.randn(m, k, dtype=dtype)
    linear = PrepackedLinear(k, n, bias=False, dtype=dtype).requires_grad_(False)
    inner = max(1, math.ceil(min_flops / (2 * m * k * n)))

    def run() -> None:
        for _ in range(inner):
            linear(a)

    return run, 2 * m * k * n * inner


def gemm_peak_contenders(
    shapes: dict[tuple[int, int, int, torch.dtype], int],
    dtype: torch.dtype,
    keep: int = 3,
    repeats: int = 3,
    kernel: str = "mm",
) -> dict[str, tuple[Callable[[], None], int]]:
    """The `keep` fastest of a workload's own GEMM shapes in `dtype` (screened by a short interleaved run), as
    `name -> (fn, flops)` contenders to time next to the workload: with `kernel="mm"` the best of their rates in that
    same run is the issue's matmul peak (the best `torch.mm` rate over the model's own shapes, output preallocated);
    `kernel="onednn"` times `prepacked_linear_fn` instead (named "oneDNN prepacked ...", not a peak of the issue)."""
    make = {"mm": mm_fn, "onednn": prepacked_linear_fn}[kernel]
    candidates = {
        f"{kernel} {m}x{k}x{n}": make(m, k, n, dtype) for (m, k, n, shape_dtype) in shapes if shape_dtype == dtype
    }
    if not candidates:
        raise ValueError(f"the workload runs no {dtype} GEMM: nothing to measure its peak on")
    seconds = interleaved_seconds({name: fn for name, (fn, _) in candidates.items()}, repeats=repeats, settle=0.02)
    ranked = sorted(candidates, key=lambda name: seconds[name] / candidates[name][1])
    label = f"{'fp32' if dtype == torch.float32 else 'bf16'} peak"
    if kernel == "onednn":
        label = f"oneDNN prepacked {label}"
    return {f"{label} {name}": candidates[name] for name in ranked[:keep]}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of `fn` as torch's FLOP counter sees them (matmuls, convolutions, attention)."""
    return sum(flops_by_operator(fn).values())


def flops_by_operator(fn: Callable[[], object]) -> dict[str, int]:
    """FLOPs of one call of `fn` per ATen operator (`"aten.mm"`, `"aten._scaled_dot_product_..."`, ...)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return {str(op): flops for op, flops in counter.get_flop_counts().get("Global", {}).items()}


def page_faults(fn: Callable[[], object]) -> int:
    """Minor page faults (fresh zeroed pages from the kernel) of this process during one call of `fn`."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


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
