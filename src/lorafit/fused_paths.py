"""torch modules whose inference fast path reads their layers' weights instead of calling the layers.

``nn.TransformerEncoderLayer``, in eval mode when no weight it reads needs a gradient, runs one fused kernel
on ``self_attn.in_proj_weight``, ``linear1.weight``, ``norm1.weight`` and the rest, read as attributes: an
adapter wrapped around any of them would be skipped, silently (PEFT's are). ``nn.TransformerEncoder`` then
also turns a padded batch into a nested tensor, which only that fused path takes. While a lorafit wrapper
sits inside one of them, its fast path is turned off through the attribute torch checks for it, on that
module only; the value it had comes back when the model's last adapter goes.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

# model.__dict__: [(module, attribute, its value before)]; a list matched by identity, not a dict keyed by id():
# a deep copy of the model copies the modules in it, and ids would still name the originals
_KEPT = "_lorafit_fused_paths"

# (module type, the attribute its forward checks before taking the fused path, the value that declines it)
_SWITCHES = (
    (nn.TransformerEncoderLayer, "activation_relu_or_gelu", 0),
    (nn.TransformerEncoder, "use_nested_tensor", False),
)


def turn_off(model: nn.Module, wrapped: Iterable[str]) -> None:
    """Turn off the fused paths of the modules that hold a wrapper, given the wrappers' paths in ``model``."""
    kept = model.__dict__.setdefault(_KEPT, [])
    seen: set[str] = set()
    for path in wrapped:
        parts = path.split(".")
        for depth in range(len(parts)):
            owner_path = ".".join(parts[:depth])
            if owner_path in seen:
                continue
            seen.add(owner_path)
            owner = model.get_submodule(owner_path)
            for kind, attribute, off in _SWITCHES:
                if isinstance(owner, kind) and hasattr(owner, attribute) and not any(
                        module is owner and name == attribute for module, name, _ in kept):
                    kept.append((owner, attribute, getattr(owner, attribute)))
                    setattr(owner, attribute, off)
    if not kept:
        del model.__dict__[_KEPT]


def restore(model: nn.Module) -> None:
    """The fused paths as they were before the first adapter was attached."""
    for owner, attribute, value in model.__dict__.pop(_KEPT, []):
        setattr(owner, attribute, value)
