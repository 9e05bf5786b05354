"""Frozen linear layers whose weight is stored quantized, as LoRA bases: lorafit's own ``QuantizedLinear``
(lorafit.quantize), bitsandbytes' ``Linear4bit`` / ``Linear8bitLt``, which transformers builds for a model
loaded with ``BitsAndBytesConfig(load_in_4bit=True)`` or ``load_in_8bit=True`` (QLoRA as most users run it),
and an ``nn.Linear`` whose weight is one of torchao's quantized tensors (``torchao.quantization.quantize_``
with int8 or float8 weight-only configs, ``TorchAoConfig`` in transformers, torchao's ``NF4Tensor`` as
torchtune's QLoRA uses it), whose forward dispatches to torchao.

The adapter runs beside such a layer: the layer's own forward computes ``x W^T + b`` from its codes, and the
low-rank path adds to it. What else needs the weight (DoRA's norms, ``merge_and_unload``, MiCA) gets it
dequantized here, one layer at a time and never kept. Merging into the codes is refused (re-quantizing would
round most of the adapter away); ``merge_and_unload`` dequantizes the layers into plain ``nn.Linear`` first.

bitsandbytes layers and torchao tensors are recognised by their classes' names and modules, so the core
imports neither library.
"""

from __future__ import annotations

import torch
from torch import nn

from lorafit.quantize import QuantizedLinear

_BNB_LINEARS = ("Linear4bit", "Linear8bitLt")


def _bitsandbytes_kind(module: nn.Module) -> str | None:
    """The class name a bitsandbytes layer derives from (Linear4bit or Linear8bitLt), or None."""
    if not (isinstance(module, nn.Linear) and type(module).__module__.startswith("bitsandbytes")):
        return None
    return next((cls.__name__ for cls in type(module).__mro__ if cls.__name__ in _BNB_LINEARS), None)


def is_bitsandbytes_linear(module: nn.Module) -> bool:
    return _bitsandbytes_kind(module) is not None


def is_torchao_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` whose weight torchao replaced by one of its quantized tensor subclasses."""
    return isinstance(module, nn.Linear) and type(module.weight).__module__.startswith("torchao.")


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, QuantizedLinear) or is_bitsandbytes_linear(module) or is_torchao_linear(module)


def _quant_state(module: nn.Module):
    """A bitsandbytes 4-bit layer's quantization state: on its weight, or (older releases) on the layer."""
    weight = module.weight
    return weight.quant_state if weight.quant_state is not None else module.quant_state


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as floating point, ``(out_features, in_features)``: in the dtype the model was
    loaded in for bitsandbytes 4-bit, float32 for its 8-bit codes, the compute dtype for lorafit's own."""
    if isinstance(module, QuantizedLinear):
        return module.dequantize()
    if is_torchao_linear(module):
        weight = module.weight
        # NF4Tensor's dequantize is a static helper of other arguments; its whole weight is get_original_weight
        return weight.get_original_weight() if hasattr(weight, "get_original_weight") else weight.dequantize()
    kind = _bitsandbytes_kind(module)
    if kind is None:
        return module.weight
    import bitsandbytes as bnb

    weight = module.weight
    if weight.is_floating_point():  # not quantized yet (before its move to a device), or 8-bit with fp16 weights
        return weight
    if kind == "Linear4bit":
        state = _quant_state(module)
        if getattr(state, "packing_format_for_cpu", False):
            # CPU inference repacks the codes for its AVX-512 kernel; back to the layout dequantize_4bit reads,
            # in place, as bitsandbytes itself does before saving or moving the layer
            weight.data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(weight.data, state)
            weight.quant_state = state
        return bnb.functional.dequantize_4bit(weight.data, state)
    scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
    if scales is None:
        raise ValueError(f"a {type(module).__name__} holds int8 codes without their scales (SCB): it cannot be "
                         "dequantized")
    return bnb.functional.int8_vectorwise_dequant(weight.data, scales.to(weight.device))


def dense_dtype(module: nn.Module) -> torch.dtype:
    """The dtype ``dense_weight`` returns, without dequantizing anything: what a product merged with the weight
    needs to know, per forward for DoRA."""
    if isinstance(module, QuantizedLinear):
        return module.compute_dtype
    kind = _bitsandbytes_kind(module)
    weight = module.weight
    if kind is None or weight.is_floating_point():
        return weight.dtype
    if kind == "Linear4bit":
        return _quant_state(module).dtype
    return torch.float32  # int8_vectorwise_dequant's


def dense_source(module: nn.Module) -> torch.Tensor:
    """The stored tensor ``dense_weight`` computes from (lorafit's codes; bitsandbytes' weight holds its codes)."""
    return module.codes if isinstance(module, QuantizedLinear) else module.weight


def dense_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a linear layer, quantized or not, without dequantizing it."""
    if is_quantized(module):
        return module.out_features, module.in_features
    return tuple(module.weight.shape)


def uncounted_weight(module: nn.Module) -> int:
    """How many of a quantized layer's weight values ``model.parameters()`` does not show: all of lorafit's
    (its codes are buffers), half of bitsandbytes' 4-bit ones (two codes a byte), none of its 8-bit ones or of
    torchao's (whose tensors have the weight's shape)."""
    stored = 0 if isinstance(module, QuantizedLinear) else module.weight.numel()
    return module.in_features * module.out_features - stored


def to_linear(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    """A plain ``nn.Linear`` with the dequantized weight and the bias, in ``dtype`` (else the dequantized
    weight's: bitsandbytes' 8-bit codes come back as float32)."""
    weight = dense_weight(module).detach()
    dtype = dtype or weight.dtype
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                       device=weight.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    return linear


def forget_quantization(model: nn.Module) -> None:
    """After every quantized layer of a transformers model became a plain one: the model no longer claims to be
    quantized, so ``save_pretrained`` writes a float model that loads as one."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    for attr in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, attr, False):
            setattr(model, attr, False)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None

