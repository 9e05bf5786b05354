"""LoRA for ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``.

``A`` is a convolution with the base layer's kernel, stride, padding and
dilation but ``r`` output channels; ``B`` is a 1x1 convolution from ``r`` to the
base layer's output channels. Because ``B`` is pointwise, the pair equals one
convolution with weight ``B A`` (contracted over r), which is what merging adds.

On a grouped convolution (``groups`` G > 1: depthwise convolutions, ConvNeXt,
MobileNet, Mamba's conv1d) the factors are PEFT's: ``A`` sees every input
channel (r x C_in x kernel) and ``B`` is a grouped 1x1 convolution
(C_out x r/G), so r must be a multiple of G. Output channel o then reads the
r/G rows of ``A`` of its group. ``B A`` is a dense kernel, where the base
weight holds only each group's input channels: such an adapter cannot be
merged, and DoRA (whose norms are those of the merged weight) is refused.
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
        super().__init__(base_layer)
        self._conv = conv_function(base_layer)
        self.b_groups = base_layer.groups

    def factor_shapes(self, r: int):
        out_ch, _, *kernel = self.base_layer.weight.shape
        if r % self.b_groups:
            raise ValueError(f"a LoRA adapter on a grouped convolution (groups={self.b_groups}) needs a rank that is "
                             f"a multiple of groups (B is a grouped 1x1 convolution), got r={r}; choose another r "
                             "(rank_pattern) or exclude this module")
        return (r, self.base_layer.in_channels, *kernel), (out_ch, r // self.b_groups, *([1] * len(kernel)))

    def add_adapter(self, name: str, r: int, scale: float, dropout: float = 0.0, init: bool | str = True,
                    dtype: torch.dtype | None = None, use_dora: bool = False, bias: bool = False,
                    kasa: bool = False) -> None:
        if self.b_groups > 1 and use_dora:
            raise ValueError(f"DoRA (use_dora=True) on a grouped convolution (groups={self.b_groups}) is not "
                             "supported: its norms are those of the merged weight, and B A is a dense kernel that a "
                             "grouped weight cannot hold; exclude this module or turn DoRA off")
        if self.b_groups > 1 and init == "orthogonal":
            raise ValueError(f"init_lora_weights='orthogonal' on a grouped convolution (groups={self.b_groups}) is not "
                             "supported: its B A = 0 needs a dense B; exclude this module or choose another "
                             "initialisation")
        super().add_adapter(name, r, scale, dropout, init, dtype, use_dora, bias, kasa)

    def init_factors(self, name: str, init: bool | str | None) -> None:
        if modifies_base_weight(init) or init == "nora":
            raise ValueError(f"init_lora_weights={init!r} is only supported for Linear layers, not convolutions")
        super().init_factors(name, init)

    def merge_refusal(self, name: str) -> str | None:
        if self.b_groups == 1:
            return None
        return (f"adapter {name!r} is on a grouped convolution (groups={self.b_groups}): its B A is a dense kernel "
                f"over all {self.base_layer.in_channels} input channels, and the base weight holds "
                f"{self.base_layer.in_channels // self.b_groups} per group, so it cannot be merged; keep it unmerged "
                "(PEFT cannot merge it either)")

    def delta_weight(self, name: str) -> torch.Tensor:
        refusal = self.merge_refusal(name)
        if refusal:
            raise ValueError(refusal)
        weight = self.base_layer.weight
        dt = compute_dtype(weight)
        return (self.b_matrix(name).to(dt) @ self.factors_a[name].to(dt).flatten(1)).view(weight.shape) * \
            self.scaling[name]

    def _down(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The A convolution: the base layer's own conv call (its padding_mode and string paddings exactly), over
        every input channel also where the base convolution is grouped."""
        base = self.base_layer
        if self.b_groups == 1:
            return base._conv_forward(x, a, None)
        if base.padding_mode != "zeros":
            x = nn.functional.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
            return self._conv(x, a, None, base.stride, 0, base.dilation)
        return self._conv(x, a, None, base.stride, base.padding, base.dilation)

    def _up(self, h: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self._conv(h, b, bias, 1, 0, 1, self.b_groups)

    def add_lora(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        a, b = self.factors_a[name], self.factors_b[name]
        h = self._down(self.lora_input(x, name), a)
        return result + (self._up(h, b, self.lora_B_bias.get(name)) * self.scaling[name]).to(result.dtype)

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
        return self._up(self._down(x.to(a.dtype), a), b) * self.scaling[name]


