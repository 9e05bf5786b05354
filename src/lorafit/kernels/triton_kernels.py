"""Triton kernels for the LoRA products with the dropout mask fused in (CUDA; the CPU under TRITON_INTERPRET=1).

For x (M x K), A (R x K), G (M x R) and the keep-mask of (key, t) (see mask.py):

    down(x, A)          = mask(x) A^T          one pass over x, no dropped copy written
    grad_a(G, x)        = G^T mask(x)          one pass over x, split over rows, partial sums in float32
    up(G, A, s, out)    = out + s mask(G A)    the low-rank part of dx, added where it is written
    grad_a_and_up       = both of the last two over one mask, in one launch and one pass over G's tiles
    mask_scale(x, s)    = s mask(x)            hashed dropout of any tensor (HashedDropout, fallbacks)
    dequantize          = level(code) * absmax  a QLoRA base weight from its 4- or 8-bit codes (dequantize.py)

Each output element's position is row * cols + col mod 2^32, as in the C kernels and the eager reference,
whatever the tensor's size. Products accumulate in float32; a float32 product follows torch's TF32 switch
(``torch.backends.cuda.matmul.allow_tf32``), so it matches cuBLAS on the same inputs.

Each launcher compiles its kernel on first use and launches it (``wait=False``: raises NotReady instead
while the warm-up helper compiles that variant; ``run`` calls them so). Later launches of a variant call its
compiled kernel directly, without Triton's JIT dispatch (see ``_launch``).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

from lorafit.kernels import triton_warmup

_MAX_RANK = 128  # tl.dot tiles past this rank would spill; larger ranks take the torch path
_unavailable: str | None = None if importlib.util.find_spec("triton") else "Triton is not installed"


def available(device: torch.device) -> bool:
    """Whether these kernels run on ``device``: CUDA with Triton, or any CPU tensor under TRITON_INTERPRET=1."""
    if device.type == "cuda":
        if _unavailable is not None:
            _warn_once()
        return _unavailable is None
    return _unavailable is None and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def disable(reason: str) -> None:
    """Stop using these kernels in this process (one failed to build or run): callers take the torch ops."""
    global _unavailable
    _unavailable = reason
    _warn_once()


def run(fn, *args):
    """fn(*args) for one of the launchers below, or None where its kernel cannot build or run on this GPU
    (then the callers take the torch ops from now on: ``disable`` says so once) or is still being compiled
    by the warm-up helper (then for this call: see triton_warmup.py)."""
    try:
        return fn(*args, wait=False)
    except NotReady:
        return None
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - a compiler or driver failure of any kind: the torch ops are exact too
        disable(f"{fn.__name__} failed: {type(err).__name__}: {str(err)[:300]}")
        return None


@functools.cache
def _warn_once() -> None:
    warnings.warn(f"lorafit: the Triton kernels are unavailable ({_unavailable}); LoRA dropout on CUDA runs as plain "
                  "torch ops instead (the same masks, slower)", stacklevel=4)


def serves_rank(r: int) -> bool:
    return r <= _MAX_RANK


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _precision(*tensors: torch.Tensor) -> str:
    all_float32 = True
    for x in tensors:  # a loop, not any() and all() over generators: this runs at every launch
        if x.dtype is not torch.float32:
            if x.dtype is torch.float64:
                raise TypeError("the Triton LoRA kernels take float32, bfloat16 or float16, not float64")
            all_float32 = False
    if all_float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32"  # ignored for 16-bit operands


class NotReady(Exception):
    """The kernel variant is still being compiled by the warm-up helper (triton_warmup.py)."""


# The compiled kernel of each variant launched so far (triton_warmup.variant: everything Triton specialises a
# kernel on, and more) on each device. A later launch of the variant calls it directly: JITFunction.run's binding,
# specialisation and cache lookup cost about ten times the launch itself in host time, and a small layer's GPU
# work is shorter than the host time that issues it.
_compiled: dict[tuple, object] = {}
_direct: bool = True  # False once a direct launch failed (a Triton whose compiled kernels take other arguments)


def _launch(kernel: str, grid: tuple, args: tuple, constexprs: dict, wait: bool) -> None:
    """kernel[grid](*args, **constexprs); without ``wait``, NotReady while the warm-up helper compiles it."""
    device = args[0].device
    variant = triton_warmup.variant(kernel, args, constexprs)
    key = (variant, device.index) if variant is not None else None
    compiled = _compiled.get(key) if _direct and key is not None else None
    if compiled is not None:
        try:  # every parameter in order, constexprs included (they trail each kernel's signature)
            compiled[grid + (1,) * (3 - len(grid))](*args, *constexprs.values())
            return
        except Exception as err:  # noqa: BLE001 - the launch goes through Triton's JIT from now on
            _launch_through_jit(f"{type(err).__name__}: {str(err)[:200]}")
    if not wait and not triton_warmup.ready(kernel, args, constexprs, device, variant):
        raise NotReady(kernel)
    from lorafit.kernels import triton_jit  # imported on the first launch only

    fn = getattr(triton_jit, kernel)
    compiled = fn[grid](*args, **constexprs)
    if hasattr(compiled, "result"):  # a Triton that compiles asynchronously returns a future
        compiled = compiled.result()
    # None under TRITON_INTERPRET=1; constexprs keyed out of signature order could not be passed by position
    if _direct and key is not None and hasattr(compiled, "packed_metadata") and list(constexprs) == list(
            fn.arg_names[len(args):]):
        _compiled[key] = compiled


def _launch_through_jit(reason: str) -> None:
    global _direct
    _direct = False
    _compiled.clear()
    warnings.warn(f"lorafit: Triton kernels launch through Triton's JIT launcher (a direct launch failed: {reason})",
                  stacklevel=4)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _rank_block(r: int) -> int:
    return max(16, 1 << (r - 1).bit_length())


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _key_args(key: torch.Tensor | None, t: int, like: torch.Tensor):
    # an unmasked launch still needs a pointer argument; the kernel never reads it
    return (key if key is not None else like), int(t), key is not None


def down(x: torch.Tensor, a: torch.Tensor, key: torch.Tensor | None = None, t: int = 0,
         bk: int | None = None, *, wait: bool = True) -> torch.Tensor:
    """mask(x) A^T for 2-D x (M x K) and A (R x K): a new M x R tensor in A's dtype. ``bk``: columns per tile.
    Wide tiles keep more of x in flight per program (the product is a stream over x): 256 columns of a 16-bit x
    beat 128 and 64 on an H200 at every Llama-1B shape; float32 takes 128 to stay within shared memory."""
    x, a = _rows(x), a.contiguous()
    bk = bk or (128 if x.element_size() > 2 else 256)
    (m, k), r = x.shape, a.shape[0]
    h = torch.empty(m, r, dtype=a.dtype, device=x.device)
    key, t, masked = _key_args(key, t, x)
    bm = 64 if m >= 64 * 132 else 32  # enough programs to cover the GPU at a few thousand rows
    _launch("_down_kernel", (_cdiv(m, bm),), (x, a, h, key, t, m, k, r, x.stride(0), a.stride(0)),
            dict(MASKED=masked, PRECISION=_precision(x, a), BM=bm, BK=bk, BR=_rank_block(r)), wait)
    return h


def grad_a(g: torch.Tensor, x: torch.Tensor, key: torch.Tensor | None = None, t: int = 0, scale: float = 1.0,
           bm: int = 128, *, wait: bool = True) -> torch.Tensor:
    """scale G^T mask(x) for G (M x R) and x (M x K): a new R x K tensor in G's dtype. ``bm``: rows per tile."""
    g, x = g.contiguous(), _rows(x)
    (m, k), r = x.shape, g.shape[1]
    bk = 64
    col_blocks = _cdiv(k, bk)
    splits, rows_per_split = _splits(m, col_blocks, bm, x.device)
    ws = _partials(splits, r, k, g.dtype, x.device)
    key, t, masked = _key_args(key, t, x)
    _launch("_grad_a_kernel", (col_blocks, splits),
            (g, x, ws, key, t, float(scale), m, k, r, g.stride(0), x.stride(0), rows_per_split),
            dict(MASKED=masked, PRECISION=_precision(g, x), BM=bm, BK=bk, BR=_rank_block(r)), wait)
    return _total(ws, g.dtype)


def _splits(m: int, col_blocks: int, bm: int, device: torch.device) -> tuple[int, int]:
    """(splits, rows per split) for a sum over m rows in col_blocks column blocks: about four programs per
    multiprocessor, each summing whole tiles of bm rows; the partial sums are small (R x K each)."""
    splits = max(1, min(_cdiv(4 * _multiprocessors(device), col_blocks), _cdiv(m, bm)))
    rows_per_split = _cdiv(_cdiv(m, splits), bm) * bm
    return _cdiv(m, rows_per_split), rows_per_split


def _partials(splits: int, r: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Where the programs store their partial sums: float32 when there are several to add, else the result's
    own dtype (the kernel's store rounds the float32 sum into it)."""
    return torch.empty(splits, r, k, dtype=torch.float32 if splits > 1 else dtype, device=device)


def _total(ws: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The partial sums' total in dtype: one reduction that adds in float32 and writes dtype (no cast launch)."""
    if ws.shape[0] == 1:
        return ws[0]
    return torch.sum(ws, 0, out=torch.empty(ws.shape[1:], dtype=dtype, device=ws.device))


def _up_output(out: torch.Tensor | None, m: int, k: int, dtype: torch.dtype, device: torch.device,
               caller: str) -> torch.Tensor:
    """Where an up product goes: ``out`` (added into; it needs a unit column stride), or a new M x K tensor."""
    if out is None:
        return torch.empty(m, k, dtype=dtype, device=device)
    if out.stride(-1) != 1:
        raise ValueError(f"{caller}: out stride {out.stride()} needs a unit column stride")
    return out


def grad_a_and_up(g: torch.Tensor, x: torch.Tensor, a: torch.Tensor, key: torch.Tensor, t: int, scale_a: float,
                  scale_up: float, out: torch.Tensor | None = None,
                  dtype: torch.dtype | None = None, *, wait: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale_a G^T mask(x), out + scale_up mask(G A)) for G (M x R), x (M x K), A (R x K) and one mask: the
    backward of a masked adapter in one launch. The first is new, in G's dtype; the second is formed in out
    (unit column stride), or where out is None is a new tensor in ``dtype`` (default A's)."""
    g, x, a = g.contiguous(), _rows(x), a.contiguous()
    (m, k), r = x.shape, g.shape[1]
    accumulate = out is not None
    out = _up_output(out, m, k, dtype or a.dtype, x.device, "grad_a_and_up")
    bm, bk = 64, 64
    col_blocks = _cdiv(k, bk)
    splits, rows_per_split = _splits(m, col_blocks, bm, x.device)
    ws = _partials(splits, r, k, g.dtype, x.device)
    _launch("_grad_a_up_kernel", (col_blocks, splits),
            (g, x, a, ws, out, key, int(t), float(scale_a), float(scale_up), m, k, r, g.stride(0), x.stride(0),
             a.stride(0), out.stride(0), rows_per_split),
            dict(ACCUMULATE=accumulate, PRECISION=_precision(g, x, a), BM=bm, BK=bk, BR=_rank_block(r)), wait)
    return _total(ws, g.dtype), out


def up(g: torch.Tensor, a: torch.Tensor, scale: float, out: torch.Tensor | None = None,
       dtype: torch.dtype | None = None, key: torch.Tensor | None = None, t: int = 0, *, wait: bool = True
       ) -> torch.Tensor:
    """out + scale mask(G A) in place for G (M x R) and A (R x K); where out is None, a new
    scale mask(G A) in ``dtype`` (default A's). out needs a unit column stride."""
    g, a = g.contiguous(), a.contiguous()
    (m, r), k = g.shape, a.shape[1]
    accumulate = out is not None
    out = _up_output(out, m, k, dtype or a.dtype, g.device, "up")
    key, t, masked = _key_args(key, t, g)
    bm, bk = 64, 64
    _launch("_up_kernel", (_cdiv(m, bm), _cdiv(k, bk)),
            (g, a, out, key, t, float(scale), m, k, r, g.stride(0), a.stride(0), out.stride(0)),
            dict(MASKED=masked, ACCUMULATE=accumulate, PRECISION=_precision(g, a), BM=bm, BK=bk, BR=_rank_block(r)),
            wait)
    return out


def mask_scale(x: torch.Tensor, key: torch.Tensor, t: int, scale: float = 1.0, *, wait: bool = True) -> torch.Tensor:
    """A new tensor: scale * x where the keep-mask keeps, else 0, for 2-D x of any floating dtype but float64."""
    x = _rows(x)
    m, k = x.shape
    out = torch.empty(m, k, dtype=x.dtype, device=x.device)
    bm, bk = 16, 128
    _launch("_mask_scale_kernel", (_cdiv(m, bm), _cdiv(k, bk)),
            (x, out, key, int(t), float(scale), m, k, x.stride(0), out.stride(0)), dict(BM=bm, BK=bk), wait)
    return out


def dequantize(codes: torch.Tensor, scales: torch.Tensor, levels: torch.Tensor | None, block_size: int,
               shape: tuple[int, ...], dtype: torch.dtype, *, wait: bool = True) -> torch.Tensor:
    """A new ``shape`` tensor in ``dtype`` from block-quantized codes in one pass (see dequantize.py): NF4 bytes
    with their 16 float32 ``levels``, or int8 codes (``levels`` None) with ``scales`` = absmax / 127."""
    n = codes.numel()
    out = torch.empty(shape, dtype=dtype, device=codes.device)
    block = 1024
    _launch("_dequantize_kernel", (_cdiv(n, block),), (codes, scales, levels if levels is not None else scales, out, n),
            dict(NF4=levels is not None, QBLOCK=block_size, BLOCK=block), wait)
    return out
