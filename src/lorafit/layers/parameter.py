"""LoRA on a parameter of a module (``target_parameters``), such as the stacked expert weights of a mixture of
experts, which no linear layer holds.

The module runs with ``W + s B A`` in place of its parameter ``W`` (``torch.func.functional_call``), so it
needs no change: whatever it does with ``W`` (a loop over experts, grouped GEMMs) it does with the sum.

Layouts (PEFT's, so that adapter files move between the two):
- a 2-D parameter is ``(out, in)``, as ``nn.Linear``'s weight: ``A (r, in)``, ``B (out, r)``;
- a 3-D parameter is ``(experts, out, in)``, or ``(experts, in, out)`` where its module says
  ``is_transposed = True`` (transformers' experts that compute ``x @ W``). Each expert ``e`` has its own pair:
  ``A`` is ``(experts * r, in)`` with expert ``e``'s rows at ``e * r ... e * r + r - 1``; ``B`` is
  ``(out, r * experts)`` with expert ``e``'s rank-``k`` column at ``k * experts + e``.

Several parameters of one module get one wrapper each, nested in the order the module registers them (the
first innermost), as PEFT nests them: an adapter's tensors are then named alike in both tools.
"""

from __future__ import annotations

import torch
from torch import nn

from lorafit.layers.base import LoraLayer, compute_dtype


class ParameterLora(LoraLayer):
    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        weight = self.target_weight()
        if weight.ndim not in (2, 3) or not weight.is_floating_point():
            raise ValueError(f"target_parameters: {parameter_name!r} of {type(self.owner).__name__} is a "
                             f"{weight.ndim}-D {weight.dtype} tensor; lorafit adapts 2-D and 3-D float parameters")
        self.experts = weight.shape[0] if weight.ndim == 3 else 1
        self.transposed = weight.ndim == 3 and bool(getattr(self.owner, "is_transposed", False))
        *_, d1, d2 = weight.shape
        self.in_features, self.out_features = (d1, d2) if self.transposed else (d2, d1)

    @property
    def owner(self) -> nn.Module:
        """The module that holds the parameter, inside any other parameter wrappers."""
        module = self.base_layer
        while isinstance(module, ParameterLora):
            module = module.base_layer
        return module

    def target_weight(self) -> torch.Tensor:
        return self.owner._parameters[self.parameter_name]

    def factor_shapes(self, r: int):
        return (self.experts * r, self.in_features), (self.out_features, r * self.experts)

    def _per_expert(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_e, B_e) stacked over experts: (experts, r, in) and (experts, out, r), views of the factors."""
        a, b = self.factors_a[name].to(dtype), self.factors_b[name].to(dtype)
        e = self.experts
        return a.view(e, -1, a.shape[-1]), b.view(b.shape[0], -1, e).permute(2, 0, 1)

    def delta_weight(self, name: str) -> torch.Tensor:
        weight = self.target_weight()
        a, b = self._per_expert(name, compute_dtype(weight))
        delta = (a.transpose(1, 2) @ b.transpose(1, 2) if self.transposed else b @ a) * self.scaling[name]
        return delta if weight.ndim == 3 else delta[0]

    def adapted_weight(self, names: list[str]) -> torch.Tensor:
        """``W + sum s B A`` over adapters ``names``, in W's dtype: one (batched) GEMM per adapter, adding into
        W's copy, and no delta-sized temporary. Outside autocast, which would round it to its own dtype: the
        module may use its parameter in ops that autocast does not cast, which expect W's dtype."""
        weight = self.target_weight()
        with torch.autocast(weight.device.type, enabled=False):
            return self._add_products(weight, names)

    def _add_products(self, weight: torch.Tensor, names: list[str]) -> torch.Tensor:
        for name in names:
            a, b = self._per_expert(name, weight.dtype)
            s = self.scaling[name]
            if weight.ndim == 2:
                weight = torch.addmm(weight, b[0], a[0], alpha=s)
            elif self.transposed:
                weight = torch.baddbmm(weight, a.transpose(1, 2), b.transpose(1, 2), alpha=s)
            else:
                weight = torch.baddbmm(weight, b, a, alpha=s)
        return weight

    def forward(self, *args, **kwargs):
        if self.row_plan is not None:  # lorafit.batched: rows without any of this layer's adapters
            return self.row_plan(*args, **kwargs)
        return self._run(args, kwargs, {})

    def _run(self, args: tuple, kwargs: dict, swaps: dict[str, torch.Tensor]):
        names = self.unmerged_active()
        if names:
            swaps = {**swaps, self.parameter_name: self.adapted_weight(names)}
        inner = self.base_layer
        if isinstance(inner, ParameterLora):
            return inner._run(args, kwargs, swaps)
        if not swaps:
            return inner(*args, **kwargs)
        return torch.func.functional_call(inner, swaps, args, kwargs)

    def extra_repr(self) -> str:
        experts = f", {self.experts} experts" if self.experts > 1 else ""
        return f"parameter={self.parameter_name!r}{experts}; " + super().extra_repr()
