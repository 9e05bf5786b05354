"""A quantized frozen base (QLoRA): linear weights kept in 4-bit NF4 or 8 bits.

Weights are split into blocks of ``block_size`` values; each block stores its
absolute maximum and every value as a code relative to it.

- ``bits=4``: NF4, the 16 levels of the QLoRA paper (Dettmers et al., 2023):
  quantiles of a standard normal scaled to [-1, 1], an exact zero, two codes
  per byte.
- ``bits=8``: symmetric linear int8 per block.
- ``double_quant``: the per-block absmax values are themselves quantized
  (int8, blocks of 256, around their mean), 0.5 bits a parameter less for
  blocks of 64. The paper uses 8-bit floats here; int8 with a per-256 scale
  is the plain-PyTorch variant of the same idea.

The weight is dequantized on the fly in forward and again in backward (for
the input gradient), never kept: a custom autograd function saves only the
codes; ``lorafit.kernels.dequantize`` does that on each device (one Triton
pass on a GPU). LoRA wraps a ``QuantizedLinear`` like any linear layer;
``merge`` into it is refused (it would re-quantize the adapter away),
``merge_and_unload`` dequantizes it into a plain ``nn.Linear`` and merges there.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lorafit.kernels.dequantize import NF4, dequantize

SCALE_BLOCK = 256  # block size of the double-quantized absmax values
BLOCK_SIZE = 64  # values per quantization block unless asked otherwise (QLoRA's)
# Set on an nn.Linear whose weight LoftQ replaced by its quantized form: (bits, block_size) of that form
LOFTQ_GRID = "lorafit_loftq_grid"


def _blocks(weight: torch.Tensor, block_size: int, where: str) -> torch.Tensor:
    if weight.numel() % block_size:
        raise ValueError(
            f"{where}: a weight of shape {list(weight.shape)} ({weight.numel()} values) does not split into blocks "
            f"of {block_size}; choose a block_size that divides it or skip this layer"
        )
    return weight.detach().float().reshape(-1, block_size)


def quantize_nf4(weight: torch.Tensor, block_size: int = 64, where: str = "weight"):
    """(packed codes uint8 [n/2], absmax float32 [n/block])."""
    blocks = _blocks(weight, block_size, where)
    absmax = blocks.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    levels = torch.tensor(NF4, device=weight.device)
    # nearest level = the bucket between midpoints
    codes = torch.bucketize(blocks / absmax[:, None], (levels[1:] + levels[:-1]) / 2, out_int32=True).to(torch.uint8)
    codes = codes.flatten()
    return (codes[0::2] << 4) | codes[1::2], absmax


def quantize_int8(weight: torch.Tensor, block_size: int = 64, where: str = "weight"):
    blocks = _blocks(weight, block_size, where)
    absmax = blocks.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    codes = torch.round(blocks / absmax[:, None] * 127).to(torch.int8).flatten()
    return codes, absmax


def quantized_weight(weight: torch.Tensor, bits: int, block_size: int = BLOCK_SIZE, where: str = "weight"
                     ) -> torch.Tensor:
    """``weight`` quantized and dequantized again (float32, no double quantization): the weight a
    QuantizedLinear holding it computes with. Quantizing the result once more gives the same codes."""
    codes, absmax = (quantize_nf4 if bits == 4 else quantize_int8)(weight, block_size, where)
    return dequantize(codes, absmax, bits, block_size, tuple(weight.shape), torch.float32)


class QuantizedLinear(nn.Module):
    """A frozen linear layer whose weight lives in 4 or 8 bits; see the module docstring."""

    def __init__(self, linear: nn.Linear, bits: int = 4, block_size: int = BLOCK_SIZE, double_quant: bool = True,
                 compute_dtype: torch.dtype | None = None, where: str = "weight",
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 (NF4) or 8, got {bits!r}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits, self.block_size = bits, block_size
        self.compute_dtype = compute_dtype or linear.weight.dtype
        quant = quantize_nf4 if bits == 4 else quantize_int8
        weight = linear.weight.detach().to(device) if device is not None else linear.weight
        codes, absmax = quant(weight, block_size, where)
        self.register_buffer("codes", codes)
        self.double_quant = double_quant and absmax.numel() % SCALE_BLOCK == 0
        if self.double_quant:
            mean = absmax.mean()
            q, scale = quantize_int8(absmax - mean, SCALE_BLOCK)
            self.register_buffer("absmax_codes", q)
            self.register_buffer("absmax_scale", scale)
            self.register_buffer("absmax_mean", mean)
        else:
            self.register_buffer("absmax", absmax)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(weight.device, copy=True),
                                                                  requires_grad=False)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def block_absmax(self) -> torch.Tensor:
        if not self.double_quant:
            return self.absmax
        n = self.absmax_codes.numel()
        return dequantize(self.absmax_codes, self.absmax_scale, 8, SCALE_BLOCK, (n,), torch.float32) + self.absmax_mean

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.codes, self.block_absmax(), self.bits, self.block_size, self.shape,
                          dtype or self.compute_dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (computed on every access; not a parameter)."""
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuantizedLinearFunction.apply(x, self, self.bias)

    def extra_repr(self) -> str:
        kind = "nf4" if self.bits == 4 else "int8"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {kind}, "
                f"block_size={self.block_size}, double_quant={self.double_quant}")


class _QuantizedLinearFunction(torch.autograd.Function):
    """y = x W^T + b with W dequantized here and again in backward, never saved."""

    @staticmethod
    def forward(ctx, x, module, bias):
        ctx.module = module
        ctx.has_bias = bias is not None
        return F.linear(x, module.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, gy):
        gx = gy @ ctx.module.dequantize(gy.dtype) if ctx.needs_input_grad[0] else None
        gb = gy.reshape(-1, gy.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, None, gb


def quantize_base(model: nn.Module, bits: int = 4, block_size: int = BLOCK_SIZE, double_quant: bool = True,
                  skip: tuple[str, ...] = ("lm_head",), compute_dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (except names ending in ``skip``) by a QuantizedLinear, in place.

    ``device``: quantize there, one layer at a time, and keep the codes there (the rest of the model stays
    where it is, for the caller to move): a model on the CPU whose full-precision weights would not fit on the
    GPU is quantized by the GPU, in a fraction of the CPU's time, and only its quantized layers reach it.

    The base layers of LoRA wrappers are quantized too, matched by the wrapped module's name; the copies of
    ``modules_to_save`` are not. A layer whose weight LoftQ already put on a quantization grid keeps exactly
    that weight: it is quantized with LoftQ's block size and without double quantization, and must be asked
    for the bits LoftQ used."""
    from lorafit.quantized_base import is_torchao_linear  # here: quantized_base builds on this module

    targets = []
    for name, m in model.named_modules():
        parts = name.split(".")
        # a torchao layer is quantized already (its weight is not a float tensor to quantize)
        if type(m) is not nn.Linear or is_torchao_linear(m) or "modules_to_save" in parts \
                or "original_module" in parts:
            continue
        logical = ".".join(p for p in parts if p != "base_layer")
        if any(logical == s or logical.endswith("." + s) for s in skip):
            continue
        targets.append((name, m))
    if not targets:
        raise ValueError("quantize_base found no nn.Linear layer to quantize")
    quantized = {}
    for name, m in targets:  # all or nothing: an error leaves the model unchanged
        grid = getattr(m, LOFTQ_GRID, None)
        if grid is not None and grid[0] != bits:
            raise ValueError(f"{name}: LoftQ quantized this weight to {grid[0]} bits; quantize_base(bits={bits}) "
                             f"would quantize it again and lose what LoftQ's factors compensate: use bits={grid[0]}")
        quantized[name] = (QuantizedLinear(m, bits, block_size, double_quant, compute_dtype, where=name, device=device)
                           if grid is None else
                           QuantizedLinear(m, bits, grid[1], False, compute_dtype, where=name, device=device))
    for name, q in quantized.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
    return model
