"""float32 master copies of 16-bit trained parameters: the optimizer steps on them, the model computes with
their 16-bit rounding.

AdamW moves each weight by about ``lr`` a step, whatever the gradient's scale. A bfloat16 weight keeps 8
significant bits, so an update below half its ulp (1.2e-4 at a weight of 0.04) rounds away: at a low learning
rate, or in the tail of a decaying schedule, most of a bfloat16 adapter's updates are lost, and AdamW's
moments, kept in the parameter's dtype, are coarse too. Float32 adapters under autocast (``train.bf16``) avoid
that but cast every factor in every forward; masters keep the forward in bfloat16 and cost two foreach copies
a step (gradients in, weights out) plus 12 bytes a trained parameter (the copy, its gradient, float32
moments in place of 16-bit ones).

Checkpoints hold the masters (float32) in place of the 16-bit weights, so a resumed run steps from the same
values as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lorafit.train.distributed import like_param

SIXTEEN_BIT = (torch.float16, torch.bfloat16)


class MasterWeights:
    """The float32 masters of ``model``'s 16-bit trainable parameters (none: every method is a no-op)."""

    def __init__(self, model: nn.Module) -> None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.dtype in SIXTEEN_BIT]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        with torch.no_grad():
            self.masters = [p.detach().float() for p in self.params]  # leaves: the optimizer's parameters
        self._master_of = {id(p): m for p, m in zip(self.params, self.masters)}

    def __bool__(self) -> bool:
        return bool(self.params)

    def for_optimizer(self, params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        """``params`` with each 16-bit parameter replaced by its master."""
        return [self._master_of.get(id(p), p) for p in params]

    def named(self) -> dict[str, torch.Tensor]:
        """The masters by their parameter's name (what a checkpoint saves in place of the 16-bit values)."""
        return dict(zip(self.names, self.masters))

    @torch.no_grad()
    def take_grads(self) -> None:
        """The 16-bit gradients into the masters' float32 ones (kept from step to step: no allocation), and
        dropped from the model. A parameter without a gradient this step leaves its master without one, so
        AdamW skips it as it would have skipped the parameter."""
        into, out = [], []
        for p, m in zip(self.params, self.masters):
            if p.grad is None:
                m.grad = None
                continue
            if m.grad is None:
                m.grad = torch.empty_like(m)
            into.append(m.grad)
            out.append(p.grad)
            p.grad = None
        if into:
            torch._foreach_copy_(_local(into), _local(out))

    @torch.no_grad()
    def put_back(self) -> None:
        """The stepped masters, rounded to nearest, into the model's parameters."""
        if self.params:
            torch._foreach_copy_(_local(self.params), _local(self.masters))

    @torch.no_grad()
    def load(self, values: dict[str, torch.Tensor]) -> None:
        """Masters from a checkpoint's whole tensors (float32 masters, or the 16-bit weights of a run saved
        without them), then the model's parameters from the masters."""
        for name, m in zip(self.names, self.masters):
            m.copy_(like_param(values[name], m))
        self.put_back()


def _local(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """FSDP's DTensors by their shards (a master is sharded as its parameter is, so the shards pair up; DTensor
    has no foreach copy); plain tensors as they are."""
    return [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
