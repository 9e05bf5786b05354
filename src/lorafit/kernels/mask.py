"""Dropout keep-masks that backward recomputes instead of storing.

An adapter's mask is a hash of a random 32-bit key and each element's position
i (row * columns + column, mod 2^32):

    keep(i) = high 16 bits of mix(i xor key) >= round(p 2^16)

with ``mix`` Chris Wellons' "lowbias32" integer hash (two multiply-xorshift
rounds; its last xorshift leaves the high bits alone, so it is skipped). A
fresh key is drawn per call from the device's default generator, so
``torch.manual_seed`` makes masks repeatable and a resumed run redraws the
same ones. The drop probability is p rounded to a multiple of 2^-16 (0.1
becomes 0.1000061); ``threshold`` returns the rescale for that exact
probability, so E[keep * rescale] = 1.

Why a hash: the device generator runs on one thread on a CPU, and drawing
bits there cost more than the rest of the LoRA path. The hash is plain
integer arithmetic that one loop can compute while it applies the mask, on
all cores and vectorised; since the mask is a function of (key, position),
forward keeps nothing but the key and backward regenerates the mask inside
each loop that uses it. The same key gives the same mask on every device and
in every dtype: the C kernels (CPU), the Triton kernels (CUDA) and the eager
torch ops below (everything else, and the reference the tests compare with)
compute one formula.
"""

from __future__ import annotations

import functools

import torch

from lorafit.kernels import cpu, triton_kernels

_LEVELS = 1 << 16
# lowbias32's multipliers as signed 32-bit values: torch's int32 arithmetic wraps like uint32's
_M1 = 0x7FEB352D
_M2 = 0x846CA68B - (1 << 32)
# The most elements the eager torch ops mask at once, where Triton is unavailable or its kernels are still
# being compiled (triton_warmup.py): keep_mask's temporaries take 4 bytes per element they cover (8 past 2^31
# elements), several at a time, so a whole 8192 x 8192 activation's would take about a gigabyte.
_BLOCK = 1 << 24


@functools.cache  # called for every masked product; a model has a handful of distinct p
def threshold(p: float) -> tuple[int, float]:
    """(t, 1 / P(keep)) for dropout probability p: an element is kept where its hash, as a signed int32, is >= t."""
    drop = min(round(p * _LEVELS), _LEVELS - 1)
    return drop * _LEVELS - (1 << 31), _LEVELS / (_LEVELS - drop)


def new_key(device: torch.device) -> torch.Tensor:
    """A mask's key: a 0-d int32 tensor from the device's default generator (no host sync on GPUs)."""
    return torch.randint(-(1 << 31), (1 << 31) - 1, (), dtype=torch.int32, device=device)


def _shift_right(v: torch.Tensor, k: int) -> torch.Tensor:
    return (v >> k) & ((1 << (32 - k)) - 1)  # logical, not arithmetic: int32 has no unsigned shift


def keep_mask(rows: int, cols: int, key: torch.Tensor, t: int, first_row: int = 0) -> torch.Tensor:
    """The bool keep-mask of ``key`` at threshold ``t`` (see ``threshold``) for rows ``first_row`` to
    ``first_row + rows`` of a matrix with ``cols`` columns: plain torch ops, on key's device."""
    device = key.device
    # the positions of a block of whole rows are consecutive: row * cols + col runs from first_row * cols on
    start, n = first_row * cols, rows * cols
    if start + n < 1 << 31:
        v = torch.arange(start, start + n, dtype=torch.int32, device=device)
    else:  # in int64, then mod 2^32 as a signed int32: exact at any size (an int32 arange would overflow)
        i = torch.arange(start, start + n, dtype=torch.int64, device=device) & 0xFFFFFFFF
        v = torch.where(i >= 1 << 31, i - (1 << 32), i).to(torch.int32)
    v = v.view(rows, cols) ^ key
    v = (v ^ _shift_right(v, 16)) * _M1
    v = (v ^ _shift_right(v, 15)) * _M2
    # v uniform over int32: v >= t with t = drop 2^16 - 2^31 drops drop / 2^16 of the elements,
    # and only v's high 16 bits decide
    return v >= t


def dropped(x: torch.Tensor, key: torch.Tensor, t: int, scale: float = 1.0, triton: bool = True) -> torch.Tensor:
    """A new tensor: scale * x where ``keep_mask`` keeps, else 0, for 2-D x. ``triton``: whether the Triton mask
    kernel may run (products.py says False where a product's own kernel is still being compiled)."""
    if cpu.serves(x):
        if x.dtype == torch.float32 and scale != 1.0:
            return cpu.dropout_scale(x, int(key), t, scale)  # mask and rescale in one pass
        out = torch.empty(x.shape, dtype=x.dtype)
        cpu.mask_into(x, out, int(key), t)
        return out.mul_(scale) if scale != 1.0 else out
    if (triton and x.dtype != torch.float64 and triton_kernels.available(x.device) and not torch.compiler.is_compiling()
            and (out := triton_kernels.run(triton_kernels.mask_scale, x, key, t, scale)) is not None):
        return out
    rows, cols = x.shape
    if x.numel() <= _BLOCK or torch.compiler.is_compiling():  # inductor fuses the mask: no temporaries
        kept = torch.where(keep_mask(rows, cols, key, t), x, 0)
    else:  # a block of rows at a time: keep_mask's temporaries take 4-8 bytes per element covered
        kept, zero = torch.empty_like(x), x.new_zeros(())
        step = max(1, _BLOCK // cols)
        for first in range(0, rows, step):
            part = x[first:first + step]
            torch.where(keep_mask(part.shape[0], cols, key, t, first), part, zero, out=kept[first:first + step])
    return kept.mul_(scale) if scale != 1.0 else kept


def _dropped_rows(x: torch.Tensor, key: torch.Tensor, t: int, scale: float) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)  # element (row, col): row-major position
    return dropped(rows, key, t, scale).view(x.shape)


# The same for a tensor of any shape, as one op torch.compile sees (HashedDropout's forward and backward)
_dropped_op = torch.library.custom_op("lorafit::hashed_dropout", _dropped_rows, mutates_args=())
_dropped_op.register_fake(lambda x, key, t, scale: torch.empty_like(x))


def dropped_any(x: torch.Tensor, key: torch.Tensor, t: int, scale: float) -> torch.Tensor:
    """scale * x where the keep-mask of x's row-major positions keeps, else 0, for x of any shape."""
    return _dropped_op(x, key, t, scale) if torch.compiler.is_compiling() else _dropped_rows(x, key, t, scale)
