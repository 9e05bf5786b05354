"""LoRA for ``nn.Embedding``.

The factors are a low-rank table: ``A: (r, num_embeddings)`` is looked up like
an embedding and ``B: (embedding_dim, r)`` projects it, so
``y = base(ids) + s * A^T[ids] B^T``. PEFT stores them as
``lora_embedding_A`` / ``lora_embedding_B`` and applies no dropout here (the
input is token ids), and neither do we.

transformers' scaled embeddings (Gemma, BART and mBART with ``scale_embedding``, ...) multiply the rows they look
up by ``embed_scale`` in forward; the adapter's rows get the same factor, so that the adapter changes the output
as it changes the table (merged or not), as in PEFT.
"""

from __future__ import annotations

import torch
from torch import nn

from lorafit.layers.base import LoraLayer, compute_dtype
from lorafit.layers.init import mica_init


def embed_scale(embedding: nn.Module, like: torch.Tensor) -> torch.Tensor | None:
    """The factor a scaled embedding multiplies its rows by (a number or a one-element tensor), in ``like``'s
    dtype and device, or None for a plain one."""
    scale = getattr(embedding, "embed_scale", None)
    if scale is None:
        return None
    if not isinstance(scale, torch.Tensor):
        return torch.tensor(float(scale), dtype=like.dtype, device=like.device)
    if scale.numel() != 1:
        raise ValueError(f"{type(embedding).__name__}.embed_scale has shape {list(scale.shape)}; lorafit supports "
                         "scaled embeddings with one scale")
    return scale.to(like.device, like.dtype)


class Embedding(LoraLayer):
    a_name = "lora_embedding_A"
    b_name = "lora_embedding_B"
    dora_capable = True
    drops_input = False

    def factor_shapes(self, r: int):
        num, dim = self.base_layer.weight.shape
        return (r, num), (dim, r)

    def init_factors(self, name: str, init: bool | str | None) -> None:
        a, b = self.factors_a[name], self.factors_b[name]
        with torch.no_grad():
            if init is None:
                pass
            elif init is True or init == "gaussian":
                # Zero A, random B: the lookup of a zero table is zero, and B gets gradients at once.
                nn.init.zeros_(a)
                nn.init.normal_(b)
            elif init is False:
                nn.init.normal_(a)
                nn.init.normal_(b)
            elif init == "mica":  # the table's weight as a projection is (embedding_dim, num_embeddings)
                mica_init(self.base_layer.weight, a, b, transposed=True)
            else:
                raise ValueError(f"init_lora_weights={init!r} is not supported for Embedding layers")

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.factors_a[name], self.factors_b[name]
        dt = compute_dtype(self.base_layer.weight)
        return (b.to(dt) @ a.to(dt)).T * self.scaling[name]

    def add_lora(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        return result + self.low_rank(x, name).to(result.dtype)

    def low_rank(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a, b = self.factors_a[name], self.factors_b[name]
        base = self.base_layer
        h = nn.functional.embedding(
            x, a.T, padding_idx=base.padding_idx, max_norm=base.max_norm, norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse,
        )
        out = nn.functional.linear(h, b) * self.scaling[name]
        scale = embed_scale(base, out)
        return out if scale is None else out * scale

    # DoRA: a magnitude per embedding dimension (PEFT's), the norm over the vocabulary; no bias, no dropout
    def dora_rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T

    def feature_view(self, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return v[None, :]
