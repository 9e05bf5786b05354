"""Arrow: a per-token mixture of trained LoRA adapters (Ostapenko et al., 2024, "Towards Modular LLMs by
Building and Reusing a Library of LoRAs"), PEFT's ``arrow_config`` / ``create_arrow_model``; with GenKnowSub
(Bagherifard et al., 2025) optionally.

    with lorafit.arrow_routing(model, ["math", "code", "law"], top_k=2):
        out = model.generate(**prompts)     # each token of each layer mixes the 2 experts that fit it best

Each adapted linear layer gets a prototype per expert e: the top right singular vector v_e of its change
``B_e A_e`` (the input direction the expert acts on most; exact, from a QR of B and an r x d_in SVD). A token x
scores every expert by ``|v_e . x|``, keeps the ``top_k`` best and weighs them by a softmax of those scores over
``temperature``; the layer adds ``sum_e c_e s_e B_e A_e x``. As in PEFT, the scores are not normalised by |x|.

How. The experts' factors are stacked once on entering the block, ``A = [A_1; ...; A_E]`` (R x d_in, R the sum of
the ranks) and ``B = [s_1 B_1, ..., s_E B_E]`` (d_out x R), so a layer computes

    y = base(x) + ((x A^T) * c[:, expert of each column]) B^T

two products however many experts there are, and nothing of size tokens x experts x d_out (PEFT's einsum
builds that tensor). Experts may have different ranks. The stacks stay on the layer for the next block with the
same adapters, until a factor changes.

GenKnowSub (``general=[...]``): the mean of the general adapters' A (and B) is subtracted from each expert's A
(and B) before the prototypes are taken, as PEFT does; here in the stacked copies, so the adapters themselves stay
as they are (PEFT changes them in place). Inside the block the routed layers compute the base plus the mixture
only (other adapters are not applied there); it is an inference path (no gradients for the experts).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from lorafit.layers import Linear
from lorafit.model import adapter_configs, lora_layers


class Routing(NamedTuple):
    """One layer's experts, stacked: prototypes (E x d_in), A (R x d_in), s B (d_out x R) and each of the R
    columns' expert."""

    prototypes: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    expert_of_column: torch.Tensor


@contextlib.contextmanager
def arrow_routing(model: nn.Module, experts: Sequence[str], *, top_k: int | None = None, temperature: float = 1.0,
                  general: Sequence[str] | None = None):
    """Inside the block, every layer the ``experts`` adapt adds the Arrow mixture of them, token by token (see the
    module docstring); ``top_k`` defaults to PEFT's 3, or every expert when there are fewer. ``general``: adapters
    whose mean GenKnowSub subtracts from each expert first. Experts must adapt the same linear layers; they need
    not share a rank (GenKnowSub's must, as their factors are averaged)."""
    experts, general = list(experts), list(general or [])
    known = adapter_configs(model)
    unknown = [n for n in experts + general if n not in known]
    if unknown:
        raise KeyError(f"no adapter named {unknown[0]!r} is attached; attached adapters: {list(known) or 'none'}")
    if not experts:
        raise ValueError("arrow_routing needs at least one expert adapter")
    if len(set(experts)) != len(experts) or set(experts) & set(general):
        raise ValueError(f"arrow_routing: each adapter once, as an expert or as a general one (experts {experts}, "
                         f"general {general})")
    top_k = min(3, len(experts)) if top_k is None else top_k
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= len(experts):
        raise ValueError(f"top_k must be an integer from 1 to the number of experts ({len(experts)}), got {top_k!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    names = experts + general
    layers = []
    for path, layer in lora_layers(model):
        present = [n for n in names if n in layer.adapter_names]
        if not present:
            continue
        missing = [n for n in names if n not in present]
        if missing:
            raise ValueError(f"{path}: adapters {present} adapt it and {missing} do not; Arrow mixes adapters of the "
                             "same layers")
        if not isinstance(layer, Linear) or layer.activation or any(
                n in layer.lora_magnitude_vector or n in layer.lora_diag for n in names):
            raise ValueError(f"{path}: Arrow mixes plain LoRA adapters of linear layers, not "
                             f"{type(layer.base_layer).__name__} layers, DoRA, aLoRA or KaSA adapters")
        if layer.merged:
            raise ValueError(f"{path}: adapters {layer.merged} are merged into its weight; unmerge them before Arrow "
                             "routing")
        if layer.row_plan is not None:
            raise RuntimeError("adapter_per_row or arrow_routing is already active on this model (one block at a "
                               "time)")
        layers.append((path, layer))
    if not layers:
        raise ValueError(f"adapters {names} adapt no layer of this model")
    plans = [_plan(layer, _stacks(path, layer, experts, general), top_k, temperature) for path, layer in layers]
    try:
        for (_, layer), plan in zip(layers, plans):
            layer.__dict__["row_plan"] = plan  # the per-layer forward override adapter_per_row uses too
        yield model
    finally:
        for _, layer in layers:
            layer.__dict__.pop("row_plan", None)


_CACHE = "_lorafit_arrow_stacks"


def _stacks(path: str, layer: Linear, experts: list[str], general: list[str]) -> Routing:
    """The layer's stacks, kept on it for the next block with the same adapters while no factor changed (a
    tensor's version counter or storage moves): a server routing request after request computes them once."""
    a_of, b_of = layer.factors_a, layer.factors_b
    key = (tuple(experts), tuple(general), tuple((t.data_ptr(), t._version, layer.scaling[n])
                                                 for n in experts + general for t in (a_of[n], b_of[n])))
    cached = layer.__dict__.get(_CACHE)
    if cached is None or cached[0] != key:
        cached = layer.__dict__[_CACHE] = (key, _stacked(path, layer, experts, general))
    return cached[1]


@torch.no_grad()
def _stacked(path: str, layer: Linear, experts: list[str], general: list[str]) -> Routing:
    a_of, b_of = layer.factors_a, layer.factors_b
    subtract_a = subtract_b = None
    if general:
        ranks = {a_of[n].shape[0] for n in experts + general}
        if len(ranks) > 1:
            raise ValueError(f"{path}: GenKnowSub subtracts the general adapters' mean factors from each expert's, "
                             f"so all need the same rank here (got ranks {sorted(ranks)})")
        subtract_a = torch.stack([a_of[n].float() for n in general]).mean(0)
        subtract_b = torch.stack([b_of[n].float() for n in general]).mean(0)
    dtype = a_of[experts[0]].dtype
    prototypes, a_parts, b_parts, owner = [], [], [], []
    for e, name in enumerate(experts):
        a, b = a_of[name].float(), b_of[name].float()
        if subtract_a is not None:
            a, b = a - subtract_a, b - subtract_b
        prototypes.append(_top_right_singular_vector(a, b))
        a_parts.append(a)
        b_parts.append(b * layer.scaling[name])
        owner.append(torch.full((a.shape[0],), e, dtype=torch.long, device=a.device))
    return Routing(torch.stack(prototypes).to(dtype), torch.cat(a_parts).to(dtype), torch.cat(b_parts, 1).to(dtype),
                   torch.cat(owner))


def _top_right_singular_vector(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The top right singular vector of B A (d_out x d_in) without forming it: B = Q R, so B A = Q (R A) has the
    right singular vectors of the r x d_in matrix R A."""
    r_factor = torch.linalg.qr(b)[1]
    return torch.linalg.svd(r_factor @ a, full_matrices=False)[2][0]


def _plan(layer: Linear, routing: Routing, top_k: int, temperature: float):
    base = layer.base_layer
    prototypes, a, b, owner = routing

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = base(x, *args, **kwargs)
        tokens = x.reshape(-1, x.shape[-1]).to(a.dtype)
        scores = (tokens @ prototypes.T).abs()
        top, chosen = torch.topk(scores, top_k, dim=1)
        weights = torch.zeros_like(scores).scatter_(1, chosen, torch.softmax(top / temperature, dim=1))
        h = (tokens @ a.T).mul_(weights[:, owner])
        flat = y.reshape(-1, y.shape[-1])
        if flat.dtype == h.dtype:
            return flat.addmm(h, b.T).view(y.shape)
        return (flat + (h @ b.T).to(flat.dtype)).view(y.shape)

    return forward
