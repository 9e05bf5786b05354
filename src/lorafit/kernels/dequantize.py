"""Block-quantized weights (lorafit.quantize) back to floating point, on the device that holds them, and the
one place that picks how.

Each value is level(code) * scale of its block, computed in float32 and rounded once to the wanted dtype:
NF4 packs two 4-bit codes a byte (high nibble first) whose levels are the 16 NF4 values, with the block's
absmax as scale; int8 codes are their own levels, with absmax / 127 as scale.

- Triton (CUDA; the CPU under TRITON_INTERPRET=1): one pass that reads the codes and writes the weight.
- torch ops everywhere else, and on a GPU while the warm-up helper compiles the kernel: NF4 bytes look up a
  table of the 256 bytes' level pairs with an int32 index, a slice of rows at a time, so the temporaries stay
  a few MiB however large the weight (one int64 index and one float32 copy per value would be 12 bytes a
  weight: 2.8 GiB at a 70B model's 28672 x 8192 layers).

Both multiply the same float32 numbers and round once, so they agree bit for bit.
"""

from __future__ import annotations

import functools

import torch

from lorafit.kernels import triton_kernels

# The NF4 levels (QLoRA paper, appendix E): quantiles of a standard normal scaled to [-1, 1], an exact zero.
NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
_SLICE = 1 << 21  # values per torch-ops slice: 8 MiB of float32 temporaries


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, bits: int, block_size: int, shape, dtype: torch.dtype
               ) -> torch.Tensor:
    """The ``shape`` weight in ``dtype`` from its codes (NF4: uint8 bytes of two codes; 8 bits: int8) and the
    float32 absmax of each block of ``block_size`` values."""
    nf4 = bits == 4
    scales = absmax if nf4 else absmax / 127
    levels = nf4_levels(codes.device) if nf4 else None
    if triton_kernels.available(codes.device):
        out = triton_kernels.run(triton_kernels.dequantize, codes, scales, levels, block_size, tuple(shape), dtype)
        if out is not None:
            return out
    return with_torch_ops(codes, scales, nf4, block_size, shape, dtype)


def with_torch_ops(codes: torch.Tensor, scales: torch.Tensor, nf4: bool, block_size: int, shape,
                   dtype: torch.dtype) -> torch.Tensor:
    """``dequantize`` as torch ops, with each block's scale given (NF4: absmax; int8: absmax / 127)."""
    out = torch.empty(shape, dtype=dtype, device=codes.device)
    flat, per_code = out.view(-1, block_size), 2 if nf4 else 1
    rows = max(1, _SLICE // block_size)  # whole blocks a slice
    for first in range(0, flat.shape[0], rows):
        blocks = flat[first:first + rows]
        part = codes[first * block_size // per_code:(first + rows) * block_size // per_code]
        values = torch.index_select(_pair_table(codes.device), 0, part.int()) if nf4 else part
        # float32 product, rounded once on the store into out's dtype
        torch.mul(values.view(blocks.shape), scales[first:first + rows, None], out=blocks)
    return out


@functools.cache
def nf4_levels(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4, dtype=torch.float32, device=device)


@functools.cache
def _pair_table(device: torch.device) -> torch.Tensor:
    """256 x 2: the levels of a byte's high and low nibble."""
    levels, byte = nf4_levels(device), torch.arange(256, device=device)
    return torch.stack((levels[byte >> 4], levels[byte & 15]), dim=1)
