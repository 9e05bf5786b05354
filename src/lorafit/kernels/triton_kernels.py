"""Triton kernels for the LoRA products with the dropout mask fused in (CUDA; the CPU under TRITON_INTERPRET=1).

For x (M x K), A (R x K), G (M x R) and the keep-mask of (key, t) (see mask.py):

    down(x, A)          = mask(x) A^T          one pass over x, no dropped copy written
    grad_a(G, x)        = G^T mask(x)          one pass over x, split over rows, partial sums in float32
    up(G, A, s, out)    = out + s mask(G A)    the low-rank part of dx, added where it is written
    mask_scale(x, s)    = s mask(x)            hashed dropout of any tensor (HashedDropout, fallbacks)

Each output element's position is row * cols + col mod 2^32, as in the C kernels and the eager reference,
whatever the tensor's size. Products accumulate in float32; a float32 product follows torch's TF32 switch
(``torch.backends.cuda.matmul.allow_tf32``), so it matches cuBLAS on the same inputs.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: callers check available() first
    triton = None

_MAX_RANK = 128  # tl.dot tiles past this rank would spill; larger ranks take the torch path


def available(device: torch.device) -> bool:
    """Whether these kernels run on ``device``: CUDA with Triton, or any CPU tensor under TRITON_INTERPRET=1."""
    if triton is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def serves_rank(r: int) -> bool:
    return r <= _MAX_RANK


if triton is not None:
    @triton.jit
    def _keep(rows, cols, n_cols, key, t):
        """The keep-mask at (rows[:, None], cols[None, :]) of a matrix with n_cols columns: lowbias32's two
        rounds of position ^ key in uint32 (wrapping, as the definition says), kept where the result as a
        signed int32 is >= t."""
        v = (rows[:, None].to(tl.uint32) * tl.cast(n_cols, tl.uint32) + cols[None, :].to(tl.uint32)) ^ key
        v = (v ^ (v >> 16)) * tl.full((), 0x7FEB352D, tl.uint32)
        v = (v ^ (v >> 15)) * tl.full((), 0x846CA68B, tl.uint32)
        return v.to(tl.int32, bitcast=True) >= t

    @triton.jit
    def _down_kernel(x_ptr, a_ptr, h_ptr, key_ptr, t, M, K, R, sx, sa,
                     MASKED: tl.constexpr, PRECISION: tl.constexpr,
                     BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        rr = tl.arange(0, BR)
        if MASKED:
            key = tl.load(key_ptr).to(tl.uint32, bitcast=True)
        acc = tl.zeros((BM, BR), dtype=tl.float32)
        for k0 in range(0, K, BK):
            cols = k0 + tl.arange(0, BK)
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * sx + cols[None, :],
                        mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0)
            if MASKED:
                x = tl.where(_keep(rows, cols, K, key, t), x, 0.0)
            a = tl.load(a_ptr + rr[None, :] * sa + cols[:, None], mask=(rr[None, :] < R) & (cols[:, None] < K),
                        other=0.0)  # the (BK x BR) tile of A^T
            acc += tl.dot(x.to(a.dtype), a, input_precision=PRECISION)
        tl.store(h_ptr + rows[:, None].to(tl.int64) * R + rr[None, :], acc.to(h_ptr.dtype.element_ty),
                 mask=(rows[:, None] < M) & (rr[None, :] < R))

    @triton.jit
    def _grad_a_kernel(g_ptr, x_ptr, ws_ptr, key_ptr, t, M, K, R, sg, sx, rows_per_split,
                       MASKED: tl.constexpr, PRECISION: tl.constexpr,
                       BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
        cols = tl.program_id(0) * BK + tl.arange(0, BK)
        split = tl.program_id(1)
        rr = tl.arange(0, BR)
        if MASKED:
            key = tl.load(key_ptr).to(tl.uint32, bitcast=True)
        acc = tl.zeros((BR, BK), dtype=tl.float32)
        first = split * rows_per_split
        for m0 in range(first, tl.minimum(first + rows_per_split, M), BM):
            rows = m0 + tl.arange(0, BM)
            live = rows < M
            gt = tl.load(g_ptr + rows[None, :].to(tl.int64) * sg + rr[:, None],
                         mask=live[None, :] & (rr[:, None] < R), other=0.0)  # the (BR x BM) tile of G^T
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * sx + cols[None, :],
                        mask=live[:, None] & (cols[None, :] < K), other=0.0)
            if MASKED:
                x = tl.where(_keep(rows, cols, K, key, t), x, 0.0)
            acc += tl.dot(gt, x.to(gt.dtype), input_precision=PRECISION)
        tl.store(ws_ptr + split * R * K + rr[:, None] * K + cols[None, :], acc,
                 mask=(rr[:, None] < R) & (cols[None, :] < K))

    @triton.jit
    def _up_kernel(g_ptr, a_ptr, out_ptr, key_ptr, t, scale, M, K, R, sg, sa, so,
                   MASKED: tl.constexpr, ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr,
                   BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BK + tl.arange(0, BK)
        rr = tl.arange(0, BR)
        g = tl.load(g_ptr + rows[:, None].to(tl.int64) * sg + rr[None, :], mask=(rows[:, None] < M) & (rr[None, :] < R),
                    other=0.0)
        a = tl.load(a_ptr + rr[:, None] * sa + cols[None, :], mask=(rr[:, None] < R) & (cols[None, :] < K), other=0.0)
        part = tl.dot(g, a.to(g.dtype), input_precision=PRECISION) * scale
        if MASKED:
            key = tl.load(key_ptr).to(tl.uint32, bitcast=True)
            part = tl.where(_keep(rows, cols, K, key, t), part, 0.0)
        inside = (rows[:, None] < M) & (cols[None, :] < K)
        where = out_ptr + rows[:, None].to(tl.int64) * so + cols[None, :]
        if ACCUMULATE:
            part += tl.load(where, mask=inside, other=0.0).to(tl.float32)
        tl.store(where, part.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _mask_scale_kernel(x_ptr, out_ptr, key_ptr, t, scale, M, K, sx, so, BM: tl.constexpr, BK: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BK + tl.arange(0, BK)
        inside = (rows[:, None] < M) & (cols[None, :] < K)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * sx + cols[None, :], mask=inside, other=0.0)
        key = tl.load(key_ptr).to(tl.uint32, bitcast=True)
        kept = tl.where(_keep(rows, cols, K, key, t), x.to(tl.float32) * scale, 0.0)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * so + cols[None, :], kept.to(out_ptr.dtype.element_ty),
                 mask=inside)


def _precision(*tensors: torch.Tensor) -> str:
    if any(x.dtype == torch.float64 for x in tensors):
        raise TypeError("the Triton LoRA kernels take float32, bfloat16 or float16, not float64")
    if all(x.dtype == torch.float32 for x in tensors):
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32"  # ignored for 16-bit operands


def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _key_args(key: torch.Tensor | None, t: int, like: torch.Tensor):
    # an unmasked launch still needs a pointer argument; the kernel never reads it
    return (key if key is not None else like), int(t), key is not None


def down(x: torch.Tensor, a: torch.Tensor, key: torch.Tensor | None = None, t: int = 0, bk: int = 128) -> torch.Tensor:
    """mask(x) A^T for 2-D x (M x K) and A (R x K): a new M x R tensor in A's dtype. ``bk``: columns per tile
    (wide tiles keep more of x in flight per program: the product is a stream over x)."""
    x, a = _rows(x), a.contiguous()
    (m, k), r = x.shape, a.shape[0]
    h = torch.empty(m, r, dtype=a.dtype, device=x.device)
    key, t, masked = _key_args(key, t, x)
    bm = 64 if m >= 64 * 132 else 32  # enough programs to cover the GPU at a few thousand rows
    _down_kernel[(triton.cdiv(m, bm),)](x, a, h, key, t, m, k, r, x.stride(0), a.stride(0), MASKED=masked,
                                         PRECISION=_precision(x, a), BM=bm, BK=bk, BR=_rank_block(r))
    return h


def grad_a(g: torch.Tensor, x: torch.Tensor, key: torch.Tensor | None = None, t: int = 0,
           bm: int = 128) -> torch.Tensor:
    """G^T mask(x) for G (M x R) and x (M x K): a new R x K tensor in G's dtype. ``bm``: rows per tile."""
    g, x = g.contiguous(), _rows(x)
    (m, k), r = x.shape, g.shape[1]
    bk = 64
    col_blocks = triton.cdiv(k, bk)
    # split the rows so that about four programs per multiprocessor run; the partial sums are small (R x K each)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.device.type == "cuda" else 4
    splits = max(1, min(triton.cdiv(4 * sms, col_blocks), triton.cdiv(m, bm)))
    rows_per_split = triton.cdiv(triton.cdiv(m, splits), bm) * bm
    splits = triton.cdiv(m, rows_per_split)
    ws = torch.empty(splits, r, k, dtype=torch.float32, device=x.device)
    key, t, masked = _key_args(key, t, x)
    _grad_a_kernel[(col_blocks, splits)](g, x, ws, key, t, m, k, r, g.stride(0), x.stride(0), rows_per_split,
                                         MASKED=masked, PRECISION=_precision(g, x), BM=bm, BK=bk, BR=_rank_block(r))
    return ws.sum(0).to(g.dtype) if splits > 1 else ws[0].to(g.dtype)


def up(g: torch.Tensor, a: torch.Tensor, scale: float, out: torch.Tensor | None = None, dtype: torch.dtype | None = None,
       key: torch.Tensor | None = None, t: int = 0) -> torch.Tensor:
    """out + scale mask(G A) in place for G (M x R) and A (R x K); where out is None, a new
    scale mask(G A) in ``dtype`` (default A's). out needs a unit column stride."""
    g, a = g.contiguous(), a.contiguous()
    (m, r), k = g.shape, a.shape[1]
    accumulate = out is not None
    if out is None:
        out = torch.empty(m, k, dtype=dtype or a.dtype, device=g.device)
    elif out.stride(-1) != 1:
        raise ValueError(f"up: out stride {out.stride()} needs a unit column stride")
    key, t, masked = _key_args(key, t, g)
    bm, bk = 64, 64
    _up_kernel[(triton.cdiv(m, bm), triton.cdiv(k, bk))](
        g, a, out, key, t, float(scale), m, k, r, g.stride(0), a.stride(0), out.stride(0), MASKED=masked,
        ACCUMULATE=accumulate, PRECISION=_precision(g, a), BM=bm, BK=bk, BR=_rank_block(r))
    return out


def mask_scale(x: torch.Tensor, key: torch.Tensor, t: int, scale: float = 1.0) -> torch.Tensor:
    """A new tensor: scale * x where the keep-mask keeps, else 0, for 2-D x of any floating dtype but float64."""
    x = _rows(x)
    m, k = x.shape
    out = torch.empty(m, k, dtype=x.dtype, device=x.device)
    bm, bk = 16, 128
    _mask_scale_kernel[(triton.cdiv(m, bm), triton.cdiv(k, bk))](x, out, key, int(t), float(scale), m, k,
                                                                  x.stride(0), out.stride(0), BM=bm, BK=bk)
    return out
