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
        return self._run(args, kwargs, {}, [])

    def _run(self, args: tuple, kwargs: dict, swaps: dict[str, torch.Tensor], sums: list):
        names = self.unmerged_active()
        if names:
            weight = self.adapted_weight(names)
            swaps = {**swaps, self.parameter_name: weight}
            sums = [*sums, (weight, self, names)]
        inner = self.base_layer
        if isinstance(inner, ParameterLora):
            return inner._run(args, kwargs, swaps, sums)
        if not swaps:
            return inner(*args, **kwargs)
        if not any(w.requires_grad for w, _, _ in sums) or not _no_other_saved_tensor_hooks():
            return torch.func.functional_call(inner, swaps, args, kwargs)
        with _formed_again_in_backward(sums):
            return torch.func.functional_call(inner, swaps, args, kwargs)

    def extra_repr(self) -> str:
        experts = f", {self.experts} experts" if self.experts > 1 else ""
        return f"parameter={self.parameter_name!r}{experts}; " + super().extra_repr()


# -- W + s B A formed again in backward -------------------------------------------------------------------
# The module's products keep the weight they were given for backward (dx = dy W): a parameter they keep costs
# nothing, but W + s B A is a new weight-sized tensor per adapted parameter, kept from the forward to the
# backward of its layer (a whole expert stack per layer of a mixture of experts). Backward forms it again
# instead, one (batched) GEMM per adapter, from the factors and W it was formed from.

_FORMED = object()  # marks what the pack hook kept in place of a view of the sum


def _no_other_saved_tensor_hooks() -> bool:
    """Whether nobody else decides what autograd keeps here (activation checkpointing and offloading do it
    with these hooks, and inner hooks would hide tensors from theirs) and this torch can say so."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    compiling = getattr(torch.compiler, "is_compiling", lambda: False)
    if top is None or compiling():
        return False
    try:
        return top(False) is None
    except TypeError:  # another signature: do not guess
        return False


def _versions(layer: ParameterLora, names: list[str]) -> tuple[int, ...]:
    tensors = [layer.target_weight()] + [t for n in names for t in (layer.factors_a[n], layer.factors_b[n])]
    return tuple(t._version for t in tensors)


def _formed_again_in_backward(sums: list):
    """saved_tensors_hooks under which a view of one of the sums is kept as how to form it again."""
    known = {(w.device, w.untyped_storage().data_ptr()): (i, w.dtype, layer, names, _versions(layer, names))
             for i, (w, layer, names) in enumerate(sums)}
    formed: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor):
        entry = known.get((t.device, t.untyped_storage().data_ptr()))
        if entry is None or t.dtype != entry[1]:
            return t
        return (_FORMED, entry, tuple(t.shape), t.stride(), t.storage_offset())

    def unpack(packed):
        if not (isinstance(packed, tuple) and packed and packed[0] is _FORMED):
            return packed
        _, (i, _, layer, names, versions), shape, stride, offset = packed
        if i not in formed:
            if _versions(layer, names) != versions:
                raise RuntimeError(f"the adapter factors or the weight of {layer.parameter_name!r} were changed in "
                                   "place between forward and backward (by an optimizer step?); backward needs them "
                                   "as they were")
            formed[i] = layer.adapted_weight(names)
        return formed[i].as_strided(shape, stride, offset)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)
