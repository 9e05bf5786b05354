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
each loop that uses it. On a CPU those loops are cpu_kernels.c (float32
LoRA products with the mask fused in, and a mask for any dtype); on other
devices they are these torch ops, compiled by
``torch.compile``. Where neither can be built, the torch ops run eagerly:
the same masks, slower.
"""

from __future__ import annotations

import warnings

import torch

from lorafit.layers import cpu_kernels

_LEVELS = 1 << 16
# lowbias32's multipliers as signed 32-bit values: torch's int32 arithmetic wraps like uint32's
_M1 = 0x7FEB352D
_M2 = 0x846CA68B - (1 << 32)


def threshold(p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """(t, 1 / P(keep)) for dropout probability p: an element is kept where its hash, as a signed
    int32, is >= t (a 0-d int32 tensor: as a Python int, inductor would not parallelise the loop)."""
    drop = min(round(p * _LEVELS), _LEVELS - 1)
    t = torch.full((), drop * _LEVELS - (1 << 31), dtype=torch.int32, device=device)
    return t, _LEVELS / (_LEVELS - drop)


def new_key(device: torch.device) -> torch.Tensor:
    """A mask's key: a 0-d int32 tensor from the device's default generator (no host sync on GPUs)."""
    return torch.randint(-(1 << 31), (1 << 31) - 1, (), dtype=torch.int32, device=device)


def _shift_right(v: torch.Tensor, k: int) -> torch.Tensor:
    return (v >> k) & ((1 << (32 - k)) - 1)  # logical, not arithmetic: int32 has no unsigned shift


def keep_mask(rows: int, cols: int, key: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The (rows x cols) bool keep-mask of ``key`` at threshold ``t`` (see ``threshold``)."""
    device = key.device
    v = torch.arange(rows, dtype=torch.int32, device=device)[:, None] * cols
    v = (v + torch.arange(cols, dtype=torch.int32, device=device)) ^ key
    v = (v ^ _shift_right(v, 16)) * _M1
    v = (v ^ _shift_right(v, 15)) * _M2
    # v uniform over int32: v >= t with t = drop 2^16 - 2^31 drops drop / 2^16 of the elements,
    # and only v's high 16 bits decide
    return v >= t


def _dropped(x, key, t):
    return torch.where(keep_mask(x.shape[0], x.shape[1], key, t), x, 0)


def _add_masked(total, part, key, t):
    return (total + torch.where(keep_mask(part.shape[0], part.shape[1], key, t), part, 0)).to(total.dtype)


class _Compiled:
    """One function, compiled on first use (dynamic shapes); run eagerly where compiling fails."""

    broken = False  # shared: once the compiler fails, stop trying

    def __init__(self, fn):
        self.fn, self.compiled = fn, None

    def __call__(self, *args):
        if _Compiled.broken or torch.compiler.is_compiling():
            return self.fn(*args)  # inside a user's torch.compile the plain ops get traced instead
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, dynamic=True)
        try:
            return self.compiled(*args)
        except Exception as err:  # noqa: BLE001 - any compiler failure: the eager ops give the same masks
            _Compiled.broken = True
            warnings.warn(f"lorafit: compiling the dropout kernels failed ({type(err).__name__}: {err}); "
                          "LoRA dropout runs eagerly from now on (same masks, slower)", stacklevel=3)
            return self.fn(*args)


_compiled_dropped = _Compiled(_dropped)
_compiled_add_masked = _Compiled(_add_masked)


def dropped(x: torch.Tensor, key: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A new tensor: the 2-D x with the elements ``keep_mask`` drops set to 0 (no rescale)."""
    if not cpu_kernels.serves(x):
        return _compiled_dropped(x, key, t)
    out = torch.empty(x.shape, dtype=x.dtype)
    cpu_kernels.mask_into(x, out, int(key), int(t))
    return out


def add_masked(total: torch.Tensor, part: torch.Tensor, key: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """total + (part with the elements ``keep_mask`` drops set to 0), in total's dtype. Both are
    temporaries of the caller: on a CPU the result is total itself, and part is overwritten."""
    if not (cpu_kernels.serves(part) and part.is_contiguous()):
        return _compiled_add_masked(total, part, key, t)
    cpu_kernels.mask_into(part, part, int(key), int(t))
    return total.add_(part)
