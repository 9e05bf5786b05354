"""DoRA: weight-decomposed LoRA (Liu et al., 2024), for linear layers.

The adapted weight is split into a direction and a learned magnitude per
output feature:  W' = m * (W + s B A) / ||W + s B A||,  the norm taken over the
input dimension of each output row (the paper's column norm of W^T). As the
authors recommend, the norm is treated as a constant in backward (detached).

In forward, with y0 = x W^T (no bias) and f = m / ||W + s B A||:
    y = b + f * (y0 + s x A^T B^T) = base(x) + (f - 1) y0 + f s x A^T B^T.
With dropout active, PEFT applies the extra terms to dropout(x) (recomputing
x W^T on it), and so do we, so that the same adapter trains the same way.
``m`` starts as ||W|| (B = 0), so a fresh DoRA adapter changes nothing.
"""

from __future__ import annotations

import torch
from torch import nn


def row_norm(weight_rows: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output row of a (d_out, d_in) matrix."""
    return torch.linalg.vector_norm(weight_rows, dim=1)


def weight_rows(layer) -> torch.Tensor:
    """The base weight as (d_out, d_in), whatever its storage layout."""
    w = layer.base_layer.weight
    return w.T if layer.fan_in_fan_out else w


def adapted_norm(layer, name: str) -> torch.Tensor:
    a, b = layer.factors_a[name], layer.factors_b[name]
    w = weight_rows(layer)
    dt = torch.promote_types(w.dtype, torch.float32)
    return row_norm(w.to(dt) + layer.scaling[name] * (b.to(dt) @ a.to(dt)))


def init_magnitude(layer, name: str) -> nn.Parameter:
    with torch.no_grad():
        m = adapted_norm(layer, name)
    return nn.Parameter(m.to(layer.factors_a[name].dtype))


def add_dora(layer, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    a, b, s = layer.factors_a[name], layer.factors_b[name], layer.scaling[name]
    m = layer.lora_magnitude_vector[name]
    factor = m / adapted_norm(layer, name).detach().to(m.dtype)
    base = layer.base_layer
    if layer.dropout[name] > 0 and layer.training:
        x = nn.functional.dropout(x, p=layer.dropout[name], training=True)
        y0 = nn.functional.linear(x, weight_rows(layer).to(x.dtype))
    else:
        y0 = result if getattr(base, "bias", None) is None else result - base.bias
    h = x.to(a.dtype) @ a.T @ b.T
    extra = (factor - 1) * y0.to(m.dtype) + factor * h.to(m.dtype) * s
    return result + extra.to(result.dtype)


def merge_into(layer, name: str, weight: torch.Tensor) -> torch.Tensor:
    """Merge adapter ``name`` into ``weight`` (storage layout) in place; returns the per-row factor that
    unmerging divides by."""
    weight.add_(layer.delta_weight(name))
    rows = weight.T if layer.fan_in_fan_out else weight
    factor = layer.lora_magnitude_vector[name].to(rows.dtype) / row_norm(rows)
    rows.mul_(factor[:, None])
    return factor


def unmerge_from(layer, name: str, weight: torch.Tensor, factor: torch.Tensor) -> None:
    (weight.T if layer.fan_in_fan_out else weight).div_(factor[:, None])
    weight.sub_(layer.delta_weight(name))
