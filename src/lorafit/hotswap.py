"""Hot-swapping: another adapter's weights into an attached adapter's tensors, in place.

A model that was compiled (``torch.compile``) with an adapter keeps its compiled code when only the values of
its parameters change: no new wrapper, no new parameter, no other shape, no other Python number that the
compiled code read. ``hotswap_adapter`` keeps to that:

- the new adapter is read and checked by lorafit's loader (attached under a temporary name, every tensor's
  name and shape checked), then copied into the slot's tensors and detached again;
- a smaller rank is padded with zeros (A's extra rows, B's extra columns: ``B A`` is unchanged);
- a different scale (``lora_alpha``, ``r``, rsLoRA, the patterns) is folded into B (and ``lora_B_bias``):
  ``s_slot (B s_new / s_slot) A = s_new B A``, so each layer's scale, a Python float the compiled code holds as
  a constant, stays as it was;
- a layer that the slot adapts and the new adapter does not gets B = 0 (and, with DoRA, the magnitude of its
  base weight): it computes the base layer's output.

So a slot takes any adapter of at most its rank on a subset of its layers. To swap adapters of several ranks
into one compiled model, attach the slot first with the largest rank (``attach(model, LoraConfig(r=64,
...))``: B = 0, the base model's output), compile, and swap adapters into it.

What needs other structure is refused by name, before anything changes: a layer the slot does not adapt, a
larger rank, another variant (DoRA on one side only, ``lora_bias``, KaSA, aLoRA, token rows, expert weights,
trained base biases), ``modules_to_save`` that do not match, and a merged slot. The slot keeps its own config,
dropout included: saving it afterwards writes the swapped-in adapter at the slot's rank and scale, which loads
to the same outputs.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from lorafit.config import LoraConfig
from lorafit.io import load_adapter_state, read_adapter
from lorafit.layers import dora
from lorafit.layers.base import LoraLayer
from lorafit.layers.conv import Conv
from lorafit.layers.parameter import ParameterLora
from lorafit.model import adapter_configs, detach, lora_layers, merged_adapters, saved_modules

# Fields that give an adapter other parameters or another computation than its factors' values: they must be
# the same on both sides.
_SAME_STRUCTURE = ("use_dora", "lora_bias", "fan_in_fan_out", "kasa_config", "alora_invocation_tokens",
                   "trainable_token_indices", "target_parameters", "ensure_weight_tying", "bias")
_SWAP_NAME = "__hotswap__"


def hotswap_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default") -> nn.Module:
    """Replace the weights of attached adapter ``name`` by those of the adapter stored in ``directory``, in
    place, without changing the model's structure (module docstring). ``model`` may be the compiled model
    (``torch.compile``'s wrapper) or the model it compiled. Returns ``model``."""
    config, tensors = read_adapter(directory)
    return hotswap_adapter_state(model, config, tensors, name, source=str(directory))


def hotswap_adapter_state(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor],
                          name: str = "default", source: str = "adapter") -> nn.Module:
    """``hotswap_adapter`` for an adapter already in memory (``parse_adapter``)."""
    given, model = model, getattr(model, "_orig_mod", model)  # torch.compile's wrapper: the model it compiled
    slot = adapter_configs(model).get(name)
    if slot is None:
        raise ValueError(f"{source}: no adapter {name!r} to swap into; attached: {sorted(adapter_configs(model))}")
    if name in merged_adapters(model):
        raise ValueError(f"{source}: adapter {name!r} is merged into the base weights; unmerge it before swapping "
                         "(unmerging later would subtract the new adapter from weights that hold the old one)")
    differ = [f for f in _SAME_STRUCTURE if getattr(config, f) != getattr(slot, f)]
    if differ:
        raise ValueError(f"{source}: cannot be swapped into adapter {name!r}: "
                         + ", ".join(f"{f} is {getattr(config, f)!r} there but {getattr(slot, f)!r} here"
                                     for f in differ)
                         + " (a swap changes values only; load it as an adapter of its own)")
    if slot.layer_replication or config.layer_replication:
        raise ValueError(f"{source}: adapters with layer_replication cannot be swapped (the repeated layers are "
                         "built for one adapter's config)")
    if slot.kasa_config is not None:
        raise ValueError(f"{source}: KaSA adapters cannot be swapped (each was trained on the base weights its own "
                         "truncation left)")
    trains = [(p, p.requires_grad) for p in model.parameters()]  # attaching freezes all but the new adapter
    # The loader's checks, on a temporary adapter; it leaves the model as it was if the file does not fit.
    load_adapter_state(model, config, tensors, _SWAP_NAME, activate=False, source=source)
    try:
        layers, saved = _pairs(model, name)
        with torch.no_grad():
            for layer in layers:
                _copy_layer(layer, name)
            for wrapper in saved:
                _copy_saved(wrapper, name)
    finally:
        detach(model, _SWAP_NAME)
        for p, requires_grad in trains:
            p.requires_grad_(requires_grad)
    return given


def _pairs(model: nn.Module, name: str) -> tuple[list[LoraLayer], list[nn.Module]]:
    """The LoRA layers and modules_to_save wrappers holding the slot; refuses what a value copy cannot do."""
    problems = []
    layers, saved = list(lora_layers(model)), list(saved_modules(model))
    new = [path for path, w in layers + saved if _SWAP_NAME in w.adapter_names and name not in w.adapter_names]
    if new:
        problems.append(f"it adapts modules that adapter {name!r} does not (a swap cannot add any): {sorted(new)[:5]}")
    for path, layer in layers:
        if name not in layer.adapter_names:
            continue
        if isinstance(layer, ParameterLora):
            problems.append(f"{path}: adapters on a module's parameters (target_parameters, nn.MultiheadAttention) "
                            "cannot be swapped")
        r_new, r_slot = layer.rank.get(_SWAP_NAME, 0), layer.rank[name]
        if r_new > r_slot:
            problems.append(f"{path}: rank {r_new} > the slot's {r_slot} (attach the slot with the largest rank "
                            "you will swap in)")
        elif r_new and r_new != r_slot and isinstance(layer, Conv) and layer.base_layer.groups > 1:
            problems.append(f"{path}: a grouped convolution takes only its slot's rank ({r_slot}), got {r_new}")
    for path, wrapper in saved:
        if name in wrapper.adapter_names:
            ours = wrapper.modules_to_save[name].state_dict()
            theirs = (wrapper.modules_to_save[_SWAP_NAME].state_dict() if _SWAP_NAME in wrapper.adapter_names
                      else wrapper.original_module.state_dict())
            if {k: v.shape for k, v in ours.items()} != {k: v.shape for k, v in theirs.items()}:
                problems.append(f"{path}: the saved module's shapes differ from the slot's copy (another head size?)")
    if problems:
        raise ValueError(f"cannot swap this adapter into {name!r}: " + "; ".join(problems))
    return ([m for _, m in layers if name in m.adapter_names], [m for _, m in saved if name in m.adapter_names])


def _copy_layer(layer: LoraLayer, name: str) -> None:
    a, b = layer.factors_a[name], layer.factors_b[name]
    bias = layer.lora_B_bias.get(name)
    if _SWAP_NAME not in layer.adapter_names:  # the slot adapts it, the new adapter does not: the base's output
        b.zero_()
        if bias is not None:
            bias.zero_()
    else:
        r = layer.rank[_SWAP_NAME]
        ratio = layer.scaling[_SWAP_NAME] / layer.scaling[name]
        a.zero_()
        a[:r].copy_(layer.factors_a[_SWAP_NAME])
        b.zero_()
        b[:, :r].copy_(layer.factors_b[_SWAP_NAME].float() * ratio)
        if bias is not None:
            bias.copy_(layer.lora_B_bias[_SWAP_NAME].float() * ratio)
    magnitude = layer.lora_magnitude_vector.get(name)
    if magnitude is not None:
        if _SWAP_NAME in layer.adapter_names:
            magnitude.copy_(layer.lora_magnitude_vector[_SWAP_NAME])
        else:
            magnitude.copy_(dora.adapted_norm(layer, name).reshape(magnitude.shape))


def _copy_saved(wrapper, name: str) -> None:
    """The slot's copy of a saved module takes the new adapter's copy, or the original module's values where the
    new adapter saves none (the base model's module)."""
    source = (wrapper.modules_to_save[_SWAP_NAME] if _SWAP_NAME in wrapper.adapter_names
              else wrapper.original_module).state_dict()
    for key, value in wrapper.modules_to_save[name].state_dict().items():
        value.copy_(source[key])
