"""The CPU kernels (cpu_kernels.c): built with the system's C compiler on first use, loaded with ctypes.

Plain C functions rather than torch.compile on a CPU: the same fused loops, but
without inductor in the process (about 100 MiB of resident memory and seconds of
start-up per process) or its per-call guard checks. The built library is cached
per source, compiler and CPU under ~/.cache/lorafit (``LORAFIT_CACHE`` overrides).

``mask_into`` serves every floating dtype. ``dropout_scale`` (mask and rescale in one pass) and the
``lora_*`` products (with the dropout mask of ``key`` and ``t`` fused in, ``key=None``: none) are
float32 only.
Callers check ``library()`` first and fall back to torch ops where it is None.
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

_SOURCE = Path(__file__).with_name("cpu_kernels.c")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_lock = threading.Lock()
_library = None  # the loaded library, False where it cannot be built

_PTR, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float
# name: (argument types, whether it returns 1 where its scratch memory could not be allocated)
_SIGNATURES = {
    "lorafit_dropout_mask": ([_PTR, _PTR] + [_I64] * 5 + [_I32] * 3, False),
    "lorafit_dropout_scale": ([_PTR, _PTR] + [_I64] * 4 + [_F32] + [_I32] * 3, False),
    # (in, in row stride, factor, out, rows, cols, r, masked, key, t, threads) and the like
    "lorafit_lora_down": ([_PTR, _I64, _PTR, _PTR, _I64, _I64, _I64] + [_I32] * 4, True),
    "lorafit_lora_grad_a": ([_PTR, _PTR, _I64, _PTR, _I64, _I64, _I64] + [_I32] * 4, True),
    "lorafit_lora_grad_b": ([_PTR, _I64] + [_PTR] * 4 + [_I64] * 3 + [_I32], True),
    "lorafit_lora_up": ([_PTR, _PTR, _PTR, _I64, _PTR, _I64, _F32, _I64, _I64, _I64] + [_I32] * 4, False),
}


def _cpu_tag() -> bytes:
    """What -march=native depends on: a library built on one CPU may not run on another."""
    try:
        flags = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")]
    except OSError:
        flags = []
    return (platform.machine() + (flags[0] if flags else platform.processor())).encode()


def _raise_if_out_of_memory(result, fn, args):
    if result:
        raise MemoryError(f"{fn.__name__}: no memory for its scratch buffers")
    return result


def _build():
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc, gcc or $CC) on PATH")
    source = _SOURCE.read_bytes()
    tag = hashlib.sha256(source + " ".join([compiler, *_FLAGS]).encode() + _cpu_tag()).hexdigest()[:16]
    cache = Path(os.environ.get("LORAFIT_CACHE") or Path.home() / ".cache" / "lorafit")
    path = cache / f"cpu_kernels-{tag}.so"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        done = subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", str(partial)], capture_output=True, text=True,
                              check=False)
        if done.returncode:
            raise RuntimeError(f"{compiler} failed on {_SOURCE.name}: {done.stderr.strip()[-500:]}")
        os.replace(partial, path)  # atomic: processes building at once (DDP ranks) never load half a file
    lib = ctypes.CDLL(str(path))
    for name, (argtypes, allocates) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, _I32 if allocates else None
        if allocates:
            fn.errcheck = _raise_if_out_of_memory
    return lib


def library():
    """The loaded library, or None where it cannot be built (then a warning says why, once)."""
    global _library
    if _library is None:
        with _lock:
            if _library is None:
                try:
                    _library = _build()
                except (OSError, RuntimeError, AttributeError) as err:
                    warnings.warn(f"lorafit: the CPU kernels are unavailable ({err}); LoRA's low-rank products "
                                  "and dropout run as plain torch ops instead (the same masks, slower)",
                                  stacklevel=3)
                    _library = False
    return _library or None


def serves(x: torch.Tensor) -> bool:
    """Whether the kernels can run on x: a CPU tensor, outside torch.compile's tracing (which must see
    torch ops), with the library built."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling() and library() is not None


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x with unit column stride, as the kernels read rows through a row stride."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _mask_args(key: int | None, t: int) -> tuple[int, int, int]:
    return (0, 0, 0) if key is None else (1, key, t)


def mask_into(src: torch.Tensor, dst: torch.Tensor, key: int, t: int) -> None:
    """dst = src where keep_mask(key, t) keeps, else 0, for 2-D tensors of one shape and dtype; dst's rows
    must be contiguous (src's are made so); dst may be src."""
    if src.shape != dst.shape or src.dtype != dst.dtype or dst.stride(-1) != 1:
        raise ValueError(f"mask_into: src {tuple(src.shape)} {src.dtype} and dst {tuple(dst.shape)} {dst.dtype} "
                         f"stride {dst.stride()} need one shape and dtype, and dst a unit column stride")
    src = _rows(src)
    size = src.element_size()
    if size not in (2, 4, 8):
        raise ValueError(f"mask_into: elements of {size} bytes ({src.dtype}) are not supported")
    rows, cols = src.shape
    _library.lorafit_dropout_mask(src.data_ptr(), dst.data_ptr(), rows, cols, src.stride(0) * size,
                                  dst.stride(0) * size, size, key, t, torch.get_num_threads())


def dropout_scale(src: torch.Tensor, key: int, t: int, scale: float) -> torch.Tensor:
    """A new tensor: scale * src where keep_mask(key, t) keeps, else 0, for a 2-D float32 src."""
    src = _rows(src)
    dst = torch.empty(src.shape, dtype=src.dtype, device=src.device)
    rows, cols = src.shape
    _library.lorafit_dropout_scale(src.data_ptr(), dst.data_ptr(), rows, cols, src.stride(0), dst.stride(0), scale,
                                   key, t, torch.get_num_threads())
    return dst


def lora_down(x: torch.Tensor, a: torch.Tensor, key: int | None, t: int) -> torch.Tensor:
    """mask(x) A^T for float32 x (N x d) and A (r x d): a new N x r tensor."""
    x, a = _rows(x), a.contiguous()
    (rows, cols), r = x.shape, a.shape[0]
    h = torch.empty(rows, r, dtype=x.dtype, device=x.device)
    _library.lorafit_lora_down(x.data_ptr(), x.stride(0), a.data_ptr(), h.data_ptr(), rows, cols, r,
                               *_mask_args(key, t), torch.get_num_threads())
    return h


def lora_grad_a(g: torch.Tensor, x: torch.Tensor, key: int | None, t: int) -> torch.Tensor:
    """G^T mask(x) for float32 G (N x r) and x (N x d): a new r x d tensor."""
    g, x = g.contiguous(), _rows(x)
    (rows, cols), r = x.shape, g.shape[1]
    ga = torch.empty(r, cols, dtype=x.dtype, device=x.device)
    _library.lorafit_lora_grad_a(g.data_ptr(), x.data_ptr(), x.stride(0), ga.data_ptr(), rows, cols, r,
                                 *_mask_args(key, t), torch.get_num_threads())
    return ga


def lora_grad_b(g: torch.Tensor, bt: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(G B, H^T G) for float32 G (N x d), B^T (r x d) and H (N x r), from one pass over G: new N x r and
    r x d tensors."""
    g, bt, h = _rows(g), bt.contiguous(), h.contiguous()
    (rows, cols), r = g.shape, bt.shape[0]
    gh = torch.empty(rows, r, dtype=g.dtype, device=g.device)
    gbt = torch.empty(r, cols, dtype=g.dtype, device=g.device)
    _library.lorafit_lora_grad_b(g.data_ptr(), g.stride(0), bt.data_ptr(), h.data_ptr(), gh.data_ptr(),
                                 gbt.data_ptr(), rows, cols, r, torch.get_num_threads())
    return gh, gbt


def lora_up(g: torch.Tensor, a: torch.Tensor, scale: float, out: torch.Tensor | None = None,
            start: torch.Tensor | None = None, key: int | None = None, t: int = 0) -> torch.Tensor:
    """out + scale mask(G A) in place, or where out is None a new start + scale mask(G A), for float32
    G (N x r) and A (r x d). start: None (zeros), a d-vector added to every row (a bias) or an N x d
    matrix; out and a matrix start need a unit column stride."""
    g, a = g.contiguous(), a.contiguous()
    (rows, r), cols = g.shape, a.shape[1]
    for name, m in (("out", out), ("start", start)):
        if m is not None and m.stride(-1) != 1:
            raise ValueError(f"lora_up: {name} stride {m.stride()} needs a unit column stride")
    if out is not None:
        if start is not None:
            raise ValueError("lora_up: give out (to add into) or start, not both")
        start, ss = out, out.stride(0)
    else:
        out = torch.empty(rows, cols, dtype=a.dtype, device=a.device)
        ss = 0 if start is None or start.dim() == 1 else start.stride(0)
    _library.lorafit_lora_up(g.data_ptr(), a.data_ptr(), start.data_ptr() if start is not None else None, ss,
                             out.data_ptr(), out.stride(0), scale, rows, cols, r, *_mask_args(key, t),
                             torch.get_num_threads())
    return out
