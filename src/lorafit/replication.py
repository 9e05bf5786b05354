"""``layer_replication``: a model's stack of layers made deeper by repeating ranges of it, each repeat sharing the
base weights of the layer it copies, so that only the adapters on the repeats add memory (LLaMA Pro-style
expansion). PEFT's rule: ``[[0, 4], [2, 5]]`` turns layers 0..4 into 0, 1, 2, 3, 2, 3, 4.

Every entry of the new stack is a copy of its layer's modules holding the same parameter and buffer tensors,
so each gets adapters of its own; the original layers are kept aside, untouched, and put back when the last
adapter that needed the repeats is detached or the model unloaded. ``merge_and_unload`` gives each repeat
weights of its own first (an adapter merged into a shared weight would change every repeat of it).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

_STATE = "_lorafit_replication"


@dataclass
class Replication:
    layer_map: list[list[int]]
    parent: nn.Module  # the module that holds the list of layers
    attribute: str
    original: nn.ModuleList
    config: dict  # the model config's values before: num_hidden_layers, layer_types


def replication(model: nn.Module) -> Replication | None:
    return model.__dict__.get(_STATE)


def layer_list(model: nn.Module) -> tuple[nn.Module, str]:
    """Where a transformers model keeps its layers, as PEFT looks for them: ``(.model)*.layers`` (Llama, Mistral,
    Qwen, ...), ``(.bert).encoder.layer`` (BERT) or ``.h`` (GPT-2, Falcon)."""
    inner = model
    while isinstance(getattr(inner, "model", None), nn.Module):
        inner = inner.model
    inner = getattr(inner, "bert", inner)
    for parent, attribute in ((inner, "layers"), (getattr(inner, "encoder", None), "layer"), (inner, "h")):
        if parent is not None and isinstance(getattr(parent, attribute, None), nn.ModuleList):
            return parent, attribute
    raise ValueError(f"layer_replication: found no list of layers in {type(model).__name__} (looked for "
                     "model.layers, encoder.layer and h, as PEFT does)")


def replicate(model: nn.Module, layer_map: list[list[int]]) -> bool:
    """Repeat the model's layers as ``layer_map`` says; True if this call did it (False: they already are)."""
    layer_map = [list(pair) for pair in layer_map]
    done = replication(model)
    if done is not None:
        if done.layer_map != layer_map:
            raise ValueError(f"layer_replication: the model's layers are already repeated as {done.layer_map}, "
                             f"not {layer_map}; the adapters on one model must agree")
        return False
    parent, attribute = layer_list(model)
    layers = getattr(parent, attribute)
    for start, end in layer_map:
        if end > len(layers):
            raise ValueError(f"layer_replication: [{start}, {end}] goes past the model's {len(layers)} layers")
    repeats: list[nn.Module] = []
    sources: list[int] = []
    for start, end in layer_map:
        for i in range(start, end):
            repeats.append(_sharing_copy(layers[i], len(repeats)))
            sources.append(i)
    config = getattr(model, "config", None)
    before = {}
    if config is not None:
        for key in ("num_hidden_layers", "layer_types"):
            if hasattr(config, key):
                before[key] = getattr(config, key)
        if "num_hidden_layers" in before:
            config.num_hidden_layers = len(repeats)
        if isinstance(before.get("layer_types"), (list, tuple)) and len(before["layer_types"]) == len(layers):
            config.layer_types = [before["layer_types"][i] for i in sources]
    setattr(parent, attribute, nn.ModuleList(repeats))
    model.__dict__[_STATE] = Replication(layer_map, parent, attribute, layers, before)
    return True


def _sharing_copy(layer: nn.Module, index: int) -> nn.Module:
    """A copy of ``layer``'s modules that holds its very parameter and buffer tensors, numbered ``index`` where
    transformers' attention reads its position in the stack (``layer_idx``, which selects its cache entry)."""
    shared = {id(t): t for t in (*layer.parameters(), *layer.buffers())}
    clone = copy.deepcopy(layer, memo=shared)
    for module in clone.modules():
        if hasattr(module, "layer_idx"):
            module.layer_idx = index
    return clone


def restore(model: nn.Module) -> None:
    """The original layers and config values back, the repeats dropped."""
    done = model.__dict__.pop(_STATE, None)
    if done is None:
        return
    setattr(done.parent, done.attribute, done.original)
    config = getattr(model, "config", None)
    for key, value in done.config.items():
        setattr(config, key, value)


def untie(model: nn.Module) -> None:
    """Give every repeat tensors of its own (copies), and forget the originals: the model keeps its deeper stack
    as its own, as after ``merge_and_unload``."""
    done = model.__dict__.pop(_STATE, None)
    if done is None:
        return
    seen: set[int] = set()
    for layer in getattr(done.parent, done.attribute):
        for module in layer.modules():
            for name, tensor in list(module._parameters.items()) + list(module._buffers.items()):
                if tensor is None:
                    continue
                if id(tensor) in seen:
                    copied = tensor.detach().clone()
                    if name in module._parameters:
                        module._parameters[name] = nn.Parameter(copied, requires_grad=tensor.requires_grad)
                    else:
                        module._buffers[name] = copied
                seen.add(id(tensor))
