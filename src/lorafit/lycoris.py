"""PEFT's LoHa and LoKr adapter files read as the LoRA they compute.

Both add a weight change ``ΔW`` built from small factors, scaled by
``alpha / r`` (per module with ``rank_pattern`` / ``alpha_pattern``):

- LoHa: ``ΔW = (W1a W1b) ∘ (W2a W2b)``, the element-wise product of two rank-r
  matrices. It has rank at most r², with factors ``B[:, (i, j)] = W1a[:, i] ∘
  W2a[:, j]`` and ``A[(i, j), :] = W1b[i, :] ∘ W2b[j, :]``.
- LoKr: ``ΔW = W1 ⊗ W2`` (Kronecker product); with ``W1 = P1 Q1`` and
  ``W2 = P2 Q2``, ``ΔW = (P1 ⊗ P2)(Q1 ⊗ Q2)``, of rank r1 r2. A factor stored
  whole is written as itself times an identity of its smaller side.

So each module is an exact LoRA (``B A = ΔW`` up to rounding), of rank r² or
r1 r2, capped at the layer's smaller side (where the low-rank form would be
larger than ``ΔW`` itself, ``B = ΔW`` and ``A = I``, or the other way round).
It loads, merges, serves and hot-swaps like any adapter and saves as a LoRA
file that PEFT and LoRA-serving engines read. What only training uses
(``rank_dropout``, ``module_dropout``, the factor structure itself) does not
carry over: training the loaded adapter trains a LoRA.

Convolutions: the "effective" (CP) form keeps the kernel in ``t1``/``t2``, the
default form flattens it into the input side (``out x in*k*k``); either way
the LoRA factors come out flat (``A``: ``R x in*k*k``, ``B``: ``out x R``),
since the file does not say which modules are convolutions, and ``io`` shapes
them to the layer when it loads them.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch

from lorafit.config import LoraConfig, pattern_key
from lorafit.file_factors import at_least_float32, by_module

LOHA_FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
_NAMES = {"LOHA": "LoHa", "LOKR": "LoKr"}
# options that mean the same for the LoRA the adapter computes; the rest shape the factors or drive training
_KEPT = ("modules_to_save", "task_type", "base_model_name_or_path", "inference_mode")


def is_lycoris(data: Any) -> bool:
    return isinstance(data, dict) and data.get("peft_type") in _NAMES


def as_lora(data: dict[str, Any], tensors: dict[str, torch.Tensor], prefix: str, source: str
            ) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The LoRA config and PEFT-keyed tensors of the LoHa or LoKr adapter ``data`` (its adapter_config.json) with
    ``tensors`` (its weights, keyed ``prefix`` + module + factor); ``source`` names the config file in errors."""
    kind = data["peft_type"]
    names = LOHA_FACTORS if kind == "LOHA" else LOKR_FACTORS
    factors, out = by_module(tensors, names, prefix)  # out: modules_to_save copies, as a LoRA file holds them
    if not factors:
        raise ValueError(f"{source}: a {_NAMES[kind]} adapter whose weights hold no {_NAMES[kind]} factor "
                         f"({', '.join(names)})")
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, f in sorted(factors.items()):
        where = f"{source}: module {name!r}"
        scale = _number(data, "alpha", name, 8, where) / _number(data, "r", name, 8, where)
        b, a = _loha(f, where) if kind == "LOHA" else _lokr(f, where)
        b, a = _capped(b, a)
        dtype = next(iter(f.values())).dtype
        pairs[name] = ((b * scale).to(dtype), a.to(dtype))
    ranks = {name: a.shape[0] for name, (_, a) in pairs.items()}
    top = max(ranks.values())
    config = LoraConfig.from_dict({
        **{k: data[k] for k in _KEPT if k in data},
        # the scale is in B: every module gets alpha = its rank, so that alpha / r = 1
        "r": top, "lora_alpha": top, "target_modules": sorted(pairs),
        "rank_pattern": {re.escape(n): k for n, k in ranks.items() if k != top},
        "alpha_pattern": {re.escape(n): k for n, k in ranks.items() if k != top},
    }, source=source)
    for name, (b, a) in pairs.items():
        out[f"{prefix}{name}.lora_A.weight"] = a
        out[f"{prefix}{name}.lora_B.weight"] = b
    warnings.warn(f"{source}: a {_NAMES[kind]} adapter, loaded as the plain LoRA it computes ({len(pairs)} modules, "
                  f"ranks {min(ranks.values())} to {top}, the scale folded into B); its dropouts do not carry over, "
                  "and saving writes a LoRA file", stacklevel=3)
    return config, out


def _number(data: dict[str, Any], key: str, module: str, default: float, where: str) -> float:
    """``r`` or ``alpha`` of one module: its ``rank_pattern`` / ``alpha_pattern`` entry, else the config's."""
    patterns = data.get(f"{'rank' if key == 'r' else key}_pattern") or {}
    if not isinstance(patterns, dict):
        raise ValueError(f"{where}: {key}'s pattern must be a mapping, got {patterns!r}")
    found = pattern_key(patterns, module)
    value = data.get(key, default) if found is None else patterns[found]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{where}: {key} must be a number > 0, got {value!r}")
    return float(value)


def _loha(f: dict[str, torch.Tensor], where: str) -> tuple[torch.Tensor, torch.Tensor]:
    u1, v1 = _low_rank(f, "hada_w1_a", "hada_w1_b", "hada_t1", where)
    u2, v2 = _low_rank(f, "hada_w2_a", "hada_w2_b", "hada_t2", where)
    if u1.shape[0] != u2.shape[0] or v1.shape[1] != v2.shape[1]:
        raise ValueError(f"{where}: its two LoHa products have different shapes ({u1.shape[0]} x {v1.shape[1]} "
                         f"and {u2.shape[0]} x {v2.shape[1]})")
    b = (u1[:, :, None] * u2[:, None, :]).flatten(1)
    a = (v1[:, None, :] * v2[None, :, :]).flatten(0, 1)
    return b, a


def _lokr(f: dict[str, torch.Tensor], where: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if "lokr_w1" in f:
        p1, q1 = _whole(at_least_float32(f["lokr_w1"]), "lokr_w1", where)
    else:
        p1, q1 = _low_rank(f, "lokr_w1_a", "lokr_w1_b", None, where)
    if "lokr_w2" in f:
        w2 = at_least_float32(f["lokr_w2"])
        if w2.dim() == 3:
            # PEFT builds a Conv1d's change as torch.kron of a matrix and this 3-d tensor, reshaped to the
            # kernel: not the Kronecker product of two matrices, so taken as the dense change it is
            return _kron(p1 @ q1, w2).reshape(p1.shape[0] * w2.shape[0], -1), None
        p2, q2 = _whole(w2.flatten(1), "lokr_w2", where)
    else:
        p2, q2 = _low_rank(f, "lokr_w2_a", "lokr_w2_b", "lokr_t2", where)
    return _kron(p1, p2), _kron(q1, q2)


def _low_rank(f: dict[str, torch.Tensor], a_key: str, b_key: str, t_key: str | None, where: str
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``U`` (out x r) and ``V`` (r x in, a kernel flattened into it) of one stored low-rank product."""
    missing = [k for k in (a_key, b_key) if k not in f]
    if missing:
        raise ValueError(f"{where} has no {' or '.join(missing)} tensor")
    wa, wb = at_least_float32(f[a_key]), at_least_float32(f[b_key])
    t = f.get(t_key) if t_key else None
    if t is not None:
        # CP form: ΔW[p, q, k, l] = Σ_ij t[i, j, k, l] wa[i, p] wb[j, q], so U = waᵀ and V = t ×_j wb
        t = at_least_float32(t)
        if t.dim() != 4 or wa.dim() != 2 or wb.dim() != 2 or t.shape[:2] != (wa.shape[0], wb.shape[0]):
            raise ValueError(f"{where}: {t_key} {list(t.shape)}, {a_key} {list(wa.shape)} and {b_key} "
                             f"{list(wb.shape)} are not a CP decomposition (r x r x k x k, r x out, r x in)")
        return wa.T, torch.einsum("ijkl,jq->iqkl", t, wb).flatten(1)
    if wa.dim() != 2 or wb.dim() != 2 or wa.shape[1] != wb.shape[0]:
        raise ValueError(f"{where}: {a_key} {list(wa.shape)} and {b_key} {list(wb.shape)} are not a low-rank "
                         "product (out x r, r x in)")
    return wa, wb


def _whole(w: torch.Tensor, key: str, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A factor stored whole, as itself times an identity of its smaller side."""
    if w.dim() != 2:
        raise ValueError(f"{where}: {key} of shape {list(w.shape)} is not a matrix")
    rows, cols = w.shape
    return (torch.eye(rows, dtype=w.dtype), w) if rows <= cols else (w, torch.eye(cols, dtype=w.dtype))


def _capped(b: torch.Tensor, a: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``b`` and ``a`` as they are where their rank is below both sides of ``b a``; else the change ``b a``
    itself beside an identity, which is no larger then (``a`` None: ``b`` is the whole change already)."""
    if a is not None and a.shape[0] < min(b.shape[0], a.shape[1]):
        return b, a
    delta = b if a is None else b @ a
    out, inp = delta.shape
    return (delta, torch.eye(inp, dtype=delta.dtype)) if inp <= out else (torch.eye(out, dtype=delta.dtype), delta)


def _kron(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # torch.kron views its inputs, which fails for a transposed r = 1 factor: contiguous() keeps that one's
    # strides (a size-1 dimension's stride does not count), a clone does not
    return torch.kron(x.clone(memory_format=torch.contiguous_format), y.clone(memory_format=torch.contiguous_format))
