"""The C heap's reuse of freed tensor memory on the CPU (glibc's malloc).

PyTorch's CPU allocator is plain `malloc`/`free`, without the caching allocator it has on GPUs. glibc serves blocks
of 128 KB and more (tunable, and raised dynamically up to 32 MB) from fresh `mmap` regions and returns them to the
kernel on `free`, and it trims the top of the heap once a little of it is free: so a training step, whose
activations, weight casts and gradients are megabytes each, asks the kernel for zeroed pages again on every step. On
the 2-core Xeon with AMX of `benchmarks/README.md` a ViT-B stage-1 step took 36 000 (bf16 autocast) and 98 000 (fp32)
page faults and ran 1.16x slower (bf16 1.26 vs 1.09 s, fp32 3.05 vs 2.62 s); with the settings below it takes none.
"""

import ctypes
import platform


# mallopt parameters (<malloc.h>) and the values set: blocks up to 32 MB come from the heap, and up to 1 GB of free
# heap top stays mapped. Equivalent to `MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824`.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024


def keep_freed_memory_mapped() -> bool:
    """Makes glibc's malloc reuse freed blocks of up to 32 MB instead of unmapping them, for the whole process (and
    the processes it forks later). Returns False, changing nothing, where the C library is not glibc.

    The cost is memory: the process keeps the pages of its peak (at most 1 GB of free heap top) mapped instead of
    returning them between steps, which is what a training loop reaches again on every step anyway."""
    # glibc only: musl has a mallopt that ignores these parameters.
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt  # the C library this interpreter runs on
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
