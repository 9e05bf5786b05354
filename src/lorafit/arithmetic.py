"""Adapter arithmetic: a weighted combination of attached adapters as a new adapter.

For adapters i with per-layer deltas D_i = s_i B_i A_i and weights w_i, the
target is D = sum_i w_i D_i (negative weights subtract a task: "task negation").

- ``"exact"``: stack the factors along the rank, B = [B_1 ... B_k],
  A = [w_1 s_1 A_1; ...; w_k s_k A_k] with scale 1. The rank is the sum of the
  ranks and D is reproduced exactly: no cross terms.
- ``"linear"``: same rank; A = sum sqrt|w_i s_i| A_i, B = sum sign(w_i) sqrt|w_i s_i| B_i.
  An approximation: B A then contains cross terms B_i A_j. Cheap, and what
  PEFT calls "linear"; only sensible for adapters trained from a common start.
- ``"svd"``: D truncated to ``rank`` by SVD. The relative Frobenius error of
  each layer is returned so the cost of the truncation is visible.
- ``"ties_svd"``, ``"dare_ties_svd"``, ``"dare_linear_svd"``, ``"magnitude_prune_svd"``: each D_i
  sparsified to ``density`` before they are combined, with TIES's sign election for the ``ties``
  ones (lorafit.task_merging), then truncated to ``rank`` as ``"svd"``; the error returned is the
  truncation's, against that merged D. PEFT's names and definitions.

The biases of adapters with ``lora_bias`` combine exactly, whatever the method:
b = sum_i w_i s_i b_i at the new adapter's scale of 1.

Modules_to_save copies (task heads) are not combined: each task keeps its own
head. ``heads="a"`` gives the new adapter a copy of adapter a's heads (so it can
be used and saved for task a); by default it uses the original modules.
"""

from __future__ import annotations

import copy
import dataclasses
import re

import torch
from torch import nn

from lorafit.layers.base import grouped_pointwise
from lorafit.model import adapter_configs, attach, lora_layers, saved_modules
from lorafit.task_merging import KINDS, SIGN_METHODS, merge_task_vectors

SPARSE = tuple(f"{kind}_svd" for kind in KINDS)  # TIES, DARE, magnitude pruning, then truncated by SVD
METHODS = ("exact", "linear", "svd", *SPARSE)


def combine_adapters(
    model: nn.Module,
    weights: dict[str, float],
    name: str,
    method: str = "exact",
    rank: int | None = None,
    heads: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Attach ``name`` = sum of ``weights[a]`` times adapter ``a``; returns per-layer relative error.

    The error is 0 up to float rounding for ``"exact"``; for ``"linear"`` and ``"svd"`` it is
    ||D - D_new||_F / ||D||_F of each layer, measured, not assumed (for the sparsifying methods, D is
    their merged change). ``heads`` names an attached adapter whose ``modules_to_save`` copies (e.g. its
    classifier head) the new adapter copies. ``density`` (the fraction of each change kept),
    ``majority_sign_method`` (``"total"`` or ``"frequency"``) and ``generator`` (DARE's draws) are for the
    sparsifying methods.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    if not weights:
        raise ValueError("weights must name at least one adapter")
    configs = adapter_configs(model)
    missing = [a for a in weights if a not in configs]
    if missing:
        raise KeyError(f"no adapters named {missing} are attached; attached adapters: {list(configs) or 'none'}")
    truncates = method == "svd" or method in SPARSE
    if truncates and (rank is None or rank < 1):
        raise ValueError(f"method {method!r} needs rank >= 1, got {rank!r}")
    if rank is not None and not truncates:
        raise ValueError(f"rank is only used by the methods that truncate by SVD (the rank of {method!r} follows "
                         "from the adapters)")
    if method in SPARSE and not (density is not None and 0 < density <= 1):
        raise ValueError(f"method {method!r} needs density in (0, 1] (the fraction of each change kept), "
                         f"got {density!r}")
    if method not in SPARSE and density is not None:
        raise ValueError(f"density is only used by the methods {', '.join(map(repr, SPARSE))}")
    if majority_sign_method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {', '.join(map(repr, SIGN_METHODS))}, "
                         f"got {majority_sign_method!r}")
    stacked = [a for a in weights if configs[a].target_parameters]
    if stacked:
        # their factors hold one pair per expert, interleaved; stacking or averaging them as one pair is wrong
        raise ValueError(f"adapters {stacked} use target_parameters, which combine_adapters does not support")
    activated = [a for a in weights if configs[a].alora_invocation_tokens is not None]
    if activated:
        raise ValueError(f"adapters {activated} are aLoRA adapters (alora_invocation_tokens), which apply from their "
                         "own invocations on; combine_adapters does not combine them")
    kasa = [a for a in weights if configs[a].kasa_config is not None]
    if kasa:  # trained on the base weights it truncated: the combination would need the untruncated ones
        raise ValueError(f"adapters {kasa} are KaSA adapters (kasa_config), which combine_adapters does not combine")
    scaled = [a for a in weights if configs[a].use_dora]
    if scaled:
        # the magnitudes rescale the whole adapted weight, which no sum of low-rank changes expresses
        raise ValueError(f"adapters {scaled} are DoRA adapters (use_dora), whose learned magnitudes combine_adapters "
                         "cannot combine; merge them into the weights instead")
    biased = any(configs[a].lora_bias for a in weights)
    tokens = [a for a in weights if configs[a].trainable_token_indices]
    if tokens:
        raise ValueError(f"adapters {tokens} train token rows (trainable_token_indices), which combine_adapters does "
                         "not combine")
    head_modules = None
    if heads is not None:
        if heads not in configs:
            raise KeyError(f"heads={heads!r}: no such adapter is attached; attached adapters: {list(configs)}")
        head_modules = configs[heads].modules_to_save
        if not head_modules:
            raise ValueError(f"heads={heads!r}: that adapter has no modules_to_save copies (no head) to take")

    layers = _layers_of(model, list(weights))
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    errors: dict[str, float] = {}
    for path, layer in layers.items():
        if method == "exact":
            factors[path] = _exact(layer, weights)
        elif method == "linear":
            factors[path] = _linear(layer, weights, path)
        elif method == "svd":
            target = _delta_matrix(layer, weights)
            factors[path] = _truncated(layer, weights, target, rank)
        else:
            target = merge_task_vectors([_delta_matrix(layer, {n: 1.0}) for n in weights], list(weights.values()),
                                        method.removesuffix("_svd"), density, majority_sign_method, generator)
            factors[path] = _truncated(layer, weights, target, rank)
        errors[path] = _relative_error(target if truncates else _delta_matrix(layer, weights), *factors[path],
                                       layer.b_groups)

    first = configs[next(iter(weights))]
    ranks = {path: a.shape[0] for path, (a, _) in factors.items()}
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    special = {re.escape(p): r for p, r in ranks.items() if r != common}
    config = dataclasses.replace(
        first, r=common, lora_alpha=common, use_rslora=False, lora_dropout=first.lora_dropout,
        target_modules=_outermost(layers), rank_pattern=special, alpha_pattern=dict(special),
        layers_to_transform=None, layers_pattern=None, modules_to_save=head_modules, init_lora_weights=True,
        bias="none", exclude_modules=None, lora_bias=biased,
    )
    some_layer = next(iter(layers.values()))
    attach(model, config, name, activate=False, dtype=some_layer.factors_a[next(iter(weights))].dtype)
    with torch.no_grad():
        for path, (a, b) in factors.items():
            layer = layers[path]
            layer.factors_a[name].copy_(a)
            layer.factors_b[name].copy_(b)
            if biased:  # the new scale is 1: sum w_i s_i b_i, exact for every method
                layer.lora_B_bias[name].copy_(sum(w * layer.scaling[n] * layer.lora_B_bias[n].float()
                                                  for n, w in weights.items() if n in layer.lora_B_bias))
    if heads is not None:
        memo: dict = {}  # one memo for all copies: a table that tied copies share stays shared (ensure_weight_tying)
        for _, wrapper in saved_modules(model):
            if heads in wrapper.adapter_names and name in wrapper.adapter_names:
                head = copy.deepcopy(wrapper.modules_to_save[heads], memo)  # its own size too (another label count)
                head.requires_grad_(True)  # like every copy attach makes: the new adapter's own weights
                wrapper.modules_to_save[name] = head
    return errors


def _layers_of(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """The layers the adapters adapt; all of them must adapt the same set."""
    targets = {n: {p for p, layer in lora_layers(model) if n in layer.adapter_names} for n in names}
    reference = targets[names[0]]
    for n in names[1:]:
        if targets[n] != reference:
            only_first = sorted(reference - targets[n])[:3]
            only_other = sorted(targets[n] - reference)[:3]
            raise ValueError(
                f"adapters {names[0]!r} and {n!r} adapt different modules (only {names[0]!r}: {only_first}, "
                f"only {n!r}: {only_other}); combine adapters with the same targets"
            )
    return {p: layer for p, layer in lora_layers(model) if p in reference}


def _outermost(paths) -> list[str]:
    """The paths not inside another one: an attention's out-projection wrapper comes with the attention's."""
    return [p for p in paths if not any(p.startswith(q + ".") for q in paths)]


def _exact(layer, weights):
    """Stacked along the rank. A grouped B (``b_groups`` G > 1) maps each group's block of A's rows to that
    group's outputs, so A's rows stack group by group: group j gets every adapter's group-j rows, in the order
    of B's columns."""
    groups = layer.b_groups
    a = torch.cat([(layer.factors_a[n] * (w * layer.scaling[n])).unflatten(0, (groups, -1))
                   for n, w in weights.items()], dim=1).flatten(0, 1)
    b = torch.cat([layer.factors_b[n] for n in weights], dim=1)
    return a, b


def _linear(layer, weights, path):
    ranks = {layer.rank[n] for n in weights}
    if len(ranks) > 1:
        raise ValueError(f"method 'linear' needs equal ranks; {path!r} has ranks {sorted(ranks)}: use 'exact' or 'svd'")
    a = sum((abs(w * layer.scaling[n]) ** 0.5) * layer.factors_a[n] for n, w in weights.items())
    b = sum(((1 if w >= 0 else -1) * abs(w * layer.scaling[n]) ** 0.5) * layer.factors_b[n] for n, w in weights.items())
    return a, b


def _delta_matrix(layer, weights) -> torch.Tensor:
    """sum w_i s_i B_i A_i as a (B-rows x A-columns) matrix, in float32 or better."""
    total = None
    for n, w in weights.items():
        a, b = layer.factors_a[n], layer.b_matrix(n)
        dt = torch.promote_types(a.dtype, torch.float32)
        d = (b.to(dt) @ a.to(dt).flatten(1)) * (w * layer.scaling[n])
        total = d if total is None else total + d
    return total


def _truncated(layer, weights, delta: torch.Tensor, rank: int):
    """Factors of the best rank-``rank`` approximation of ``delta``, shaped as the adapters' factors. Where B is
    grouped (``b_groups`` G > 1), each group's rows of ``delta`` get their own rank-``rank / G`` approximation
    (``rank`` rounded up to a multiple of G): the best such adapter, as its groups share nothing."""
    groups = layer.b_groups
    per_group = -(-rank // groups)
    any_a = layer.factors_a[next(iter(weights))]
    any_b = layer.factors_b[next(iter(weights))]
    a_parts, b_parts = [], []
    for rows in delta.chunk(groups):
        u, s, vh = torch.linalg.svd(rows, full_matrices=False)
        k = min(per_group, s.numel())
        root = s[:k].sqrt()
        # fewer singular values than asked for: zeros up to the requested rank
        a_parts.append(torch.cat([root[:, None] * vh[:k], vh.new_zeros(per_group - k, vh.shape[1])]))
        b_parts.append(torch.cat([u[:, :k] * root[None, :], u.new_zeros(u.shape[0], per_group - k)], dim=1))
    a = torch.cat(a_parts).view(groups * per_group, *any_a.shape[1:])
    b = torch.cat(b_parts).view(any_b.shape[0], per_group, *any_b.shape[2:])
    return a.to(any_a.dtype), b.to(any_b.dtype)


def _relative_error(target: torch.Tensor, a, b, groups: int) -> float:
    got = grouped_pointwise(b.to(target.dtype), groups) @ a.to(target.dtype).flatten(1)
    norm = target.norm()
    return 0.0 if norm == 0 else ((target - got).norm() / norm).item()
