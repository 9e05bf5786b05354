"""PEFT's VeRA adapter files read as the LoRA they compute.

VeRA (Kopiczko et al., 2024) shares one frozen random pair of matrices between all the layers it adapts,
``A`` (r x the largest d_in) and ``B`` (the largest d_out x r), and trains two vectors per layer, ``d`` (r) and
``b`` (d_out): ``ΔW = diag(b) B[:d_out] diag(d) A[:, :d_in]``, unscaled. That is a LoRA of rank r with
``B' = diag(b) B[:d_out]``, ``A' = diag(d) A[:, :d_in]`` and ``lora_alpha = r``, so lorafit loads it as one:
it merges, serves, hot-swaps and saves as a LoRA file that PEFT reads to the same outputs. Training the
loaded adapter trains a LoRA (VeRA's vectors alone are not continued).

The file does not say a layer's d_in (``d`` has r entries), so each ``A'`` comes out of ``parse`` at the
shared width, and loading cuts it to the layer's (``sliced_to_layers``). The parsed tensors keep the file's
own ``SHARED_A`` key to ask for that cut: a LoRA file never holds it, so a too-wide LoRA ``A`` stays an error.
What has no model to read the widths from (``lorafit convert``) refuses such tensors.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from lorafit.config import LoraConfig
from lorafit.file_factors import at_least_float32, by_module, positive_int

SHARED_A = "base_model.vera_A"
SHARED_B = "base_model.vera_B"
_FACTORS = ("vera_lambda_b", "vera_lambda_d")
# options that mean the same for the LoRA the adapter computes; VeRA's bias "vera_only" is LoRA's "lora_only"
# (both train and save the adapted layers' own biases, under the same keys)
_KEPT = ("fan_in_fan_out", "modules_to_save", "task_type", "base_model_name_or_path", "inference_mode")
_BIAS = {"none": "none", "all": "all", "vera_only": "lora_only"}


def is_vera(data: Any) -> bool:
    return isinstance(data, dict) and data.get("peft_type") == "VERA"


def rank(data: dict[str, Any], source: str) -> int:
    return positive_int(data, "r", 256, source)  # PEFT's default r for VeRA


def as_lora(data: dict[str, Any], tensors: dict[str, torch.Tensor], prefix: str, source: str
            ) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The LoRA config and PEFT-keyed tensors of the VeRA adapter ``data`` (its adapter_config.json) with
    ``tensors`` (its weights: ``SHARED_A``, ``SHARED_B`` and per module ``prefix`` + module + a vector), each
    ``lora_A`` at the shared width, plus ``SHARED_A`` itself; ``source`` names the config file in errors."""
    r = rank(data, source)
    if data.get("save_projection", True) is False or SHARED_A not in tensors or SHARED_B not in tensors:
        raise ValueError(f"{source}: a VeRA adapter saved without its shared projections ({SHARED_A}, {SHARED_B}; "
                         "save_projection=false), which only PEFT's own random generator makes again; load it with "
                         "PEFT and save it with save_projection=True")
    bias = data.get("bias", "none")
    if bias not in _BIAS:
        raise ValueError(f"{source}: bias must be one of {', '.join(map(repr, _BIAS))}, got {bias!r}")
    shared_a, shared_b = at_least_float32(tensors[SHARED_A]), at_least_float32(tensors[SHARED_B])
    if shared_a.dim() != 2 or shared_b.dim() != 2 or shared_a.shape[0] != r or shared_b.shape[1] != r:
        raise ValueError(f"{source}: {SHARED_A} {list(shared_a.shape)} and {SHARED_B} {list(shared_b.shape)} are not "
                         f"the shared projections of rank r={r} (r x d_in, d_out x r)")
    rest = {k: t for k, t in tensors.items() if k not in (SHARED_A, SHARED_B)}
    factors, out = by_module(rest, _FACTORS, prefix)  # out: modules_to_save copies and biases, as LoRA keys them
    if not factors:
        raise ValueError(f"{source}: a VeRA adapter whose weights hold no {' or '.join(_FACTORS)} tensor")
    for name, f in sorted(factors.items()):
        where = f"{source}: module {name!r}"
        missing = [k for k in _FACTORS if k not in f]
        if missing:
            raise ValueError(f"{where} has no {missing[0]} tensor")
        b, d = at_least_float32(f["vera_lambda_b"]), at_least_float32(f["vera_lambda_d"])
        if d.shape != (r,) or b.dim() != 1 or b.shape[0] > shared_b.shape[0]:
            raise ValueError(f"{where}: vera_lambda_d {list(d.shape)} and vera_lambda_b {list(b.shape)} do not "
                             f"fit the shared projections (r={r}: d has r entries, b at most {shared_b.shape[0]})")
        dtype = f["vera_lambda_b"].dtype
        out[f"{prefix}{name}.lora_A.weight"] = (d[:, None] * shared_a).to(dtype)
        out[f"{prefix}{name}.lora_B.weight"] = (b[:, None] * shared_b[: b.shape[0]]).to(dtype)
    out[SHARED_A] = tensors[SHARED_A]
    config = LoraConfig.from_dict({
        **{k: data[k] for k in _KEPT if k in data},
        "r": r, "lora_alpha": r,  # VeRA's change is unscaled
        "lora_dropout": data.get("vera_dropout", 0.0), "bias": _BIAS[bias], "target_modules": sorted(factors),
    }, source=source)
    warnings.warn(f"{source}: a VeRA adapter, loaded as the plain LoRA it computes ({len(factors)} modules, rank "
                  f"{r}); training it trains a LoRA, and saving writes a LoRA file", stacklevel=3)
    return config, out


def sliced_to_layers(expected: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
    """``tensors`` without ``SHARED_A``, each ``lora_A`` cut to its layer's width where ``SHARED_A`` asks for it
    (as VeRA slices its shared ``A``); a layer wider than the shared ``A`` stays a shape error."""
    if SHARED_A not in tensors:
        return tensors
    out = {k: t for k, t in tensors.items() if k != SHARED_A}
    for key, t in out.items():
        want = expected.get(key)
        if key.endswith(".lora_A.weight") and want is not None and want.dim() == 2 and want.shape[1] < t.shape[1]:
            out[key] = t[:, : want.shape[1]].contiguous()
    return out
