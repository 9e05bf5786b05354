"""The CPU dropout kernel (dropout_mask.c): built with the system's C compiler on first use, loaded with ctypes.

A plain C function rather than torch.compile on a CPU: the same fused loop, but
without inductor in the process (about 100 MiB of resident memory and seconds of
start-up per process) or its per-call guard checks. The built library is cached
per source, compiler and CPU under ~/.cache/lorafit (``LORAFIT_CACHE`` overrides).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("dropout_mask.c")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_lock = threading.Lock()
_kernel = None  # the loaded function, False where it cannot be built


def _cpu_tag() -> bytes:
    """What -march=native depends on: a library built on one CPU may not run on another."""
    try:
        flags = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")]
    except OSError:
        flags = []
    return (platform.machine() + (flags[0] if flags else platform.processor())).encode()


def _build():
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc, gcc or $CC) on PATH")
    source = _SOURCE.read_bytes()
    tag = hashlib.sha256(source + " ".join([compiler, *_FLAGS]).encode() + _cpu_tag()).hexdigest()[:16]
    cache = Path(os.environ.get("LORAFIT_CACHE") or Path.home() / ".cache" / "lorafit")
    lib = cache / f"dropout_mask-{tag}.so"
    if not lib.exists():
        cache.mkdir(parents=True, exist_ok=True)
        partial = lib.with_name(f"{lib.name}.{os.getpid()}.partial")
        done = subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", str(partial)], capture_output=True, text=True,
                              check=False)
        if done.returncode:
            raise RuntimeError(f"{compiler} failed on {_SOURCE.name}: {done.stderr.strip()[-500:]}")
        os.replace(partial, lib)  # atomic: processes building at once (DDP ranks) never load half a file
    fn = ctypes.CDLL(str(lib)).lorafit_dropout_mask
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 5 + [ctypes.c_int32] * 3
    fn.restype = None
    return fn


def kernel():
    """The C function, or None where it cannot be built (then a warning says why, once)."""
    global _kernel
    if _kernel is None:
        with _lock:
            if _kernel is None:
                try:
                    _kernel = _build()
                except (OSError, RuntimeError, AttributeError) as err:
                    warnings.warn(f"lorafit: the CPU dropout kernel is unavailable ({err}); LoRA dropout "
                                  "runs as plain torch ops instead (the same masks, slower)", stacklevel=3)
                    _kernel = False
    return _kernel or None


def mask_into(src: torch.Tensor, dst: torch.Tensor, key: int, t: int) -> None:
    """dst = src where keep_mask(key, t) keeps, else 0, for 2-D CPU tensors of one shape and dtype whose
    rows are contiguous; dst may be src. The caller has checked that ``kernel()`` is not None."""
    if src.shape != dst.shape or src.dtype != dst.dtype or src.stride(-1) != 1 or dst.stride(-1) != 1:
        raise ValueError(f"mask_into: src {tuple(src.shape)} {src.dtype} stride {src.stride()} and dst "
                         f"{tuple(dst.shape)} {dst.dtype} stride {dst.stride()} need one shape, dtype, unit column stride")
    size = src.element_size()
    if size not in (2, 4, 8):
        raise ValueError(f"mask_into: elements of {size} bytes ({src.dtype}) are not supported")
    rows, cols = src.shape
    _kernel(src.data_ptr(), dst.data_ptr(), rows, cols, src.stride(0) * size, dst.stride(0) * size, size,
            key, t, torch.get_num_threads())
