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
  only the key (4 bytes) and hashes the same mask again (lorafit.kernels.mask);
- nothing else: ``isinstance(m, nn.Dropout)``, ``p``, ``train()`` and
  ``eval()`` behave as before, and ``inplace`` is ignored (the output is new).

Dropout that a model calls as a function rather than through a module (most
attention implementations drop attention probabilities that way) keeps torch's.
The masks are the same on every device (Triton kernels on CUDA).
"""

from __future__ import annotations

import torch
from torch import nn

from lorafit.kernels import mask


class _HashedDropoutFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, key, t, scale):
        ctx.save_for_backward(key)
        ctx.t, ctx.scale = t, scale
        return mask.dropped_any(x, key, t, scale)

    @staticmethod
    def backward(ctx, gy):
        (key,) = ctx.saved_tensors
        return mask.dropped_any(gy, key, ctx.t, ctx.scale), None, None, None


class HashedDropout(nn.Dropout):
    """``nn.Dropout`` whose masks are hashes of a key and the element positions (see the module's docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.numel() == 0:
            return x
        if self.p == 1:
            return super().forward(x)  # everything dropped: torch's own result, exactly
        t, scale = mask.threshold(self.p)
        return _HashedDropoutFunction.apply(x, mask.new_key(x.device), t, scale)


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
