"""Optimizer parameter groups for an adapted model: weight decay on matrices only, and LoRA+ learning rates.

LoRA+ (Hayou et al., 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models") trains B with a learning
rate ``loraplus_lr_ratio`` times A's: with one rate for both, B (which starts at zero) learns too slowly in wide
layers. The paper's ratio is about 16; PEFT's ``create_loraplus_optimizer`` takes the same ``loraplus_lr_ratio``.

    groups = lorafit.optimizer_groups(model, lr=2e-4, weight_decay=0.01, loraplus_lr_ratio=16)
    optimizer = torch.optim.AdamW(groups)

B here is every adapter's B factor (``lora_B``, ``lora_embedding_B``) and its ``lora_B_bias``, found through the
adapted layers, not by parameter name. An embedding's adapter (A and B) trains at ``loraplus_lr_embedding``
instead, 1e-6 by default, as in the paper's code and PEFT. Everything else that trains (A, DoRA's magnitudes,
KaSA's diagonal, token rows, ``modules_to_save``) keeps ``lr``. PEFT's grouping differs on one point: it also
gives every other one-dimensional parameter (DoRA's magnitudes, the biases of saved modules) B's rate.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lorafit.layers.base import LoraLayer
from lorafit.layers.embedding import Embedding


def optimizer_groups(model: nn.Module, lr: float, weight_decay: float = 0.0, loraplus_lr_ratio: float = 1.0,
                     loraplus_lr_embedding: float = 1e-6) -> list[dict[str, Any]]:
    """The trainable parameters of ``model`` as optimizer groups, each with its ``lr`` and ``weight_decay``.

    Weight decay applies to matrices only: biases and norm weights (one-dimensional, or named ``norm``) never
    decay. With ``loraplus_lr_ratio`` other than 1 (LoRA+), the adapters' B factors and biases get
    ``lr * loraplus_lr_ratio`` and embedding adapters ``loraplus_lr_embedding``. Empty groups are left out."""
    for key, value in (("loraplus_lr_ratio", loraplus_lr_ratio), ("loraplus_lr_embedding", loraplus_lr_embedding)):
        if not value > 0:
            raise ValueError(f"{key} must be > 0 (a ratio of 1 turns LoRA+ off), got {value!r}")
    rate = {}  # id(parameter) -> its learning rate, where it is not lr
    if loraplus_lr_ratio != 1:
        for module in model.modules():
            if isinstance(module, Embedding):
                for factors in (module.factors_a, module.factors_b):
                    rate.update((id(p), loraplus_lr_embedding) for p in factors.values())
            elif isinstance(module, LoraLayer):
                for factors in (module.factors_b, module.lora_B_bias):
                    rate.update((id(p), lr * loraplus_lr_ratio) for p in factors.values())
    groups: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decays = p.ndim >= 2 and "norm" not in name.lower()
            groups.setdefault((rate.get(id(p), lr), decays), []).append(p)
    return [{"params": params, "lr": group_lr, "weight_decay": weight_decay if decays else 0.0}
            for (group_lr, decays), params in sorted(groups.items(), key=lambda kv: (kv[0][0] != lr, not kv[0][1]))]
