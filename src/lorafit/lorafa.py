"""LoRA-FA (Zhang et al., 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models
Fine-tuning"): A stays frozen at its random initialisation, only B trains, and B's gradient is projected so that
the step ``s dB A`` is the closest a change of B alone comes to a full fine-tuning step.

With A frozen a linear layer's backward no longer needs the layer's input (only A's gradient read it; B's
reads ``x A^T``, which is r wide), so inputs that nothing else keeps for backward (a norm's output that q, k
and v share, an MLP's down-projection input) are not kept: that is the activation memory LoRA-FA saves.

The projection: B's gradient is ``g_B = s G A^T`` for the adapted weight's gradient G, and the B step whose
``s dB A`` is closest (Frobenius) to a step along G is ``G A^T (A A^T)^-1 / s``, that is
``g_B (A A^T)^-1 / s^2``: what the optimizer gets in place of g_B (PEFT's ``create_lorafa_optimizer`` computes the
same). A does not change, so ``(A A^T)^-1`` is computed once per layer (again if A is changed in place, such as
by loading an adapter).

    optimizer = lorafit.lorafa_optimizer(model, lr=2e-4)      # AdamW on B (and what else trains)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from lorafit.io import whole_tensor
from lorafit.layers.base import LoraLayer
from lorafit.layers.conv import Conv
from lorafit.layers.parameter import ParameterLora
from lorafit.model import active_adapters, lora_layers
from lorafit.optimizer_groups import optimizer_groups

_DELTA = 1e-8  # added to A A^T's diagonal before inverting, as PEFT does: a rank-deficient A stays invertible


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class LoraFAProjection:
    """B's gradients projected for LoRA-FA, as an optimizer step pre-hook (``register``). ``stepped`` maps a B
    factor to the tensor the optimizer steps on (a float32 master copy of it, where there is one)."""

    def __init__(self, model: nn.Module, adapters: Sequence[str],
                 stepped: Callable[[torch.Tensor], torch.Tensor] = lambda p: p) -> None:
        self.stepped = stepped
        self.pairs: list[tuple[LoraLayer, str]] = []
        for path, layer in lora_layers(model):
            for name in adapters:
                if name not in layer.factors_a:
                    continue
                problem = _unsupported(layer, name)
                if problem:
                    raise ValueError(f"LoRA-FA: {path}: {problem}")
                self.pairs.append((layer, name))
        if not self.pairs:
            raise ValueError(f"LoRA-FA: adapters {list(adapters)} adapt no layer of this model")
        self._inverses: dict[int, tuple[int, torch.Tensor]] = {}  # id(A) -> (A's version, (A A^T)^-1 / s^2)

    def freeze_a(self) -> None:
        """A stays as initialised: it gets no gradient, so backward keeps no input for it."""
        for layer, name in self.pairs:
            layer.factors_a[name].requires_grad_(False)

    def _inverse(self, layer: LoraLayer, name: str) -> torch.Tensor:
        a = layer.factors_a[name]
        cached = self._inverses.get(id(a))
        if cached is not None and cached[0] == a._version:
            return cached[1]
        with torch.no_grad():
            a2 = whole_tensor(a).detach().flatten(1).float()
            gram = a2 @ a2.T
            gram.diagonal().add_(_DELTA)
            inverse = torch.linalg.pinv(gram) / layer.scaling[name] ** 2
        self._inverses[id(a)] = (a._version, inverse)
        return inverse

    @torch.no_grad()
    def project(self) -> None:
        """Every B gradient ``g`` (d_out x r) replaced by ``g (A A^T)^-1 / s^2``, in place."""
        for layer, name in self.pairs:
            grad = self.stepped(layer.factors_b[name]).grad
            if grad is None:
                continue
            g = _local(grad)  # FSDP shards B by rows: each row is projected on its own
            rows = g.flatten(1)
            rows.copy_((rows.float() @ self._inverse(layer, name).to(g.device)).to(g.dtype))

    def register(self, optimizer: torch.optim.Optimizer):
        """Project before each ``optimizer.step()`` (after gradient clipping and loss unscaling, which come
        before the step); returns the hook's handle."""
        return optimizer.register_step_pre_hook(lambda *_: self.project())


def _unsupported(layer: LoraLayer, name: str) -> str | None:
    if name in layer.lora_magnitude_vector:
        return "a DoRA adapter (its magnitude rescales B A, which the projection does not account for)"
    if name in layer.lora_diag:
        return "a KaSA adapter (its diagonal sits between B and A)"
    if isinstance(layer, ParameterLora) and layer.experts > 1:
        return "expert weights (target_parameters): one A and B per expert, interleaved"
    if isinstance(layer, Conv) and layer.base_layer.groups > 1:
        return "a grouped convolution"
    if not layer.factors_b[name].requires_grad:
        return "its B does not train (MiCA, or attached with trainable=False); with A frozen too nothing would"
    return None


def lorafa_optimizer(model: nn.Module, lr: float, *, weight_decay: float = 0.0,
                     betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                     adapters: str | Sequence[str] | None = None, **adamw: object) -> torch.optim.AdamW:
    """Freeze the A factors of ``adapters`` (default: the active ones) and return AdamW over what still trains
    (``lorafit.optimizer_groups``: weight decay on matrices only), with B's gradients projected before each step.
    ``adamw`` goes to ``torch.optim.AdamW`` (``fused=True``, ...)."""
    names = [adapters] if isinstance(adapters, str) else list(adapters or active_adapters(model))
    projection = LoraFAProjection(model, names)
    projection.freeze_a()
    optimizer = torch.optim.AdamW(optimizer_groups(model, lr, weight_decay), lr=lr, betas=betas, eps=eps, **adamw)
    projection.register(optimizer)
    return optimizer
