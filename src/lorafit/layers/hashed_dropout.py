"""The model's own dropout with LoRA dropout's hashed masks: an opt-in, for speed on a CPU.

``use_hashed_dropout(model)`` swaps every ``nn.Dropout`` module of a model for
``HashedDropout``. It drops the same fraction and rescales the same way, but
its masks are dropout_mask's: a hash of a fresh key and each element's
position. What that changes for a user:

- the random stream: the same seed gives different masks than torch's dropout
  (still repeatable with ``torch.manual_seed``); p is rounded to a multiple
  of 2^-16, and a dropped NaN becomes 0 where torch's gives NaN;
- the speed and the memory, on a CPU: torch draws each mask on one thread
  and keeps it, as a float per element, for backward. The swapped module
  hashes on every core, in one pass with the rescale, and backward keeps
  only the key (4 bytes) and hashes the same mask again;
- nothing else: ``isinstance(m, nn.Dropout)``, ``p``, ``train()`` and
  ``eval()`` behave as before, and ``inplace`` is ignored (the output is new).

Dropout that a model calls as a function rather than through a module (most
attention implementations drop attention probabilities that way) keeps torch's.
On other devices the same masks come from dropout_mask's torch ops.
"""

from __future__ import annotations

import torch
from torch import nn

from lorafit.layers import cpu_kernels, dropout_mask


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """x as rows of its last dimension: element (row, col) is at position row * cols + col, x's row-major order."""
    return x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)


def _masked_and_scaled(x: torch.Tensor, key: torch.Tensor, t: torch.Tensor, scale: float) -> torch.Tensor:
    rows = _as_rows(x)
    if x.dtype == torch.float32 and cpu_kernels.serves(x):
        out = cpu_kernels.dropout_scale(rows, int(key), int(t), scale)
    else:
        out = dropout_mask.dropped(rows, key, t).mul_(scale)
    return out.view(x.shape)


class _HashedDropoutFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, key, t, scale):
        ctx.save_for_backward(key, t)
        ctx.scale = scale
        return _masked_and_scaled(x, key, t, scale)

    @staticmethod
    def backward(ctx, gy):
        key, t = ctx.saved_tensors
        return _masked_and_scaled(gy, key, t, ctx.scale), None, None, None


class HashedDropout(nn.Dropout):
    """``nn.Dropout`` whose masks are hashes of a key and the element positions (see the module's docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.numel() == 0:
            return x
        if self.p == 1:
            return super().forward(x)  # everything dropped: torch's own result, exactly
        t, scale = dropout_mask.threshold(self.p, x.device)
        return _HashedDropoutFunction.apply(x, dropout_mask.new_key(x.device), t, scale)


def use_hashed_dropout(model: nn.Module) -> int:
    """Swap each ``nn.Dropout`` module of ``model`` (not its subclasses) for a ``HashedDropout`` of the
    same p, in place; returns how many were swapped."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                hashed = HashedDropout(child.p, child.inplace)
                hashed.train(child.training)
                setattr(parent, name, hashed)
                swapped += 1
    return swapped
