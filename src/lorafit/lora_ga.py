"""LoRA-GA: LoRA's factors from the base weights' gradients (Wang et al., 2024, "LoRA-GA: Low-Rank Adaptation
with Gradient Approximation"), PEFT's ``init_lora_weights="lora_ga"``.

    model = lorafit.attach_lora_ga(model, lorafit.LoraConfig(r=16, target_modules="all-linear",
                                   lora_ga_config={"direction": "ArB2r", "scale": "stable"}), batches)

The mean gradient G of the loss with respect to each adapted weight is collected over ``batches`` (the model in
training mode, as a training step sees it), and its top 2r singular triplets ``G ~ U S V^T`` (a randomized SVD, as
PEFT's) give the factors: with the default direction ``"ArB2r"``, A = the first r rows of V^T and B = the next r
columns of U times their singular values, so that the first steps of training change ``B A`` along the
directions full fine-tuning would move W. The base weight keeps ``W - s B A``, so the output is unchanged at the
start. ``lora_ga_config`` (PEFT's ``LoraGAConfig``):

- ``direction``: ``"ArB2r"`` (A from components 1..r, B from r+1..2r), ``"A2rBr"`` (the other way round),
  ``"ArBr"`` (B the even, A the odd ones of the first 2r) or ``"random"`` (r of the first 2r, for both);
- ``scale``: ``"stable"`` (B times d_out^(1/4) / sqrt(stable_gamma)), ``"weight_svd"`` (B scaled to W's top
  singular value), ``"gd_scale"`` (both divided by s) or ``"unit"``;
- ``stable_gamma`` (16).

The gradients are summed in float32 as backward produces them (one float32 buffer per adapted weight, the rest of
the model frozen). Like CorDA, the adapter fits only the residual base it was made with:
``save_adapter(..., as_plain_lora=True)`` writes it as a plain LoRA of the original weights, and a file with
``init_lora_weights="lora_ga"`` is refused when loaded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from lorafit.config import LoraConfig
from lorafit.layers.linear import is_gpt2_conv1d
from lorafit.residual import attach_residual, residual_targets

DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")
LORA_GA_DEFAULTS: dict[str, Any] = {"direction": "ArB2r", "scale": "stable", "stable_gamma": 16}


def lora_ga_options(config: LoraConfig) -> dict[str, Any]:
    given = dict(config.lora_ga_config or {})
    unknown = sorted(set(given) - set(LORA_GA_DEFAULTS))
    if unknown:
        raise ValueError(f"lora_ga_config: unknown keys {unknown}; known: {sorted(LORA_GA_DEFAULTS)}")
    options = {**LORA_GA_DEFAULTS, **given}
    if options["direction"] not in DIRECTIONS:
        raise ValueError(f"lora_ga_config['direction'] must be one of {DIRECTIONS}, got {options['direction']!r}")
    if options["scale"] not in SCALES:
        raise ValueError(f"lora_ga_config['scale'] must be one of {SCALES}, got {options['scale']!r}")
    gamma = options["stable_gamma"]
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
        raise ValueError(f"lora_ga_config['stable_gamma'] must be a number > 0, got {gamma!r}")
    return options


def attach_lora_ga(
    model: nn.Module,
    config: LoraConfig,
    batches: Iterable,
    name: str = "default",
    *,
    loss: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    activate: bool = True,
    trainable: bool = True,
) -> nn.Module:
    """Attach adapter ``name`` with LoRA-GA's initialisation, from the gradients of the loss on ``batches``; the
    base weights of the adapted layers become the residuals. A batch is a mapping of model inputs (moved to the
    model's device) whose output has a ``.loss`` (a transformers model given ``labels``), or anything ``loss(model,
    batch)`` turns into a scalar loss. Returns ``model``, whose adapter config has ``init_lora_weights="lora_ga"``."""
    options = lora_ga_options(config)
    targets = residual_targets(model, config, "lora_ga", "LoRA-GA", gpt2_conv1d=True, components=2)
    gradients = _mean_gradients(model, targets, batches, loss)
    factors = {}
    for t in targets:  # every layer's factors before any weight changes: an error leaves the model as it was
        module = model.get_submodule(t)
        transposed = is_gpt2_conv1d(module)
        grad = gradients.pop(t)  # each sum freed once its factors are taken
        factors[t] = _factors(grad.T if transposed else grad, module.weight, transposed, config.rank_for(t),
                              config.scale_for(t), options)
    attach_residual(model, dataclasses.replace(config, init_lora_weights="lora_ga", lora_ga_config=options), name,
                    factors, activate=activate, trainable=trainable)
    return model


def _mean_gradients(model: nn.Module, targets: list[str], batches: Iterable,
                    loss: Callable | None) -> dict[str, torch.Tensor]:
    """Per target, the mean over batches of the loss's gradient with respect to its weight (float32, the weight's
    own layout). Only those weights require gradients meanwhile; each gradient moves into its float32 sum as soon
    as backward has produced it, so no second copy of the gradients stays."""
    weights = {t: model.get_submodule(t).weight for t in targets}
    sums = {t: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for t, w in weights.items()}
    counts = dict.fromkeys(targets, 0)
    owners: dict[int, list[str]] = {}
    for t, w in weights.items():  # a weight shared by several targets is summed once for each
        owners.setdefault(id(w), []).append(t)
        w.grad = None  # a gradient left from before is not the loss's on these batches

    def take(param: torch.Tensor) -> None:
        for t in owners[id(param)]:
            sums[t].add_(param.grad)
            counts[t] += 1
        param.grad = None

    grad_state = {p: p.requires_grad for p in model.parameters()}
    training = model.training
    handles = []
    try:
        for p in grad_state:
            p.requires_grad_(False)
        for w in {id(w): w for w in weights.values()}.values():
            w.requires_grad_(True)
            handles.append(w.register_post_accumulate_grad_hook(take))
        model.train()
        device = next((p.device for p in model.parameters()), None)
        with torch.enable_grad():
            for batch in batches:
                value = _loss(model, batch, loss, device)
                if not (isinstance(value, torch.Tensor) and value.numel() == 1 and value.requires_grad):
                    raise ValueError("LoRA-GA: the loss of a batch must be a scalar tensor that depends on the adapted "
                                     f"weights, got {type(value).__name__}"
                                     + (f" of shape {list(value.shape)}" if isinstance(value, torch.Tensor) else ""))
                value.backward()
    finally:
        for handle in handles:
            handle.remove()
        for p, wanted in grad_state.items():
            p.requires_grad_(wanted)
            if p.grad is not None and not wanted:
                p.grad = None
        model.train(training)
    missing = [t for t in targets if not counts[t]]
    if missing:
        raise ValueError(f"LoRA-GA: no gradient reached {missing[0]!r} (are batches empty, or does the loss not "
                         "depend on it?)")
    for t in targets:
        sums[t] /= counts[t]
        if not torch.isfinite(sums[t]).all():
            raise ValueError(f"LoRA-GA: the gradient of {t!r} has NaN or inf values")
    return sums


def _loss(model: nn.Module, batch: Any, loss: Callable | None, device: torch.device | None) -> torch.Tensor:
    if loss is not None:
        return loss(model, batch)
    if not isinstance(batch, Mapping):
        raise ValueError("LoRA-GA: a batch must be a mapping of model inputs with labels (the model's output then "
                         f"has a .loss), got {type(batch).__name__}; or pass loss=lambda model, batch: ...")
    output = model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    value = getattr(output, "loss", None)
    if value is None:
        raise ValueError("LoRA-GA: the model's output has no .loss (do the batches have labels?); or pass "
                         "loss=lambda model, batch: ...")
    return value


def _factors(grad: torch.Tensor, weight: torch.Tensor, transposed: bool, r: int, scaling: float,
             options: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r x d_in) and B (d_out x r) in the weight's dtype from the gradient (d_out x d_in), as PEFT's
    LoRA-GA picks and scales them."""
    u, s, v = torch.svd_lowrank(grad, q=min(4 * r, min(grad.shape)), niter=4)
    vh = v.T
    direction = options["direction"]
    if direction == "ArBr":
        picks_a, picks_b = slice(1, 2 * r, 2), slice(0, 2 * r, 2)
    elif direction == "A2rBr":
        picks_a, picks_b = slice(r, 2 * r), slice(None, r)
    elif direction == "ArB2r":
        picks_a, picks_b = slice(None, r), slice(r, 2 * r)
    else:
        picks_a = picks_b = torch.randperm(2 * r)[:r].to(grad.device)
    a, s_b = vh[picks_a], s[picks_b]
    b = u[:, picks_b] * s_b
    scale = options["scale"]
    if scale == "stable":  # d_out, also for GPT-2's Conv1D (PEFT takes its stored weight's first side, d_in)
        b = b * (grad.shape[0] ** 0.25 / options["stable_gamma"] ** 0.5)
    elif scale == "weight_svd":
        w = weight.detach().float()
        top = torch.svd_lowrank(w.T if transposed else w, q=r, niter=4)[1][0]
        if s_b[0] > 0:
            b = b * (top / s_b[0])
    elif scale == "gd_scale":
        a, b = a / scaling, b / scaling
    return a.to(weight.dtype).contiguous(), b.to(weight.dtype).contiguous()
