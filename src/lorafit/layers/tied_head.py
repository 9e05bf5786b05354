"""The output head of a model whose head shares the input embedding's weight (tied embeddings), for LoRA
adapters attached with ``ensure_weight_tying``: the head applies the embedding's adapters, so the two keep
computing with one weight, merged or not.

The embedding's adapter changes its table by ``s A^T B^T`` (A: r x vocabulary, B: dim x r). The head scores
hidden states ``h`` with that same table, so it adds ``s (h B) A``. The factors are the embedding's own
parameters, which get the gradients of both uses. PEFT's files list them under the head too, transposed
(``lm_head.lora_A = B^T``, ``lm_head.lora_B = A^T``); lorafit.io writes and checks those copies.
"""

from __future__ import annotations

import torch
from torch import nn

from lorafit.layers.base import SharesWeight
from lorafit.layers.embedding import Embedding


class TiedLoraHead(SharesWeight):
    @property
    def embedding(self) -> Embedding:
        return self.source

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.row_plan is not None:
            return self.row_plan(h)
        out = self.base_layer(h)
        # an adapter merged into the embedding's table is in this head's weight too: it is the same tensor
        for name in [] if self.disabled else self.embedding.unmerged_active():
            out = self.add_lora(out, h, name)
        return out

    def add_lora(self, out: torch.Tensor, h: torch.Tensor, name: str) -> torch.Tensor:
        embedding = self.embedding
        a, b = embedding.factors_a[name], embedding.factors_b[name]
        x = h.to(b.dtype)
        p = embedding.dropout[name]
        if p > 0 and self.training:
            x = nn.functional.dropout(x, p=p, training=True)
        low = (x @ b).reshape(-1, b.shape[1]).to(out.dtype)
        # the vocabulary-wide product accumulates into the logits in the GEMM, with no logits-sized temporary
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), low, a.to(out.dtype), alpha=embedding.scaling[name])
        return flat.view(out.shape)

    def extra_repr(self) -> str:
        return "tied to the input embedding's adapters: " + ", ".join(self.adapter_names)
