"""Merging task vectors with less interference: TIES, DARE and magnitude pruning.

Each adapter's change to a layer, ``D_i = s_i B_i A_i``, is a task vector. Summing weighted task vectors
(task arithmetic) lets their small, conflicting entries cancel each other's useful ones. The methods here
sparsify each ``D_i`` first:

- magnitude pruning keeps the ``density`` fraction of its entries largest in magnitude (TIES's "trim"),
- DARE (Yu et al., 2024) keeps each entry with probability ``density`` and divides the kept ones by it, so
  the expected task vector is unchanged,

and then either sum (``magnitude_prune``, ``dare_linear``) or, as TIES (Yadav et al., 2023), elect a sign per
entry (that of the sum of the sparsified entries, ``"total"``, or of their signs' count, ``"frequency"``) and
average, weighted, only the entries that agree with it (``ties``, ``dare_ties``). The definitions and the order
of the steps are those of PEFT's ``add_weighted_adapter`` (its ``*_svd`` variants). DARE draws its masks from
``generator`` (torch's global one by default).
"""

from __future__ import annotations

import torch

SIGN_METHODS = ("total", "frequency")
KINDS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


def keep_largest(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` with all but its ``int(density * numel)`` largest-magnitude entries set to zero."""
    if density >= 1:
        return delta
    keep = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    keep[delta.abs().flatten().topk(int(density * delta.numel())).indices] = 1
    return delta * keep.view(delta.shape)


def keep_at_random(delta: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each entry kept with probability ``density`` and then divided by it (DARE's drop and rescale)."""
    if density >= 1:
        return delta
    keep = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return delta * keep / density


def elected_signs(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """Per entry, whether each task's entry has the elected sign (ties go to +)."""
    votes = stacked.sum(dim=0) if method == "total" else stacked.sign().sum(dim=0)
    return stacked.sign() == torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)


def merge_task_vectors(deltas: list[torch.Tensor], weights: list[float], kind: str, density: float,
                       sign_method: str = "total", generator: torch.Generator | None = None) -> torch.Tensor:
    """One layer's merged change from its task vectors ``deltas`` (all of one shape) and their ``weights``."""
    if kind.startswith("dare"):
        sparse = [keep_at_random(d, density, generator) for d in deltas]
    else:
        sparse = [keep_largest(d, density) for d in deltas]
    stacked = torch.stack(sparse)
    weighted = stacked * torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *[1] * (
        stacked.dim() - 1))
    if kind in ("magnitude_prune", "dare_linear"):
        return weighted.sum(dim=0)
    agree = elected_signs(stacked, sign_method)
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)
