"""Keep the memory a training step frees for the next step (glibc's malloc on Linux).

By default glibc gives large blocks back to the kernel when they are freed:
blocks above the mmap threshold are unmapped, and the heap is trimmed when
its free top passes the trim threshold. A training step frees most of its
activations at its end and allocates them again in the next one, so every
step faults its memory back in, one zeroed 4 KiB page at a time. On the MiniLM
32 x 64 LoRA step (BENCHMARKS.md) that was about 30,000 page faults and 110 ms
of kernel time a step; with both thresholds raised, almost none. The process keeps
what it reached at its peak instead of handing it back and taking it again, so
the peak itself moves little: by -17 to +36 MiB on the benchmark steps, and
+45 MiB (1705 -> 1750) for full fine-tuning end to end, where a heap that is
never trimmed fragments a little. (jemalloc or tcmalloc, which PyTorch's CPU tuning
guides suggest, do the same but must be preloaded; this needs nothing installed.)
"""

from __future__ import annotations

import ctypes
import platform
import sys

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# The largest mmap threshold glibc accepts on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): blocks above it,
# such as a large vocabulary's logits, are still mapped and unmapped on their own.
_MMAP_THRESHOLD = 32 << 20
_TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Raise glibc's trim and mmap thresholds for this process; False where this is not glibc."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)) and bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD))
