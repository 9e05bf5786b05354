"""Full trainable copies of whole modules (e.g. a new classifier head).

The original module stays untouched; each adapter gets its own copy, and the
active adapter's copy runs in forward. PEFT saves the copy's parameters under
the module's own names (``classifier.weight``), and so do we.
"""

from __future__ import annotations

import copy

from torch import nn

from lorafit.layers.base import InPlaceOf


class ModulesToSave(InPlaceOf):
    OWN = ("original_module", "modules_to_save")

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False

    row_plan = None  # set by lorafit.batched.adapter_per_row: each batch row picks its copy

    def stand_in_for(self) -> nn.Module:
        return self.current

    @property
    def current(self) -> nn.Module:
        if self.disabled or self.active is None:
            return self.original_module
        return self.modules_to_save[self.active]

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def add_adapter(self, name: str, shared: dict[int, nn.Parameter] | None = None) -> None:
        """A trainable copy for adapter ``name``; ``shared`` maps the id of an original parameter to the one the
        copy takes instead of a copy of its own (a tied head's weight: the embedding copy's)."""
        if name in self.modules_to_save:
            raise ValueError(f"adapter {name!r} already has a copy of this module")
        replica = copy.deepcopy(self.original_module, dict(shared or {}))
        for p in replica.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = replica

    def remove_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        if self.active == name:
            self.active = None

    def set_active(self, names: list[str]) -> None:
        self.active = next((n for n in names if n in self.modules_to_save), None)

    def forward(self, *args, **kwargs):
        if self.row_plan is not None:
            return self.row_plan(*args, **kwargs)
        return self.current(*args, **kwargs)
