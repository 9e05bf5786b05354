"""Many adapters in one batch: every row of the batch picks its own adapter (or the base model).

    with lorafit.adapter_per_row(model, ["sst2", "imdb", None, "sst2"]):
        logits = model(**batch)              # row i runs with adapter rows[i]; None is the base model
        out = model.generate(**prompts)      # works for decoding too: each sequence keeps its adapter

How. A layer's adapters i = 1..n (A_i: r_i x d_in, B_i: d_out x r_i, scale s_i) are
kept stacked, zero-padded to r = max r_i, with slot 0 a zero adapter for rows on
the base model and the scale folded into B:

    SA: (n+1, r, d_in) = [0, A_1, ..., A_n]          SB: (n+1, r, d_out) = [0, s_1 B_1^T, ...]

For rows k with adapter slots a_k, a linear layer computes

    y = base(x) + bmm(bmm(x, SA[a]^T), SB[a])        x: (N, T, d_in)

one gather and two batched matmuls, however many adapters the batch mixes; the
zero padding and the zero slot add nothing to the result. Embeddings gather
``SA[a_k][ids]`` instead of the first matmul; convolutions run ``A`` as one
grouped convolution (a group per row) and ``B`` as a batched matmul;
``modules_to_save`` copies that are ``nn.Linear`` / ``nn.Embedding`` are
stacked the same way (other modules run once per distinct copy, on their rows).

The stacks are cached on each layer and rebuilt when the layer's adapters are
added, removed or changed (a tensor's in-place version counter moves). The
check happens once when the block is entered, not in forward, so decoding
inside ``generate`` pays nothing per step. Inside the block the factors are
used as constants: it is an inference path (no dropout, no gradients for the
adapters). Adapters merged into the weights and DoRA adapters are refused.
One ``adapter_per_row`` block at a time per model (serve uses a lock).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from lorafit.layers import Conv, Embedding, Linear, LoraLayer, ModulesToSave
from lorafit.layers.fused_linear import lora_linear_infer
from lorafit.model import adapter_configs, lora_layers, saved_modules

_STACKS = "_lorafit_row_stacks"
# A stacked modules_to_save Linear gathers one weight per row; above this many
# elements (rows x d_out x d_in) running each distinct copy on its rows is cheaper.
GATHER_LIMIT = 1 << 22


@contextlib.contextmanager
def adapter_per_row(model: nn.Module, rows: Sequence[str | None]):
    """Inside the block, row ``k`` of every batch uses adapter ``rows[k]`` (``None``: the base model).

    The first dimension of each adapted layer's input must be ``len(rows)``
    (true for transformers models, including ``generate`` without beam search).
    """
    rows = list(rows)
    if not rows:
        raise ValueError("adapter_per_row needs at least one row")
    known = adapter_configs(model)
    unknown = sorted({r for r in rows if r is not None and r not in known})
    if unknown:
        raise KeyError(f"no adapter named {unknown[0]!r} is attached; attached adapters: {list(known) or 'none'}")
    layers = [m for _, m in lora_layers(model)]
    wrappers = [m for _, m in saved_modules(model)]
    for layer in layers:
        if layer.merged:
            raise ValueError(f"adapters {layer.merged} are merged into the weights; unmerge them before "
                             "running a batch with an adapter per row")
        if layer.row_plan is not None:
            raise RuntimeError("adapter_per_row is already active on this model (one block at a time)")
    plans = [_plan_layer(layer, rows) for layer in layers] + [_plan_saved(w, rows) for w in wrappers]
    try:
        for module, plan in zip(layers + wrappers, plans):
            module.row_plan = plan
        yield model
    finally:
        for module in layers + wrappers:
            module.row_plan = None


def clear_stacks(model: nn.Module) -> None:
    """Free the cached stacks (they are rebuilt on the next ``adapter_per_row``)."""
    for module in model.modules():
        module.__dict__.pop(_STACKS, None)


# -- stacks ------------------------------------------------------------------------
def _key(tensors: list[torch.Tensor], extra) -> tuple:
    return (extra, tuple((id(t), t._version, t.dtype, t.device) for t in tensors))


def _cached(module: nn.Module, key: tuple, build):
    cached = module.__dict__.get(_STACKS)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        value = build()
    module.__dict__[_STACKS] = (key, value)
    return value


def _layer_stacks(layer: LoraLayer):
    """(slot of each adapter name, SA, SB) for a LoRA layer, cached."""
    names = layer.adapter_names
    dora = [n for n in names if n in getattr(layer, "lora_magnitude_vector", {})]
    if dora:
        raise ValueError(f"DoRA adapters {dora} are not supported in a batch with an adapter per row")
    factors = [t for n in names for t in (layer.factors_a[n], layer.factors_b[n])]
    key = _key(factors, tuple((n, layer.scaling[n]) for n in names))
    return _cached(layer, key, lambda: _build_layer_stacks(layer, names))


def _build_layer_stacks(layer: LoraLayer, names: list[str]):
    r = max(layer.rank[n] for n in names)
    dtype = layer.factors_a[names[0]].dtype
    for n in names:
        dtype = torch.promote_types(dtype, layer.factors_a[n].dtype)
    a0, b0 = layer.factors_a[names[0]], layer.factors_b[names[0]]
    device = a0.device
    slots = {n: i + 1 for i, n in enumerate(names)}
    if isinstance(layer, Embedding):
        num, dim = a0.shape[1], b0.shape[0]
        sa = torch.zeros(len(names) + 1, num, r, dtype=dtype, device=device)  # lookup tables A^T
        sb = torch.zeros(len(names) + 1, r, dim, dtype=dtype, device=device)
    elif isinstance(layer, Conv):
        sa = torch.zeros(len(names) + 1, r, *a0.shape[1:], dtype=dtype, device=device)  # conv weights
        sb = torch.zeros(len(names) + 1, b0.shape[0], r, dtype=dtype, device=device)  # pointwise, (d_out, r)
    else:  # A kept (r, d_in): MKL runs bmm(x, A^T) about 2x faster from this layout than from A^T stored
        sa = torch.zeros(len(names) + 1, r, a0.shape[1], dtype=dtype, device=device)
        sb = torch.zeros(len(names) + 1, r, b0.shape[0], dtype=dtype, device=device)
    for n, i in slots.items():
        a, b, k, s = layer.factors_a[n].detach(), layer.factors_b[n].detach(), layer.rank[n], layer.scaling[n]
        if isinstance(layer, Embedding):
            sa[i, :, :k] = a.T
            sb[i, :k] = b.T * s
        elif isinstance(layer, Conv):
            sa[i, :k] = a
            sb[i, :, :k] = b.flatten(1) * s
        else:
            sa[i, :k] = a
            sb[i, :k] = b.T * s
    return slots, sa, sb


def _gather(stack: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``stack[idx]``. torch.stack of views is a plain copy per row; index_select on dim 0 of a
    small stack is measured ~40x slower on this CPU (it splits the copy across threads)."""
    return torch.stack([stack[i] for i in idx.tolist()])


def _slots(slot_of: dict[str, int], rows: list[str | None], device) -> torch.Tensor:
    return torch.tensor([slot_of.get(r, 0) if r is not None else 0 for r in rows], dtype=torch.long, device=device)


# -- LoRA layers -------------------------------------------------------------------
def _plan_layer(layer: LoraLayer, rows: list[str | None]):
    base = layer.base_layer
    if layer.disabled or not layer.adapter_names or all(r not in layer.adapter_names for r in rows):
        return lambda x, *args, **kwargs: base(x, *args, **kwargs)
    if isinstance(layer, Linear) and len(set(rows)) == 1:
        return _uniform_linear(layer, rows[0])
    slot_of, sa, sb = _layer_stacks(layer)
    idx = _slots(slot_of, rows, sa.device)
    n = len(rows)
    # gathered once per block, reused by every forward inside it
    a_rows, b_rows = _gather(sa, idx), _gather(sb, idx)

    def check(x):
        if x.shape[0] != n:
            raise ValueError(f"adapter_per_row was given {n} rows but a layer got a batch of {x.shape[0]} "
                             "(beam search and other batch expansions are not supported)")

    if isinstance(layer, Embedding):
        def forward(ids, *args, **kwargs):
            check(ids)
            y = base(ids, *args, **kwargs)
            h = a_rows[torch.arange(n, device=ids.device)[:, None], ids.reshape(n, -1)]  # (n, T, r)
            return _accumulate(y, h, b_rows)
    elif isinstance(layer, Conv):
        conv = F.conv1d if isinstance(base, nn.Conv1d) else F.conv2d
        a_grouped = a_rows.flatten(0, 1)  # (n r, C_in, *k): one group per row
        if base.padding_mode != "zeros":
            pad, padding = base._reversed_padding_repeated_twice, 0
        else:
            pad, padding = None, base.padding

        def forward(x, *args, **kwargs):
            check(x)
            y = base(x, *args, **kwargs)
            xa = x.to(a_grouped.dtype)
            if pad is not None:
                xa = F.pad(xa, pad, mode=base.padding_mode)
            h = conv(xa.reshape(1, -1, *xa.shape[2:]), a_grouped, None, base.stride, padding, base.dilation, n)
            delta = torch.bmm(b_rows, h.reshape(n, a_rows.shape[1], -1))  # (n, d_out, positions)
            return y + delta.view(y.shape).to(y.dtype)
    else:
        def forward(x, *args, **kwargs):
            check(x)
            y = base(x, *args, **kwargs)
            h = torch.bmm(x.reshape(n, -1, x.shape[-1]).to(a_rows.dtype), a_rows.mT)  # (n, T, r)
            return _accumulate(y, h, b_rows)
    return forward


def _accumulate(y: torch.Tensor, h: torch.Tensor, b_rows: torch.Tensor) -> torch.Tensor:
    """y + bmm(h, b_rows), in place into the fresh base output when nothing needs its graph."""
    n = h.shape[0]
    if y.dtype == b_rows.dtype and y.is_contiguous() and not torch.is_grad_enabled():
        y.view(n, -1, y.shape[-1]).baddbmm_(h, b_rows)
        return y
    return y + torch.bmm(h, b_rows).view(y.shape).to(y.dtype)


def _uniform_linear(layer: Linear, name: str):
    """Every row on the same adapter: the ordinary single-adapter path (it folds when that is cheaper)."""
    if layer.lora_magnitude_vector and name in layer.lora_magnitude_vector:
        raise ValueError(f"DoRA adapter {name!r} is not supported in a batch with an adapter per row")
    a, b, s = layer.factors_a[name].detach(), layer.factors_b[name].detach(), layer.scaling[name]
    base = layer.base_layer

    def forward(x, *args, **kwargs):
        if not args and not kwargs and layer._fusable():
            return lora_linear_infer(x, base.weight, base.bias, layer.fan_in_fan_out, [(a, b, s, 0.0)])
        y = base(x, *args, **kwargs)
        h = F.linear(x.to(a.dtype), a)
        return y + (F.linear(h, b) * s).to(y.dtype)
    return forward


# -- modules_to_save ---------------------------------------------------------------
def _plan_saved(wrapper: ModulesToSave, rows: list[str | None]):
    copies = [wrapper.original_module] + [wrapper.modules_to_save[n] for n in wrapper.adapter_names]
    slot_of = {n: i + 1 for i, n in enumerate(wrapper.adapter_names)}
    slots = [0 if wrapper.disabled or r is None else slot_of.get(r, 0) for r in rows]
    n = len(rows)
    if len(set(slots)) == 1:
        module = copies[slots[0]]
        return lambda *args, **kwargs: module(*args, **kwargs)
    shapes = {param_shapes(copies[slot]) for slot in set(slots)}
    if len(shapes) > 1:  # e.g. a 2-class and a 4-class head: their outputs cannot share one batch tensor
        names = sorted({r for r in rows if r is not None and r in wrapper.adapter_names})
        raise ValueError(f"adapters {names} have modules_to_save copies of different shapes for the same module "
                         f"({', '.join(str(list(s)) for s in sorted(shapes))}); run rows of these adapters in "
                         "separate batches")
    plain = {type(c) for c in copies}
    same_shapes = len({param_shapes(c) for c in copies}) == 1
    if plain == {nn.Linear} and same_shapes and n * copies[0].weight.numel() <= GATHER_LIMIT:
        params = [p for c in copies for p in (c.weight, c.bias) if p is not None]
        w, bias = _cached(wrapper, _key(params, "linear"), lambda: (
            torch.stack([c.weight.detach().T for c in copies]),
            torch.stack([c.bias.detach() for c in copies]) if copies[0].bias is not None else None))
        idx = torch.tensor(slots, device=w.device)
        w_rows = _gather(w, idx)  # (n, d_in, d_out)
        b_rows = _gather(bias, idx)[:, None, :] if bias is not None else None

        def forward(x):
            _check_rows(x, n)
            h = x.reshape(n, -1, x.shape[-1]).to(w_rows.dtype)
            y = torch.baddbmm(b_rows, h, w_rows) if b_rows is not None else torch.bmm(h, w_rows)
            return y.view(*x.shape[:-1], y.shape[-1]).to(x.dtype)
        return forward
    if plain == {nn.Embedding} and same_shapes and all(c.max_norm is None for c in copies):
        tables = _cached(wrapper, _key([c.weight for c in copies], "embedding"),
                         lambda: torch.stack([c.weight.detach() for c in copies]))
        idx = torch.tensor(slots, device=tables.device)

        def forward(ids):
            _check_rows(ids, n)
            return tables[idx.view(n, *([1] * (ids.dim() - 1))), ids]
        return forward

    # Any other module: run each distinct copy once, on its rows (rows sorted into segments).
    groups = {}
    for row, slot in enumerate(slots):
        groups.setdefault(slot, []).append(row)
    segments = [(copies[slot], torch.tensor(idx)) for slot, idx in groups.items()]

    def forward(*args, **kwargs):
        out = None
        for module, idx in segments:
            part = module(*_take(args, idx, n), **_take(kwargs, idx, n))
            if out is None:
                out = part.new_empty((n, *part.shape[1:]))
            out[idx.to(out.device)] = part
        return out
    return forward


def param_shapes(module: nn.Module) -> tuple:
    """The shapes of a module's parameters: copies with equal shapes can share a batch."""
    return tuple(tuple(p.shape) for p in module.parameters())


def _check_rows(x: torch.Tensor, n: int) -> None:
    if x.shape[0] != n:
        raise ValueError(f"adapter_per_row was given {n} rows but a module got a batch of {x.shape[0]}")


def _take(value, idx: torch.Tensor, n: int):
    """The rows ``idx`` of every batch-shaped tensor in ``value`` (tuples, lists, dicts)."""
    if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == n:
        return value[idx.to(value.device)]
    if isinstance(value, dict):
        return {k: _take(v, idx, n) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_take(v, idx, n) for v in value)
    return value
