"""KaSA's regularizers (Wang et al., 2024, eqs. 9-11), which its adapters train with: the loss to add to the task's.

``beta * sum(d^2) + gamma * (||B^T B - I||_F + ||A A^T - I||_F)`` summed over the adapter's layers, with ``d``
its ``lora_diag`` and beta, gamma from its ``kasa_config``: the first keeps the learnt singular values small,
the second keeps ``B`` and ``A`` near the orthonormal bases the SVD reading of ``B diag(d) A`` assumes.
"""

from __future__ import annotations

import torch
from torch import nn

from lorafit.model import active_adapters, adapter_configs, lora_layers


def kasa_loss(model: nn.Module, names: str | list[str] | None = None) -> torch.Tensor | float:
    """The KaSA regularizers of adapters ``names`` (default: the active ones), in float32; 0.0 when none of
    them is a KaSA adapter. Differentiable: add it to the loss before backward."""
    configs = adapter_configs(model)
    names = active_adapters(model) if names is None else [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise KeyError(f"no adapter named {unknown[0]!r} is attached; attached adapters: {list(configs) or 'none'}")
    total: torch.Tensor | float = 0.0
    for _, layer in lora_layers(model):
        for name in names:
            if name not in layer.lora_diag:
                continue
            options = configs[name].kasa_config
            d = layer.lora_diag[name].float()
            a, b = layer.factors_a[name].float(), layer.factors_b[name].float()
            eye = torch.eye(d.numel(), device=d.device)
            orthogonality = torch.linalg.norm(b.T @ b - eye) + torch.linalg.norm(a @ a.T - eye)
            total = total + options["beta"] * d.square().sum() + options["gamma"] * orthogonality
    return total
