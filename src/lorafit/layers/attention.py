"""LoRA on torch's ``nn.MultiheadAttention``.

The attention holds its query/key/value projection as one parameter (``in_proj_weight``, 3E x E) and reads
``out_proj.weight`` and ``out_proj.bias`` itself, never calling ``out_proj``: no layer wrapper would see
either. Both are adapted as parameters (``lorafit.layers.parameter``): the attention runs with
``W + s B A`` in place of each, so its own code (and its fused inference path) computes with the sums.

Every adapter adapts both projections with the same rank and scale, in PEFT's layout: the in-projection's
factors on this wrapper (``<mha>.lora_A`` r x E, ``<mha>.lora_B`` 3E x r), the out-projection's on a parameter
wrapper in place of ``out_proj`` (``<mha>.base_layer.out_proj.lora_A`` / ``lora_B``). As in PEFT the
adapters act through the weights, so they take no dropout.
"""

from __future__ import annotations

import torch
from torch import nn

from lorafit.layers.parameter import ParameterLora


class MultiheadAttentionLora(ParameterLora):
    def __init__(self, base_layer: nn.MultiheadAttention) -> None:
        if not base_layer._qkv_same_embed_dim:
            raise ValueError(f"nn.MultiheadAttention with kdim={base_layer.kdim} / vdim={base_layer.vdim} other than "
                             f"embed_dim={base_layer.embed_dim} keeps separate q/k/v weights; lorafit (as PEFT) "
                             "adapts only the packed in_proj_weight")
        out_proj = base_layer.out_proj
        if not isinstance(out_proj, nn.Linear):
            raise ValueError(f"nn.MultiheadAttention's out_proj is a {type(out_proj).__name__}, not an nn.Linear; "
                             "lorafit adapts the attention's own projections only")
        super().__init__(base_layer, "in_proj_weight")
        wrapper = ParameterLora(out_proj, "weight")
        wrapper.train(out_proj.training)
        base_layer.out_proj = wrapper

    @property
    def out_proj_lora(self) -> ParameterLora:
        """The out-projection's wrapper, which holds the same adapters' other factors."""
        return self.base_layer.out_proj

    def add_adapter(self, name: str, r: int, scale: float, dropout: float = 0.0, init: bool | str = True,
                    dtype: torch.dtype | None = None, use_dora: bool = False, bias: bool = False,
                    kasa: bool = False) -> None:
        super().add_adapter(name, r, scale, dropout, init, dtype, use_dora, bias, kasa)
        self.out_proj_lora.add_adapter(name, r, scale, dropout, init, dtype)

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)
        out = self.base_layer.out_proj
        if isinstance(out, ParameterLora) and name in out.adapter_names:  # model ops remove it there first
            out.remove_adapter(name)

    def _run(self, args: tuple, kwargs: dict, swaps: dict[str, torch.Tensor], sums: list):
        out = self.out_proj_lora
        names = out.unmerged_active()
        if names:
            weight = out.adapted_weight(names)
            swaps = {**swaps, "out_proj.base_layer.weight": weight}
            sums = [*sums, (weight, out, names)]
        return super()._run(args, kwargs, swaps, sums)
