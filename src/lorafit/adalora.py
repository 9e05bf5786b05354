"""PEFT's AdaLoRA adapter files read as the plain LoRA they compute.

An AdaLoRA layer adds ``alpha / (ranknum + 1e-5) * B (diag(E) A) dropout(x)``
with A (k x d_in), E (k x 1), B (d_out x k): an SVD-shaped update whose
singular values E the training prunes, so ``save_pretrained`` keeps only the k
rows each module still uses (k may be 0) while ``ranknum`` stays the initial
rank ``init_r``. That is exactly a LoRA with A' = diag(E) A, B' = B and the
scale folded in, so lorafit loads it as one: it merges, serves and saves like
any adapter, and saves as a LoRA file that PEFT reads to the same outputs.
AdaLoRA's rank allocation itself (training) is not continued.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch

from lorafit.config import LoraConfig
from lorafit.file_factors import by_module, positive_int

_FACTORS = ("lora_A", "lora_E", "lora_B")
# AdaLoRA's LoRA options that mean the same for the LoRA it computes; the rest (its rank schedule, its
# boolean rank_pattern, the unused r, rslora, alpha_pattern) either drive training or are ignored by AdaLoRA
_KEPT = ("lora_dropout", "fan_in_fan_out", "bias", "modules_to_save", "task_type", "base_model_name_or_path",
         "inference_mode")


def initial_rank(data: dict[str, Any], source: str) -> int:
    """The rank AdaLoRA started from (``init_r``): the r of the LoRA it loads as, every module's rank at most."""
    return positive_int(data, "init_r", 12, source)


def as_lora(data: dict[str, Any], tensors: dict[str, torch.Tensor], prefix: str, source: str
            ) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The LoRA config and PEFT-keyed tensors of the AdaLoRA adapter ``data`` (its adapter_config.json) with
    ``tensors`` (its weights, keyed ``prefix`` + module + factor); ``source`` names the config file in errors."""
    init_r = initial_rank(data, source)
    alpha = data.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"{source}: lora_alpha must be a number, got {alpha!r}")
    alpha = float(alpha) if alpha > 0 else float(init_r)  # AdaLoRA's own fallback
    applied = alpha / (init_r + 1e-5)  # what AdaLoRA multiplies B diag(E) A by

    # out: modules_to_save copies and biases, as a LoRA file holds them
    factors, out = by_module(tensors, _FACTORS, prefix)
    ranks: dict[str, int] = {}
    for name, f in factors.items():
        missing = [x for x in _FACTORS if x not in f]
        if missing:
            raise ValueError(f"{source}: module {name!r} has no {', '.join(prefix + name + '.' + x for x in missing)}"
                             " tensor")
        a, e, b = f["lora_A"], f["lora_E"], f["lora_B"]
        k = a.shape[0] if a.dim() == 2 else -1
        if a.dim() != 2 or tuple(e.shape) != (k, 1) or b.dim() != 2 or b.shape[1] != k:
            raise ValueError(f"{source}: module {name!r}: lora_A {list(a.shape)}, lora_E {list(e.shape)} and "
                             f"lora_B {list(b.shape)} are not AdaLoRA's (k x d_in), (k x 1), (d_out x k)")
        if k:
            ranks[name] = k
        elif data.get("bias", "none") != "none":
            # pruned to rank 0, but PEFT still wraps it, and saves its bias under the wrapper's name: adapted
            # here too, with zero factors of rank 1, so that the bias loads where the file puts it
            ranks[name] = 1
            f["lora_E"], f["lora_A"], f["lora_B"] = e.new_zeros(1, 1), a.new_zeros(1, a.shape[1]), b.new_zeros(
                b.shape[0], 1)
    if not ranks:
        raise ValueError(f"{source}: AdaLoRA pruned every module to rank 0; the adapter changes nothing")

    config = LoraConfig.from_dict({
        **{k: data[k] for k in _KEPT if k in data},
        "r": init_r, "lora_alpha": alpha, "target_modules": sorted(ranks),
        # a module that kept k rows: rank k, and alpha scaled with it, so that every module has the scale
        # alpha / init_r (the rest of AdaLoRA's factor goes into B)
        "rank_pattern": {re.escape(n): k for n, k in ranks.items() if k != init_r},
        "alpha_pattern": {re.escape(n): alpha * k / init_r for n, k in ranks.items() if k != init_r},
    }, source=source)
    for name, k in ranks.items():
        f = factors[name]
        low = torch.promote_types(f["lora_A"].dtype, torch.float32)
        a = (f["lora_E"].to(low) * f["lora_A"].to(low)).to(f["lora_A"].dtype)
        b = (f["lora_B"].to(low) * (applied / config.scale_for(name))).to(f["lora_B"].dtype)
        out[f"{prefix}{name}.lora_A.weight"] = a
        out[f"{prefix}{name}.lora_B.weight"] = b
    warnings.warn(f"{source}: an AdaLoRA adapter, loaded as the plain LoRA it computes ({len(ranks)} modules, "
                  f"ranks {min(ranks.values())} to {max(ranks.values())}; A times its singular values E, the scale "
                  "folded into B); its rank allocation does not continue, and saving writes a LoRA file",
                  stacklevel=3)
    return config, out
