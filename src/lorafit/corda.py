"""CorDA: LoRA's factors from the base weight as the layer's inputs see it (Yang et al., 2024, "CorDA:
Context-Oriented Decomposition Adaptation"), PEFT's ``init_lora_weights="corda"``.

    model = lorafit.attach_corda(model, lorafit.LoraConfig(r=16, target_modules="all-linear",
                                 corda_config={"corda_method": "ipm"}), batches)

For every adapted linear layer the covariance C of its inputs on ``batches`` is collected (each sequence scaled
by its largest value, as PEFT does), and ``W C`` is decomposed: ``W C = U S V^T``, so ``W = U S (V^T C^-1)``. The
adapter takes r of those components, ``s B A = U_r S_r V_r^T C^-1``, and the base weight keeps the rest (the
output is unchanged at the start):

- ``"ipm"`` (instruction-previewed): the r largest, the directions the data uses most, so fine-tuning starts
  from what matters for the task;
- ``"kpm"`` (knowledge-preserved): the r smallest, leaving the directions the data (e.g. general knowledge
  questions) relies on untouched in the base.

C gets ``damp * mean(diag C)`` on its diagonal, ``damp`` doubling from 0.01 until its inverse is accurate. Like
PiSSA, the adapter fits only the residual base it was made with: ``save_adapter(..., as_plain_lora=True)`` writes
it as a plain LoRA of the original weights; a file with ``init_lora_weights="corda"`` cannot be loaded again
without the data, and is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lorafit.config import LoraConfig
from lorafit.eva import _positions, _run, inputs_hooked
from lorafit.residual import attach_residual, residual_targets

METHODS = ("ipm", "kpm")
# PEFT's CordaConfig fields; the two files are PEFT's caches of the covariances and components between runs
CORDA_DEFAULTS: dict[str, Any] = {"cache_file": None, "covariance_file": None, "corda_method": "ipm",
                                  "verbose": False, "use_float16_for_covariance": False,
                                  "prune_temporary_fields": True}


def corda_options(config: LoraConfig) -> dict[str, Any]:
    given = dict(config.corda_config or {})
    unknown = sorted(set(given) - set(CORDA_DEFAULTS))
    if unknown:
        raise ValueError(f"corda_config: unknown keys {unknown}; known: {sorted(CORDA_DEFAULTS)}")
    options = {**CORDA_DEFAULTS, **given}
    if options["corda_method"] not in METHODS:
        raise ValueError(f"corda_config['corda_method'] must be 'ipm' or 'kpm', got {options['corda_method']!r}")
    cached = [k for k in ("cache_file", "covariance_file") if options[k] is not None]
    if cached:
        raise ValueError(f"corda_config['{cached[0]}']: lorafit computes CorDA from the batches each time and "
                         "reads no cache files; leave it null")
    return options


def attach_corda(
    model: nn.Module,
    config: LoraConfig,
    batches: Iterable,
    name: str = "default",
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    activate: bool = True,
    trainable: bool = True,
) -> nn.Module:
    """Attach adapter ``name`` with CorDA's initialisation, computed on ``batches``; the base weights of the
    adapted layers become the residuals. Batches as for ``attach_eva`` (positions where ``attention_mask`` is 0
    are left out). Returns ``model``, whose adapter config has ``init_lora_weights="corda"``."""
    options = corda_options(config)
    targets = residual_targets(model, config, "corda", "CorDA")
    covariances = _covariances(model, targets, batches, forward)
    factors = {}
    for t in targets:  # every layer's factors before any weight changes: an error leaves the model as it was
        weight = model.get_submodule(t).weight
        factors[t] = _factors(weight, covariances[t].to(weight.device), config.rank_for(t), config.scale_for(t),
                              options["corda_method"], t)
    attach_residual(model, dataclasses.replace(config, init_lora_weights="corda", corda_config=options), name,
                    factors, activate=activate, trainable=trainable)
    return model


def _covariances(model: nn.Module, targets: list[str], batches: Iterable, forward: Callable | None
                 ) -> dict[str, torch.Tensor]:
    """Per target, the mean over sequences of X^T X / max(X)^2 of the sequence's inputs (float32), computed once
    for layers that receive the same tensor (q/k/v)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(targets, 0)
    # last: (input, its covariance, sequences) of the hook before; the layers that share an input (q/k/v,
    # gate/up) run one after another, so the covariance of a shared input is computed once
    state: dict[str, Any] = {"mask": None, "last": None}

    def hook_for(target: str):
        def hook(module, args):
            x = args[0]
            if state["last"] is not None and state["last"][0] is x:
                _, cov, rows = state["last"]
            else:
                cov, rows = _batch_covariance(x, state["mask"])
                state["last"] = (x, cov, rows)
            sums[target] = cov if target not in sums else sums[target] + cov
            counts[target] += rows
        return hook

    with inputs_hooked(model, {t: hook_for(t) for t in targets}) as device:
        for batch in batches:
            mask = _positions(batch, {"use_label_mask": False})
            state["mask"] = None if mask is None else mask.to(device)
            _run(model, batch, forward, device)
            state["last"] = None  # the input of this batch is not kept past it
    missing = [t for t in targets if not counts[t]]
    if missing:
        raise ValueError(f"CorDA: no input reached {missing[0]!r} (are batches empty, or does forward skip it?)")
    return {t: sums[t] / counts[t] for t in targets}


def _batch_covariance(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """(sum over the batch's sequences of X^T X / max(X)^2, number of sequences) for an input (batch, tokens, d)
    or (tokens, d), padding left out."""
    x = x.detach().float()
    if x.dim() == 2:
        x = x.unsqueeze(0)
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    keep = mask if mask is not None and tuple(mask.shape) == tuple(x.shape[:2]) else None
    if keep is not None:
        x = x.masked_fill(~keep.unsqueeze(-1), 0)
    # each sequence scaled by its largest value (PEFT's: the maximum, not the largest magnitude)
    top = x.masked_fill(~keep.unsqueeze(-1), float("-inf")) if keep is not None else x
    x = x / top.amax(dim=(1, 2)).abs()[:, None, None]
    flat = x.reshape(-1, x.shape[-1])
    return flat.T @ flat, x.shape[0]


def _factors(weight: torch.Tensor, cov: torch.Tensor, r: int, scale: float, method: str, where: str
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """A, B with s B A = r components of W = U S (V^T C^-1), from the SVD of W C."""
    if not torch.isfinite(cov).all():
        raise ValueError(f"CorDA: the inputs of {where!r} have NaN or inf values")
    eye = torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)
    damp = 0.01
    while True:
        fixed = cov + eye * (cov.diagonal().mean() * damp)
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, eye) < 0.05:
            break
        damp *= 2
    u, s, vh = torch.linalg.svd(weight.detach().float() @ fixed, full_matrices=False)
    v = vh @ inverse  # rows: V^T C^-1
    pick = slice(None, r) if method == "ipm" else slice(-r, None)
    root = (s[pick] / scale).sqrt()
    return root[:, None] * v[pick], u[:, pick] * root[None, :]
