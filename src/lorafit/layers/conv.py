"""LoRA for ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``.

``A`` is a convolution with the base layer's kernel, stride, padding and
dilation but ``r`` output channels; ``B`` is a 1x1 convolution from ``r`` to the
base layer's output channels. Because ``B`` is pointwise, the pair equals one
convolution with weight ``B A`` (contracted over r), which is what merging adds.
"""

from __future__ import annotations


import torch
from torch import nn

from lorafit.config import modifies_base_weight
from lorafit.layers.base import LoraLayer, compute_dtype


CONVOLUTIONS = {nn.Conv1d: nn.functional.conv1d, nn.Conv2d: nn.functional.conv2d, nn.Conv3d: nn.functional.conv3d}


def conv_function(layer: nn.Module):
    """The functional convolution of a Conv1d / Conv2d / Conv3d layer (also of a subclass)."""
    return next(f for kind, f in CONVOLUTIONS.items() if isinstance(layer, kind))


class Conv(LoraLayer):
    bias_capable = True
    dora_capable = True

    def __init__(self, base_layer: nn.Module) -> None:
        if base_layer.groups != 1:
            raise ValueError(
                f"LoRA on a grouped convolution (groups={base_layer.groups}) is not supported; "
                "exclude this module from target_modules"
            )
        super().__init__(base_layer)
        self._pointwise = conv_function(base_layer)

    def factor_shapes(self, r: int):
        out_ch, in_ch, *kernel = self.base_layer.weight.shape
        return (r, in_ch, *kernel), (out_ch, r, *([1] * len(kernel)))

    def init_factors(self, name: str, init: bool | str | None) -> None:
        if modifies_base_weight(init):
            raise ValueError(f"init_lora_weights={init!r} is only supported for Linear layers, not convolutions")
        super().init_factors(name, init)

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.factors_a[name], self.factors_b[name]
        weight = self.base_layer.weight
        dt = compute_dtype(weight)
        return (b.to(dt).flatten(1) @ a.to(dt).flatten(1)).view(weight.shape) * self.scaling[name]

    def add_lora(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        a, b = self.factors_a[name], self.factors_b[name]
        # The base layer's own conv call, so padding_mode and string paddings match exactly.
        h = self.base_layer._conv_forward(self.lora_input(x, name), a, None)
        return result + (self._pointwise(h, b, self.lora_B_bias.get(name)) * self.scaling[name]).to(result.dtype)

    # DoRA: a magnitude per output channel, stored as PEFT's (1, out_channels, 1, ...)
    def dora_rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.flatten(1)

    def feature_view(self, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return v.view(-1, *[1] * (weight.dim() - 1))

    def output_view(self, v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return v.view(-1, *[1] * (out.dim() - 2))

    def magnitude_shape(self) -> tuple[int, ...]:
        weight = self.base_layer.weight
        return (1, weight.shape[0], *[1] * (weight.dim() - 2))

    def frozen_output(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.base_layer._conv_forward(x, weight.to(x.dtype), None)

    def low_rank(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a, b = self.factors_a[name], self.factors_b[name]
        h = self.base_layer._conv_forward(x.to(a.dtype), a, None)
        return self._pointwise(h, b) * self.scaling[name]


