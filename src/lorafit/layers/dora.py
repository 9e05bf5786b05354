"""DoRA: weight-decomposed LoRA (Liu et al., 2024), for linear, embedding and convolution layers.

The adapted weight is split into a direction and a learned magnitude per output feature:
W' = m * (W + s B A) / ||W + s B A||, the norm taken over the rest of that feature's slice of the weight: a
linear layer's inputs, a convolution's input channels and kernel, an embedding's vocabulary (PEFT's layouts:
one magnitude per output, per output channel, per embedding dimension). As the authors recommend, the norm is
treated as a constant in backward (detached).

In forward, with y0 the base output without its bias and f = m / ||W + s B A|| per feature:
    y = base(x) + (f - 1) y0 + f * (the low-rank path of x).
With dropout active, PEFT applies the extra terms to dropout(x) (recomputing y0 on it), and so do we, so that the
same adapter trains the same way (embeddings take no dropout). ``m`` starts as ||W|| (B = 0), so a fresh DoRA
adapter changes nothing.

Each layer kind says how its weight reads as (features, rest) (``dora_rows``), how a per-feature vector
broadcasts against the weight (``feature_view``) and against the output (``output_view``), and gives its frozen
output without bias (``frozen_output``) and its scaled low-rank path (``low_rank``).
"""

from __future__ import annotations

import torch
from torch import nn


def row_norm(rows: torch.Tensor) -> torch.Tensor:
    """L2 norm of each row of a (features, rest) matrix."""
    return torch.linalg.vector_norm(rows, dim=1)


def adapted_norm(layer, name: str, w: torch.Tensor | None = None) -> torch.Tensor:
    """||W + s B A|| per feature, in at least float32; ``w`` is ``target_weight()`` when the caller has it."""
    w = layer.target_weight() if w is None else w
    dt = torch.promote_types(w.dtype, torch.float32)
    return row_norm(layer.dora_rows(w.to(dt) + layer.delta_weight(name)))


def init_magnitude(layer, name: str) -> nn.Parameter:
    with torch.no_grad():
        m = adapted_norm(layer, name)
    return nn.Parameter(m.reshape(layer.magnitude_shape()).to(layer.factors_a[name].dtype))


def add_dora(layer, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    m = layer.lora_magnitude_vector[name]
    w = layer.target_weight()  # once: a quantized base dequantizes it on every read
    factor = layer.output_view(m.reshape(-1) / adapted_norm(layer, name, w).detach().to(m.dtype), result)
    if layer.drops_input and layer.dropout[name] > 0 and layer.training:
        x = nn.functional.dropout(x, p=layer.dropout[name], training=True)
        y0 = layer.frozen_output(x, w)
    else:
        bias = getattr(layer.base_layer, "bias", None)
        y0 = result if bias is None else result - layer.output_view(bias, result)
    extra = (factor - 1) * y0.to(m.dtype) + factor * layer.low_rank(x, name).to(m.dtype)
    return result + extra.to(result.dtype)


def merge_into(layer, name: str, weight: torch.Tensor) -> torch.Tensor:
    """Merge adapter ``name`` into ``weight`` (storage layout) in place; returns the per-feature factor that
    unmerging divides by."""
    weight.add_(layer.delta_weight(name))
    magnitude = layer.lora_magnitude_vector[name].reshape(-1)
    factor = magnitude.to(weight.dtype) / row_norm(layer.dora_rows(weight))
    weight.mul_(layer.feature_view(factor, weight))
    return factor


def unmerge_from(layer, name: str, weight: torch.Tensor, factor: torch.Tensor) -> None:
    weight.div_(layer.feature_view(factor, weight))
    weight.sub_(layer.delta_weight(name))
