"""Trainable rows of an embedding (``trainable_token_indices``): new values for a few tokens' vectors, such as
those of special tokens added for a chat template, with the rest of the table frozen. An untied output head
(an ``nn.Linear``) can get new rows the same way, so that the model also learns to predict those tokens.

PEFT's layout: per adapter, ``token_adapter.trainable_tokens_delta`` holds the new rows (``len(indices) x dim``,
starting as copies of the old ones), and the config holds the indices. Every other module that shares the
embedding's weight uses the new rows too: a tied output head scores those tokens with them, and the encoder's and
decoder's embeddings of a model with one shared table (BART, T5) look them up.

PEFT forms the whole table with the rows replaced, every forward (a vocabulary-sized copy, which backward keeps
for a head). Here the lookup runs on the frozen table and only the looked-up rows of trained tokens are
replaced, and a head replaces only those tokens' logits: the extra work is the size of the batch, not of
the vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lorafit.layers.base import InPlaceOf, SharesWeight
from lorafit.layers.embedding import embed_scale


class TokenRows(nn.Module):
    """Holds the new rows under PEFT's names: ``token_adapter.trainable_tokens_delta.<adapter>``."""

    def __init__(self) -> None:
        super().__init__()
        self.trainable_tokens_delta = nn.ParameterDict()


def _rescore(out: torch.Tensor, h: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, index: torch.Tensor,
             bias: torch.Tensor | None) -> torch.Tensor:
    """A head's logits ``out`` with those of tokens ``index`` scored by ``rows`` (in h's dtype) instead of by the
    weight's rows."""
    with torch.no_grad():  # _Rescored's backward gives h and rows their gradients
        scores = F.linear(h, rows, None if bias is None else bias[index].to(h.dtype))
    return _Rescored.apply(out, h, rows, weight.index_select(0, index), index, scores.to(out.dtype))


class _Rescored(torch.autograd.Function):
    """``out[..., index] = scores`` in place (exactly the new rows' logits, in the logits' dtype), with the
    gradient of the delta form ``out + h (rows - old)^T`` at those columns: the logits' gradient goes back to the
    base head as it is, and ``h`` gets ``g (rows - old)`` on top of the head's ``g W``. Autograd's own in-place
    copy would instead copy the whole (tokens x vocabulary) gradient to zero those columns. The base head's
    product keeps no output for backward, so overwriting it is safe."""

    @staticmethod
    def forward(ctx, out, h, rows, old, index, scores):
        ctx.save_for_backward(h, rows, old, index)
        ctx.mark_dirty(out)
        return out.index_copy_(-1, index, scores)

    @staticmethod
    def backward(ctx, grad):
        h, rows, old, index = ctx.saved_tensors
        picked = grad.index_select(-1, index).to(h.dtype)
        grad_h = picked @ (rows - old.to(rows.dtype)).to(h.dtype) if ctx.needs_input_grad[1] else None
        grad_rows = None
        if ctx.needs_input_grad[2]:
            grad_rows = (picked.reshape(-1, picked.shape[-1]).T @ h.reshape(-1, h.shape[-1])).to(rows.dtype)
        return grad, grad_h, grad_rows, None, None, None


def _looked_up(out: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
               embedding: nn.Module) -> torch.Tensor:
    """An embedding's output ``out`` with the vectors of trained tokens (``slots``: each token's row in ``rows``,
    -1 for the rest) looked up in ``rows`` instead."""
    slot = slots[ids]
    picked = rows[slot.clamp(min=0)]
    scale = embed_scale(embedding, picked)  # transformers' scaled embeddings (Gemma, BART)
    if scale is not None:
        picked = picked * scale
    return torch.where((slot >= 0).unsqueeze(-1), picked, out)


class TrainableTokens(InPlaceOf):
    """An ``nn.Embedding`` (or an output head, ``nn.Linear``) with new values for some rows, per adapter."""

    OWN = ("base_layer", "token_adapter")

    row_plan = None  # lorafit.batched.adapter_per_row: the base layer, for rows whose adapters train no tokens

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.token_adapter = TokenRows()
        self.indices: dict[str, list[int]] = {}  # adapter -> the token ids whose rows it trains
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False
        self._table: tuple | None = None  # (key, slot of each token or -1, the replacing rows' index)


    @property
    def rows(self) -> nn.ParameterDict:
        return self.token_adapter.trainable_tokens_delta

    @property
    def adapter_names(self) -> list[str]:
        return list(self.rows.keys())

    def add_adapter(self, name: str, indices: list[int], init: bool = True, dtype: torch.dtype | None = None) -> None:
        weight = self.base_layer.weight
        bad = [i for i in indices if not 0 <= i < weight.shape[0]]
        if bad:
            raise ValueError(f"trainable_token_indices: {bad[:5]} are not rows of this "
                             f"{type(self.base_layer).__name__} ({weight.shape[0]} tokens)")
        with torch.no_grad():
            original = weight[indices]
            start = original if init else torch.randn_like(original)
        self.rows[name] = nn.Parameter(start.to(dtype or weight.dtype, copy=True))
        self.indices[name] = list(indices)
        # the rows as they were, for unmerge: a buffer, so that it moves with the model; not saved
        self.register_buffer(self._original(name), original.clone(), persistent=False)

    @staticmethod
    def _original(name: str) -> str:
        return f"original_rows_{name}"

    def _index(self, names: list[str]) -> torch.Tensor:
        return torch.tensor([i for n in names for i in self.indices[n]], dtype=torch.long,
                            device=self.base_layer.weight.device)

    def remove_adapter(self, name: str) -> None:
        if name in self.merged:
            self.unmerge([name])
        del self.rows[name], self.indices[name]
        delattr(self, self._original(name))
        if name in self.active:
            self.active.remove(name)

    def set_active(self, names: list[str]) -> None:
        self.active = [n for n in names if n in self.rows]

    def unmerged_active(self) -> list[str]:
        return [] if self.disabled else [n for n in self.active if n not in self.merged]

    # -- merging: the rows are written into the table, and the old rows written back -----------------------
    def merge(self, names: list[str] | None = None, safe: bool = False, keep_original: bool = True) -> None:
        weight = self.base_layer.weight
        with torch.no_grad():
            for name in names if names is not None else list(self.active):
                if name in self.merged:
                    continue
                self._check_disjoint(self.merged + [name])
                new = self.rows[name].to(weight.dtype)
                if safe and not torch.isfinite(new).all():
                    raise ValueError(f"merging adapter {name!r} would put NaN or inf into the token rows; nothing "
                                     "was merged into this layer")
                weight.index_copy_(0, self._index([name]), new)
                self.merged.append(name)

    def unmerge(self, names: list[str] | None = None) -> None:
        weight = self.base_layer.weight
        with torch.no_grad():
            for name in [n for n in reversed(self.merged) if names is None or n in names]:
                weight.index_copy_(0, self._index([name]), getattr(self, self._original(name)).to(weight.dtype))
                self.merged.remove(name)

    # -- forward -----------------------------------------------------------------------------------------
    def _check_disjoint(self, names: list[str]) -> None:
        seen: dict[int, str] = {}
        for name in names:
            for i in self.indices[name]:
                if i in seen:
                    raise ValueError(f"adapters {seen[i]!r} and {name!r} both train token {i}; only adapters with "
                                     "disjoint trainable_token_indices can be active together")
                seen[i] = name

    def replacement(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot of each token in the stacked rows, -1 for an untouched token; the stacked rows' token indices),
        cached until the adapter set or the device changes."""
        key = (tuple((n, tuple(self.indices[n])) for n in names), self.base_layer.weight.device)
        if self._table is None or self._table[0] != key:
            self._check_disjoint(names)
            index = self._index(names)
            slots = torch.full((self.base_layer.weight.shape[0],), -1, dtype=torch.long, device=index.device)
            slots[index] = torch.arange(index.numel(), device=index.device)
            self._table = (key, slots, index)
        return self._table[1], self._table[2]

    def new_rows(self, names: list[str], dtype: torch.dtype) -> torch.Tensor:
        return torch.cat([self.rows[n] for n in names]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: token ids for an embedding, hidden states for a head."""
        if self.row_plan is not None:
            return self.row_plan(x)
        base = self.base_layer
        out = base(x)
        names = self.unmerged_active()
        if not names:
            return out
        slots, index = self.replacement(names)
        if isinstance(base, nn.Linear):
            return _rescore(out, x, self.new_rows(names, x.dtype), base.weight, index, base.bias)
        return _looked_up(out, x, self.new_rows(names, out.dtype), slots, base)

    def extra_repr(self) -> str:
        return "; ".join(f"{n}: {len(self.indices[n])} tokens" for n in self.adapter_names)


class TiedTokens(SharesWeight):
    """A module that shares the weight of an embedding whose rows adapters train (``tokens``): a tied output head
    scores those tokens with their new rows, another embedding of the same table (BART's and T5's encoder and
    decoder embeddings of the shared one) looks them up."""

    @property
    def tokens(self) -> TrainableTokens:
        return self.source

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: hidden states for a head, token ids for an embedding."""
        if self.row_plan is not None:
            return self.row_plan(x)
        base = self.base_layer
        out = base(x)
        names = [] if self.disabled else self.tokens.unmerged_active()
        if not names:
            return out
        slots, index = self.tokens.replacement(names)
        if isinstance(base, nn.Linear):
            return _rescore(out, x, self.tokens.new_rows(names, x.dtype), base.weight, index, base.bias)
        return _looked_up(out, x, self.tokens.new_rows(names, out.dtype), slots, base)
