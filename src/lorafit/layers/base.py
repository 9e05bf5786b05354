"""What every LoRA-wrapped layer shares: named adapters, activation, merging.

A wrapper holds the untouched frozen ``base_layer`` and, per adapter name, the
two low-rank factors. Subclasses say how the factors are shaped, how the
low-rank path is added to the base output, and what ``B A`` means as a change
of the base weight.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """At least float32 for products that are merged into a weight, so bf16/fp16 lose nothing extra."""
    return torch.promote_types(weight.dtype, torch.float32)


class LoraLayer(nn.Module):
    """Base class of the LoRA wrappers; not used directly."""

    # Attribute names of the factor dicts; PEFT names them differently for embeddings.
    a_name = "lora_A"
    b_name = "lora_B"
    # Set by lorafit.batched.adapter_per_row: a forward in which each batch row has its own adapter.
    row_plan = None

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        setattr(self, self.a_name, nn.ParameterDict())
        setattr(self, self.b_name, nn.ParameterDict())
        self.scaling: dict[str, float] = {}
        self.rank: dict[str, int] = {}
        self.dropout: dict[str, float] = {}
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False

    # Anything not found on the wrapper (in_features, weight, padding_idx, ...) is
    # the base layer's, so code that inspects the model keeps working.
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    # -- adapters ----------------------------------------------------------------
    @property
    def factors_a(self) -> nn.ParameterDict:
        return getattr(self, self.a_name)

    @property
    def factors_b(self) -> nn.ParameterDict:
        return getattr(self, self.b_name)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.factors_a.keys())

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def add_adapter(
        self,
        name: str,
        r: int,
        scale: float,
        dropout: float = 0.0,
        init: bool | str = True,
        dtype: torch.dtype | None = None,
        use_dora: bool = False,
    ) -> None:
        if use_dora:
            raise ValueError(
                f"DoRA (use_dora=True) is supported for Linear layers, not {type(self.base_layer).__name__}; "
                "exclude this module or turn DoRA off"
            )
        if name in self.factors_a:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        weight = self.base_layer.weight
        dtype = dtype or weight.dtype
        shape_a, shape_b = self.factor_shapes(r)
        a = nn.Parameter(torch.empty(shape_a, dtype=dtype, device=weight.device))
        b = nn.Parameter(torch.empty(shape_b, dtype=dtype, device=weight.device))
        self.factors_a[name] = a
        self.factors_b[name] = b
        self.rank[name] = r
        self.scaling[name] = scale
        self.dropout[name] = dropout
        self.init_factors(name, init)

    def init_factors(self, name: str, init: bool | str | None) -> None:
        """Default initialisation: ``B A = 0`` so the model's output is unchanged.

        ``None`` leaves the factors as allocated, for weights about to be loaded."""
        a, b = self.factors_a[name], self.factors_b[name]
        with torch.no_grad():
            if init is None:
                pass
            elif init is True:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                nn.init.zeros_(b)
            elif init == "gaussian":
                nn.init.normal_(a, std=1.0 / self.rank[name])
                nn.init.zeros_(b)
            elif init is False:
                # Not an identity: both factors random, as PEFT does for debugging.
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            else:
                raise ValueError(f"init_lora_weights={init!r} is not supported for {type(self.base_layer).__name__}")

    def remove_adapter(self, name: str) -> None:
        if name in self.merged:
            self.unmerge([name])
        del self.factors_a[name]
        del self.factors_b[name]
        for table in (self.scaling, self.rank, self.dropout):
            del table[name]
        if name in self.active:
            self.active.remove(name)

    def set_active(self, names: list[str]) -> None:
        self.active = [n for n in names if n in self.factors_a]

    # -- merging -----------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """The change ``s * B A`` in the base weight's layout, dtype and device."""
        raise NotImplementedError

    def merge(self, names: list[str] | None = None, safe: bool = False) -> None:
        if hasattr(self.base_layer, "dequantize"):
            raise ValueError(
                "cannot merge into a quantized base layer: the adapter would be rounded away by re-quantizing; "
                "use merge_and_unload, which dequantizes the base first"
            )
        weight = self.base_layer.weight
        for name in names if names is not None else list(self.active):
            if name in self.merged:
                continue
            delta = self.delta_weight(name)
            with torch.no_grad():
                if safe:
                    merged = weight + delta
                    if not torch.isfinite(merged).all():
                        raise ValueError(
                            f"merging adapter {name!r} would put NaN or inf into the weights of a "
                            f"{type(self.base_layer).__name__}; nothing was merged into this layer"
                        )
                    weight.copy_(merged)
                else:
                    weight.add_(delta)
            self.merged.append(name)

    def unmerge(self, names: list[str] | None = None) -> None:
        weight = self.base_layer.weight
        for name in list(reversed(self.merged)) if names is None else names:
            if name not in self.merged:
                continue
            with torch.no_grad():
                weight.sub_(self.delta_weight(name))
            self.merged.remove(name)

    # -- forward -----------------------------------------------------------------
    def unmerged_active(self) -> list[str]:
        if self.disabled:
            return []
        return [n for n in self.active if n not in self.merged]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.row_plan is not None:
            return self.row_plan(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for name in self.unmerged_active():
            result = self.add_lora(result, x, name)
        return result

    def add_lora(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        raise NotImplementedError

    def lora_input(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The LoRA path's input: cast to the adapter dtype, dropout in training only."""
        x = x.to(self.factors_a[name].dtype)
        p = self.dropout[name]
        if p > 0 and self.training:
            x = nn.functional.dropout(x, p=p, training=True)
        return x

    def extra_repr(self) -> str:
        parts = [f"{n}: r={self.rank[n]}, scale={self.scaling[n]:g}" for n in self.adapter_names]
        return "; ".join(parts)
