"""The Triton kernels themselves (see triton_kernels.py for what each computes and for their callers).

A module of its own so that importing lorafit does not import Triton (tens of MiB of memory and a second
of start-up) in processes that never run them.

Row counts are not specialised on (``do_not_specialize``): Triton would otherwise compile a kernel again for
each new divisibility of M by 16, so batches of varying length would pay a compilation more than once. They
only bound the masked loads and stores, where the specialisation buys nothing.
"""

import triton
import triton.language as tl


@triton.jit
def _keep(rows, cols, n_cols, key, t):
    """The keep-mask at (rows[:, None], cols[None, :]) of a matrix with n_cols columns: lowbias32's two
    rounds of position ^ key in uint32 (wrapping, as the definition says), kept where the result as a
    signed int32 is >= t."""
    v = (rows[:, None].to(tl.uint32) * tl.cast(n_cols, tl.uint32) + cols[None, :].to(tl.uint32)) ^ key
    v = (v ^ (v >> 16)) * tl.full((), 0x7FEB352D, tl.uint32)
    v = (v ^ (v >> 15)) * tl.full((), 0x846CA68B, tl.uint32)
    return v.to(tl.int32, bitcast=True) >= t


@triton.jit(do_not_specialize=["M"])
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


@triton.jit(do_not_specialize=["M", "rows_per_split"])
def _grad_a_kernel(g_ptr, x_ptr, ws_ptr, key_ptr, t, scale, M, K, R, sg, sx, rows_per_split,
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
    tl.store(ws_ptr + split * R * K + rr[:, None] * K + cols[None, :], acc * scale,
             mask=(rr[:, None] < R) & (cols[None, :] < K))


@triton.jit(do_not_specialize=["M", "rows_per_split"])
def _grad_a_up_kernel(g_ptr, x_ptr, a_ptr, ws_ptr, out_ptr, key_ptr, t, scale_a, scale_up, M, K, R, sg, sx, sa, so,
                      rows_per_split, ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr,
                      BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    """_grad_a_kernel and _up_kernel over the same mask in one pass: each tile's keep-mask is hashed once, G's
    tile is loaded once for both products, and each program writes the up tiles of the rows it sums."""
    cols = tl.program_id(0) * BK + tl.arange(0, BK)
    split = tl.program_id(1)
    rr = tl.arange(0, BR)
    key = tl.load(key_ptr).to(tl.uint32, bitcast=True)
    a = tl.load(a_ptr + rr[:, None] * sa + cols[None, :], mask=(rr[:, None] < R) & (cols[None, :] < K), other=0.0)
    acc = tl.zeros((BR, BK), dtype=tl.float32)
    first = split * rows_per_split
    for m0 in range(first, tl.minimum(first + rows_per_split, M), BM):
        rows = m0 + tl.arange(0, BM)
        live = rows < M
        inside = live[:, None] & (cols[None, :] < K)
        keep = _keep(rows, cols, K, key, t)
        g = tl.load(g_ptr + rows[:, None].to(tl.int64) * sg + rr[None, :], mask=live[:, None] & (rr[None, :] < R),
                    other=0.0)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * sx + cols[None, :], mask=inside, other=0.0)
        acc += tl.dot(tl.trans(g), tl.where(keep, x, 0.0).to(g.dtype), input_precision=PRECISION)
        part = tl.where(keep, tl.dot(g, a.to(g.dtype), input_precision=PRECISION) * scale_up, 0.0)
        where = out_ptr + rows[:, None].to(tl.int64) * so + cols[None, :]
        if ACCUMULATE:
            part += tl.load(where, mask=inside, other=0.0).to(tl.float32)
        tl.store(where, part.to(out_ptr.dtype.element_ty), mask=inside)
    tl.store(ws_ptr + split * R * K + rr[:, None] * K + cols[None, :], acc * scale_a,
             mask=(rr[:, None] < R) & (cols[None, :] < K))


@triton.jit(do_not_specialize=["M"])
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


@triton.jit(do_not_specialize=["M"])
def _mask_scale_kernel(x_ptr, out_ptr, key_ptr, t, scale, M, K, sx, so, BM: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    inside = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * sx + cols[None, :], mask=inside, other=0.0)
    key = tl.load(key_ptr).to(tl.uint32, bitcast=True)
    kept = tl.where(_keep(rows, cols, K, key, t), x.to(tl.float32) * scale, 0.0)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * so + cols[None, :], kept.to(out_ptr.dtype.element_ty),
             mask=inside)


@triton.jit(do_not_specialize=["n"])
def _dequantize_kernel(codes_ptr, scales_ptr, levels_ptr, out_ptr, n,
                       NF4: tl.constexpr, QBLOCK: tl.constexpr, BLOCK: tl.constexpr):
    """out = level(code) * scales[value // QBLOCK] for n codes: NF4 bytes hold two values (high nibble first)
    whose levels come from levels_ptr; int8 codes are their own levels (scales hold absmax / 127)."""
    first = tl.program_id(0).to(tl.int64) * BLOCK
    i = first + tl.arange(0, BLOCK)
    live = i < n
    c = tl.load(codes_ptr + i, mask=live, other=0)
    if NF4:
        scale = tl.load(scales_ptr + (2 * i) // QBLOCK, mask=live, other=0.0)  # a byte's two values share a block
        hi = tl.load(levels_ptr + (c >> 4).to(tl.int32), mask=live, other=0.0) * scale
        lo = tl.load(levels_ptr + (c & 15).to(tl.int32), mask=live, other=0.0) * scale
        o = 2 * first + tl.arange(0, 2 * BLOCK)
        tl.store(out_ptr + o, tl.interleave(hi, lo).to(out_ptr.dtype.element_ty), mask=o < 2 * n)
    else:
        scale = tl.load(scales_ptr + i // QBLOCK, mask=live, other=0.0)
        tl.store(out_ptr + i, (c.to(tl.float32) * scale).to(out_ptr.dtype.element_ty), mask=live)
