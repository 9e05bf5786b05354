"""The tensors of a PEFT adapter file grouped by the module they adapt, for the readers that turn another
adapter type's factors into a LoRA's (adalora.py, lycoris.py, vera.py)."""

from __future__ import annotations

from typing import Any

import torch


def by_module(tensors: dict[str, torch.Tensor], names: tuple[str, ...], prefix: str
              ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """``{module: {factor: tensor}}`` of the keys ``prefix + module + "." + factor`` whose factor is one of
    ``names``, and every other tensor as it is keyed (modules_to_save copies, biases)."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        module, _, factor = key.rpartition(".")
        if factor in names and module.startswith(prefix):
            factors.setdefault(module.removeprefix(prefix), {})[factor] = t
        else:
            rest[key] = t
    return factors, rest


def positive_int(data: dict[str, Any], key: str, default: int, source: str) -> int:
    """An integer >= 1 of an adapter config (its default where the config has none)."""
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{source}: {key} must be an integer >= 1, got {value!r}")
    return value


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    # factors multiplied in at least float32: a bf16 file's factors are exact there, their products would not be
    return t.to(torch.promote_types(t.dtype, torch.float32))
