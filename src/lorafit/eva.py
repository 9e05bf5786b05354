"""EVA: LoRA's ``A`` from the principal directions of each layer's inputs on data (Paischer et al., 2024,
"One Initialization to Rule them All"), with the ranks moved to the layers whose inputs need them.

    model = lorafit.attach_eva(model, lorafit.LoraConfig(r=16, target_modules="all-linear"), batches)

For every adapted linear layer the inputs it sees on ``batches`` get an incremental PCA (Ross et al., 2008):
per batch one SVD of the kept components stacked on the batch's centred rows, so memory stays at
about 2 r rho x d_in per distinct input. Layers that receive the same tensor (q/k/v projections) share one PCA.
The budget of ``sum of r`` components goes to the directions with the largest share of their layer's variance,
at most ``round(r * rho)`` per layer; a layer left with none gets no adapter. ``A`` holds the layer's top
components and ``B`` starts at 0, so the model's output is unchanged. Batches are read until every layer's
assigned components have settled (cosine similarity of successive estimates >= ``tau``) or they run out.

The saved adapter is an ordinary LoRA with ``init_lora_weights="eva"`` and the ranks in ``rank_pattern``, as PEFT
writes it; options use PEFT's ``EvaConfig`` names in ``config.eva_config``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from lorafit.config import LoraConfig
from lorafit.model import attach
from lorafit.targeting import layer_kind, resolve_targets

# PEFT's EvaConfig fields and defaults
EVA_DEFAULTS: dict[str, Any] = {"rho": 2.0, "tau": 0.99, "use_label_mask": True, "label_mask_value": -100,
                                "whiten": False, "adjust_scaling_factors": True}


def eva_options(config: LoraConfig) -> dict[str, Any]:
    """``config.eva_config`` over PEFT's defaults, checked."""
    given = dict(config.eva_config or {})
    unknown = sorted(set(given) - set(EVA_DEFAULTS))
    if unknown:
        raise ValueError(f"eva_config: unknown keys {unknown}; known: {sorted(EVA_DEFAULTS)}")
    options = {**EVA_DEFAULTS, **given}
    if not isinstance(options["rho"], (int, float)) or isinstance(options["rho"], bool) or options["rho"] < 1:
        raise ValueError(f"eva_config['rho'] must be a number >= 1, got {options['rho']!r}")
    if not isinstance(options["tau"], (int, float)) or isinstance(options["tau"], bool) or not (
            0 <= options["tau"] <= 1):
        raise ValueError(f"eva_config['tau'] must be a number between 0 and 1, got {options['tau']!r}")
    return options


class IncrementalPCA:
    """Principal components of a stream of rows (n x d): mean, components and singular values. It needs ``k`` and
    keeps ``2 k + 8``: each update sees the rows seen before only through the kept components, so the ones just
    past ``k`` carry variance the first ``k`` would otherwise lose to the truncation."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.components: torch.Tensor | None = None  # (k, d), unit rows
        self.singular: torch.Tensor | None = None  # (k,)
        # sum of squared distances of every row seen to their mean (the total variance x (n - 1)); a tensor, so
        # that an update never waits for the device
        self.spread: torch.Tensor | float = 0.0
        self.done = False  # the components its layers use have settled: no more updates
        self._pending: list[torch.Tensor] = []  # rows held back until there are k of them
        self._generator: torch.Generator | None = None

    def update(self, rows: torch.Tensor) -> None:
        rows = rows.detach().float()
        if self.components is None:
            self._pending.append(rows)
            if sum(r.shape[0] for r in self._pending) < self.k:
                return
            rows, self._pending = torch.cat(self._pending), []
        m = rows.shape[0]
        batch_mean = rows.mean(0)
        centred = rows - batch_mean
        if self.components is None:
            stacked = centred
            self.mean, shift = batch_mean, 0.0
        else:
            # the kept components stand for the rows seen so far; one row carries the shift between the means
            gap = self.mean - batch_mean
            weight = (self.n * m / (self.n + m)) ** 0.5
            stacked = torch.cat([self.singular[:, None] * self.components, centred, weight * gap[None]])
            self.mean = self.mean + (batch_mean - self.mean) * (m / (self.n + m))
            shift = weight * weight * gap.square().sum()
        self.spread = self.spread + centred.square().sum() + shift
        self.n += m
        kept = 2 * self.k + 8
        if self._generator is None:  # its own seeded one: the result does not depend on, nor change, the global RNG
            self._generator = torch.Generator(device=rows.device).manual_seed(0)
        s, vh = _leading_svd(stacked, kept, self.components, self._generator)
        vh = vh[:kept]
        # a fixed sign per component (its largest entry positive), so that successive estimates compare
        signs = vh.gather(1, vh.abs().argmax(1, keepdim=True)).sign()
        self.components, self.singular = vh * signs, s[:kept]

    @property
    def ready(self) -> bool:
        return self.components is not None

    def variance_ratio(self) -> torch.Tensor:
        """Each component's share of the total variance."""
        return self.singular.square() / torch.as_tensor(self.spread).clamp_min(1e-30)


def _leading_svd(m: torch.Tensor, q: int, previous: torch.Tensor | None,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The leading ``q`` singular values and right vectors of ``m``. Exact where that is cheap; else a
    randomized range finder (Halko et al., 2011) started from the previous components, which are close to the
    new ones, plus 8 random directions, with two power iterations: six products of ``m`` with ``q + 8`` columns
    in place of a full SVD, whose cost grows with ``min(m.shape)`` instead of ``q`` and dominated the time of
    reading a batch."""
    if min(m.shape) <= 3 * q:
        _, s, vh = torch.linalg.svd(m, full_matrices=False)
        return s, vh
    extra = torch.randn(m.shape[1], q + 8 - (0 if previous is None else previous.shape[0]), device=m.device,
                        dtype=m.dtype, generator=generator)
    start = extra if previous is None else torch.cat([previous.T, extra], 1)
    y = m @ start
    for _ in range(2):
        y = m @ (m.T @ torch.linalg.qr(y)[0])
    basis = torch.linalg.qr(y)[0]
    _, s, vh = torch.linalg.svd(basis.T @ m, full_matrices=False)
    return s, vh


def allocate_ranks(ratios: Mapping[str, torch.Tensor], caps: Mapping[str, int], budget: int) -> dict[str, int]:
    """The ``budget`` components with the largest variance ratios over all layers, at most ``caps[layer]`` from a
    layer: layer -> how many it gets (0 for none). One read of the ratios from the device."""
    names = list(ratios)
    parts = [ratios[n][: caps[n]].float() for n in names]
    flat = torch.cat(parts).cpu()  # the one transfer (a transfer per layer would wait for the device each time)
    layer_of = torch.repeat_interleave(torch.arange(len(names)), torch.tensor([len(p) for p in parts]))
    chosen = layer_of[torch.argsort(flat, descending=True, stable=True)[:budget]]
    counts = torch.bincount(chosen, minlength=len(names)).tolist()
    return dict(zip(names, counts))


def attach_eva(
    model: nn.Module,
    config: LoraConfig,
    batches: Iterable,
    name: str = "default",
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    activate: bool = True,
    trainable: bool = True,
) -> nn.Module:
    """Attach adapter ``name`` with EVA's initialisation, computed on ``batches``.

    A batch is a mapping of model inputs (``input_ids``, ``attention_mask``, ``labels``, ...), run as
    ``model(**batch)``, or anything else, run as ``model(batch)``; ``forward(model, batch)`` replaces either.
    Positions where ``attention_mask`` is 0, or (``use_label_mask``) ``labels`` equals ``label_mask_value``,
    are left out. Tensors in a mapping are moved to the model's device. Returns ``model``, whose adapter config
    then has ``init_lora_weights="eva"``, the layers that got a rank as ``target_modules`` and their ranks (and,
    with ``adjust_scaling_factors``, alphas keeping each layer's scale) in ``rank_pattern`` / ``alpha_pattern``.
    """
    options = eva_options(config)
    if config.target_parameters or config.trainable_token_indices or config.use_dora or config.layer_replication:
        raise ValueError("EVA initialises LoRA on linear layers of the model as it is; target_parameters, "
                         "trainable_token_indices, DoRA and layer_replication are not supported with it")
    targets = resolve_targets(model, config)
    others = [t for t in targets if layer_kind(model.get_submodule(t)) != "linear"]
    if others:
        raise ValueError(f"EVA initialises linear layers; {others[0]!r} is a "
                         f"{type(model.get_submodule(others[0])).__name__}: exclude it (exclude_modules)")
    ranks = {t: config.rank_for(t) for t in targets}
    caps = {t: round(r * options["rho"]) for t, r in ranks.items()}
    budget = sum(ranks.values())
    pcas, owner = _principal_components(model, targets, caps, budget, batches, forward, options)
    counts = allocate_ranks(_shares(pcas, owner, targets), caps, budget)

    kept = [t for t in targets if counts[t] > 0]
    rank_pattern = {t: counts[t] for t in kept if counts[t] != config.r}
    alpha_pattern = {}
    if options["adjust_scaling_factors"]:
        for t in kept:
            alpha = config.alpha_for(t) * counts[t] / ranks[t]
            if alpha != config.lora_alpha:
                alpha_pattern[t] = alpha
    final = dataclasses.replace(config, init_lora_weights="eva", eva_config=options, target_modules=kept,
                                rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, layers_to_transform=None,
                                layers_pattern=None, exclude_modules=None)
    attach(model, final, name, activate=activate, trainable=trainable, initialize=False)
    with torch.no_grad():
        for t in kept:
            pca, layer = pcas[owner[t]], model.get_submodule(t)
            a = pca.components[: counts[t]]
            if options["whiten"]:
                a = a / pca.singular[: counts[t]].sqrt()[:, None]
            layer.lora_A[name].copy_(a)
            layer.lora_B[name].zero_()
    return model


def _principal_components(model: nn.Module, targets: list[str], caps: dict[str, int], budget: int,
                          batches: Iterable, forward: Callable | None, options: dict
                          ) -> tuple[dict[str, IncrementalPCA], dict[str, str]]:
    """Run the batches through the model with hooks on the targets' inputs: (PCA per distinct input, by the name
    of the first layer that receives it; that name for every target)."""
    owner: dict[str, str] = {}
    pcas: dict[str, IncrementalPCA] = {}
    # stop_at: the owner after whose input nothing more is read this batch: the forward stops there
    state: dict[str, Any] = {"mask": None, "seen": {}, "grouping": True, "stop_at": None}
    order: list[str] = []  # the distinct inputs' owners in the order the forward reaches them

    def hook_for(target: str):
        def hook(module, args):
            x = args[0]
            if state["grouping"]:
                # the same tensor into several layers (q, k, v): one PCA for them all, with the largest cap. Its
                # address alone could be a freed tensor's reused, so its values' summary is part of the key.
                summary = torch.stack([x.float().sum(), x.float().square().sum(), x.float().abs().amax()])
                key = (x.data_ptr(), tuple(x.shape), x.dtype, tuple(summary.tolist()))
                first = state["seen"].setdefault(key, target)
                owner[target] = first
                if first not in pcas:
                    pcas[first] = IncrementalPCA(0)
                    order.append(first)
                pcas[first].k = min(max(pcas[first].k, caps[target]), x.shape[-1])
                return
            if owner[target] != target or pcas[target].done:
                return
            mask = state["mask"]
            if mask is not None and tuple(x.shape[:mask.dim()]) == tuple(mask.shape):
                rows = x[mask]
            else:
                rows = x.reshape(-1, x.shape[-1])
            pcas[target].update(rows)
            if target == state["stop_at"]:
                raise _Enough
        return hook

    previous: dict[str, torch.Tensor] = {}
    settled: set[str] = set()
    with inputs_hooked(model, {t: hook_for(t) for t in targets}) as device:
        for batch in batches:
            mask = _positions(batch, options)
            state["mask"] = None if mask is None else mask.to(device)
            if state["grouping"]:
                # a first pass finds which layers share an input (and so each PCA's size), a second one reads
                _run(model, batch, forward, device)
                missing = [t for t in targets if t not in owner]
                if missing:
                    raise ValueError(f"EVA: the forward never ran {missing[0]!r}; check forward and the batches")
                state["grouping"] = False
            # the rest of the model (the layers after the last input still read, the head, the loss) need not
            # run; a forward of the caller's own may catch exceptions, so it runs whole
            waiting = [o for o in order if not pcas[o].done]
            state["stop_at"] = waiting[-1] if waiting and forward is None else None
            _run(model, batch, forward, device)
            if not all(p.ready for p in pcas.values()):
                continue
            settled = _settled(pcas, owner, caps, budget, previous, options["tau"])
            if len(settled) == len(pcas):
                break
    if not owner:
        raise ValueError("EVA: batches is empty; it needs data to run the model on")
    unready = [o for o, p in pcas.items() if not p.ready]
    if unready:
        raise ValueError(f"EVA: {unready[0]!r} saw fewer input rows than the {pcas[unready[0]].k} components it needs; "
                         "give more (or longer) batches")
    if len(settled) < len(pcas):
        warnings.warn(f"EVA: the batches ran out before the components of {sorted(set(pcas) - settled)[:3]} settled "
                      f"(tau={options['tau']}); they are the principal components of the data seen", stacklevel=3)
    return pcas, owner


@contextlib.contextmanager
def inputs_hooked(model: nn.Module, hooks: Mapping[str, Callable]):
    """``hooks[name]`` as a forward pre-hook of submodule ``name`` (it sees the module's inputs), with the model in
    eval mode and no gradients, for the block; yields the device of the model's parameters."""
    handles = [model.get_submodule(name).register_forward_pre_hook(hook) for name, hook in hooks.items()]
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield next((p.device for p in model.parameters()), None)
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)


class _Enough(Exception):
    """Raised by the hook of the last input a batch still has to give: the rest of the forward is not needed."""


def _run(model: nn.Module, batch: Any, forward: Callable | None, device: torch.device | None) -> None:
    if forward is not None:
        forward(model, batch)
        return
    try:
        if isinstance(batch, Mapping):
            model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        else:
            model(batch.to(device) if isinstance(batch, torch.Tensor) else batch)
    except _Enough:
        pass


def _shares(pcas: dict[str, IncrementalPCA], owner: dict[str, str], targets: list[str]) -> dict[str, torch.Tensor]:
    """Each target's components' shares of its input's variance (in ``targets``' order), computed once per
    distinct input."""
    ratio = {o: pca.variance_ratio() for o, pca in pcas.items()}
    return {t: ratio[owner[t]] for t in targets}


def _settled(pcas: dict[str, IncrementalPCA], owner: dict[str, str], caps: dict[str, int], budget: int,
             previous: dict[str, torch.Tensor], tau: float) -> set[str]:
    """The distinct inputs whose components the current rank allocation uses changed by less than ``tau``
    (cosine similarity) since the last batch; they are not updated any more."""
    targets = list(caps)
    counts = allocate_ranks(_shares(pcas, owner, targets), caps, budget)
    needed = dict.fromkeys(pcas, 0)
    for t in targets:
        needed[owner[t]] = max(needed[owner[t]], counts[t])
    checks, agreed = {}, set()
    for o, pca in pcas.items():
        k, old = needed[o], previous.get(o)
        previous[o] = pca.components.clone()
        if pca.done or old is None:
            continue
        if k == 0:
            agreed.add(o)
        else:
            checks[o] = ((old[:k] * pca.components[:k]).sum(1).abs() >= tau).all()
    if checks:  # one read from the device for all of them
        agreed.update(o for o, ok in zip(checks, torch.stack(list(checks.values())).tolist()) if ok)
    for o in agreed:
        pcas[o].done = True
    return {o for o, pca in pcas.items() if pca.done}


def _positions(batch: Any, options: dict) -> torch.Tensor | None:
    """Which token positions of a batch count: not padding, and (use_label_mask) not masked out of the loss."""
    if not isinstance(batch, Mapping):
        return None
    mask = batch.get("attention_mask")
    mask = None if mask is None else mask.bool()
    labels = batch.get("labels")
    # per-token labels of the same positions (not a classifier's, nor a seq2seq decoder's, whose are others)
    if options["use_label_mask"] and isinstance(labels, torch.Tensor) and labels.dim() == 2 and (
            mask is None or labels.shape == mask.shape):
        keep = labels != options["label_mask_value"]
        mask = keep if mask is None else mask & keep.to(mask.device)
    return mask
