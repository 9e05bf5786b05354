"""What the initialisations computed from data that leave a residual in the base weight share (CorDA, LoRA-GA):
which layers they can start from, and attaching their factors with ``W - s B A`` left in the base."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lorafit.config import LoraConfig
from lorafit.layers.linear import is_gpt2_conv1d, rewrite_problem
from lorafit.model import attach
from lorafit.targeting import resolve_targets


def residual_targets(model: nn.Module, config: LoraConfig, init: str, method: str, *, gpt2_conv1d: bool = False,
                     components: int = 1) -> list[str]:
    """The layers ``config`` targets for initialisation ``init``, each checked before anything is computed: a
    plain linear layer (and GPT-2's Conv1D where ``gpt2_conv1d``), neither quantized nor adapted yet, with
    ``components * r`` at most the smaller side of its weight. ``method`` names the initialisation in errors."""
    if config.target_parameters or config.trainable_token_indices or config.use_dora or config.layer_replication \
            or config.lora_bias or config.alora_invocation_tokens:
        raise ValueError(f"{method} initialises LoRA on linear layers of the model as it is; target_parameters, "
                         "trainable_token_indices, DoRA, lora_bias, aLoRA and layer_replication are not supported "
                         "with it")
    targets = resolve_targets(model, config)
    kinds = "linear layers" if gpt2_conv1d else "nn.Linear layers"
    for t in targets:
        module = model.get_submodule(t)
        if type(module) is not nn.Linear and not (gpt2_conv1d and is_gpt2_conv1d(module)):
            raise ValueError(f"{method} initialises the weights of {kinds}; {t!r} is a {type(module).__name__} (a "
                             f"quantized or already adapted layer: attach {method} first; else exclude it)")
        r = config.rank_for(t)
        problem = rewrite_problem(module, init, r)
        if problem:
            raise ValueError(f"{t}: {problem}")
        if components * r > min(module.weight.shape):
            raise ValueError(f"{t}: {method} takes {components}r components, so it needs {components}r <= "
                             f"min(d_in, d_out) = {min(module.weight.shape)}, got r={r}")
    return targets


def attach_residual(model: nn.Module, config: LoraConfig, name: str,
                    factors: dict[str, tuple[torch.Tensor, torch.Tensor]], *, activate: bool, trainable: bool) -> None:
    """Attach adapter ``name`` on exactly the layers of ``factors`` (target -> (A, B), Linear layout), with those
    factors, and leave ``W - s B A`` in each base weight, computed from the factors as the layer holds them (in
    their dtype), so the model's output does not change. The factors are kept for ``as_plain_lora``."""
    final = dataclasses.replace(config, target_modules=list(factors), layers_to_transform=None, layers_pattern=None,
                                exclude_modules=None)
    attach(model, final, name, activate=activate, trainable=trainable, initialize=False)
    with torch.no_grad():
        for t, (a, b) in factors.items():
            layer = model.get_submodule(t)
            a_param, b_param = layer.lora_A[name], layer.lora_B[name]
            a_param.copy_(a)
            b_param.copy_(b)
            delta = layer.scaling[name] * (b_param.float() @ a_param.float())
            weight = layer.base_layer.weight
            weight.copy_((weight.float() - (delta.T if layer.fan_in_fan_out else delta)).to(weight.dtype))
            # what as_plain_lora needs to write the trained adapter as a LoRA of the original weight
            layer.initial_factors[name] = (a_param.detach().clone(), b_param.detach().clone())
