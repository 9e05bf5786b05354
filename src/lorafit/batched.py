"""Many adapters in one batch: every row of the batch picks its own adapter (or the base model).

    with lorafit.adapter_per_row(model, ["sst2", "imdb", None, "sst2"]):
        logits = model(**batch)              # row i runs with adapter rows[i]; None is the base model
        out = model.generate(**prompts)      # works for decoding too: each sequence keeps its adapter

How. A layer's adapters i = 1..n (A_i: r_i x d_in, B_i: d_out x r_i, scale s_i) are
kept stacked, zero-padded to r = max r_i, with slot 0 a zero adapter for rows on
the base model and the scale folded into B (SA and SB side by side in one tensor):

    SA: (n+1, r, d_in) = [0, A_1, ..., A_n]          SB: (n+1, r, d_out) = [0, s_1 B_1^T, ...]

For rows k with adapter slots a_k, a linear layer computes

    y = base(x) + bmm(bmm(x, SA[a]^T), SB[a])        x: (N, T, d_in)

one gather and two batched matmuls, however many adapters the batch mixes; the
zero padding and the zero slot add nothing to the result. Embeddings gather
``SA[a_k][ids]`` instead of the first matmul; convolutions run ``A`` as one
grouped convolution (a group per row) and ``B`` as a batched matmul;
``modules_to_save`` copies that are ``nn.Linear`` / ``nn.Embedding`` are
stacked the same way (other modules run once per distinct copy, on their rows).

The stacks are cached on each layer and updated when the layer's adapters are
added, removed, replaced or changed (a tensor's version counter or storage moves):
only the slots of added or changed adapters are written, a removed one's slot is
reused, so a server loading adapters under traffic does not copy them all again.
A layer checks its stacks and gathers its rows' factors once per block, in its
first forward, so decoding inside ``generate`` pays nothing per step, and on a GPU
this CPU work overlaps the device's work on the layers before (done on entering
the block, the device would sit idle through all of it). Nothing waits for the
device: each distinct row -> slot index is built once per block on the CPU and
copied over asynchronously (layers whose adapters map to the same slots share it),
a gather on a GPU is one ``index_select``, and no forward reads a tensor back to
the host. Inside the block the factors are used as constants: it is an inference
path (no dropout, no gradients for the adapters). Adapters with a bias of their own
(lora_bias) add it per row, gathered from a stack of their own. A DoRA adapter's rows
scale the layer's output (bias aside) by its factor m / ||W + s B A|| per feature,
gathered from a stack of those factors (1 for every other slot), computed once per
change of the adapters rather than in every forward. Adapters merged into the weights
are refused. One ``adapter_per_row`` block at a time per model (serve uses a lock).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter

import torch
from torch import nn
from torch.nn import functional as F

from lorafit.layers import (Conv, Embedding, Linear, LoraLayer, ModulesToSave, MultiheadAttentionLora, ParameterLora,
                            TiedLoraHead, TiedTokens, TrainableTokens)
from lorafit.kernels.linear import LowRank, lora_linear
from lorafit.layers import dora
from lorafit.layers.base import grouped_pointwise
from lorafit.layers.conv import conv_function
from lorafit.layers.embedding import embed_scale
from lorafit.model import adapter_configs, wrapped_modules

_STACKS = "_lorafit_row_stacks"
_BIAS_STACK = "_lorafit_row_bias_stack"
_DORA_STACK = "_lorafit_row_dora_stack"
_TOKEN_STACK = "_lorafit_row_token_stack"
_version = attrgetter("_version")
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
    kasa = [n for n, c in known.items() if c.kasa_config is not None]
    if kasa:  # the only adapter on its model, whose base it truncated: no other row could run on the original
        raise ValueError(f"adapter {kasa[0]!r} is a KaSA adapter (kasa_config), which truncated the base weights; "
                         "adapter_per_row does not run it")
    layers, wrappers, token_layers, tied_heads = [], [], [], []
    for _, module in wrapped_modules(model):  # one walk over the model for every kind
        if isinstance(module, (TrainableTokens, TiedTokens)):
            token_layers.append(module)
        elif isinstance(module, TiedLoraHead):
            tied_heads.append(module)
        else:
            (layers if isinstance(module, LoraLayer) else wrappers).append(module)
    for layer in token_layers:
        tokens = layer if isinstance(layer, TrainableTokens) else layer.tokens
        if tokens.merged:
            raise ValueError(f"adapters {tokens.merged} are merged into the weights; unmerge them before "
                             "running a batch with an adapter per row")
    for layer in layers:
        if layer.merged:
            raise ValueError(f"adapters {layer.merged} are merged into the weights; unmerge them before "
                             "running a batch with an adapter per row")
        if layer.row_plan is not None:
            raise RuntimeError("adapter_per_row is already active on this model (one block at a time)")
    index = {}  # (values, device) -> index tensor, shared by all layers of this block
    distinct = set(rows)
    plans = ([_plan_layer(layer, rows, distinct, index) for layer in layers]
             + [_plan_saved(w, rows, index) for w in wrappers] + [_plan_tokens(t, rows, index) for t in token_layers]
             + [_plan_tied_head(head, rows, distinct, index) for head in tied_heads])
    planned = layers + wrappers + token_layers + tied_heads
    # Set in the instances' __dict__, over the class attribute None: nn.Module.__setattr__ would first look
    # for a parameter, buffer or module of that name, for every layer on entering and on leaving each block.
    try:
        for module, plan in zip(planned, plans):
            module.__dict__["row_plan"] = plan
        yield model
    finally:
        for module in planned:
            module.__dict__.pop("row_plan", None)


def clear_stacks(model: nn.Module) -> None:
    """Free the cached stacks (they are rebuilt on the next ``adapter_per_row``)."""
    for module in model.modules():
        module.__dict__.pop(_STACKS, None)
        module.__dict__.pop(_BIAS_STACK, None)
        module.__dict__.pop(_DORA_STACK, None)
        module.__dict__.pop(_TOKEN_STACK, None)


# -- stacks ------------------------------------------------------------------------
def _key(tensors: list[torch.Tensor], extra) -> tuple:
    """What changes when a tensor is replaced (id), changed in place (version), or moved to another
    dtype or device (its storage). Built with map: it runs for every factor in every block."""
    return (extra, tuple(map(id, tensors)), tuple(map(_version, tensors)), tuple(map(torch.Tensor.data_ptr, tensors)))


def _cached(module: nn.Module, key: tuple, build):
    cached = module.__dict__.get(_STACKS)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        value = build()
    module.__dict__[_STACKS] = (key, value)
    return value


@dataclass
class _LayerStacks:
    """A LoRA layer's stacked factors, with what each slot was built from: a change of the layer's
    adapters rewrites only the slots of the adapters added or changed (a server that loads and
    unloads adapters under traffic would otherwise copy every adapter of every layer each time)."""

    key: tuple  # of all factors, as ``_key``: equal means nothing to do
    slots: dict[str, int]
    parts: dict[str, tuple]  # name -> what its slot holds (factors' id, version, storage; scale)
    stack: torch.Tensor  # (capacity + 1, |A| + |B|); free slots hold stale rows no row maps to
    shapes: tuple


def _layer_stacks(layer: LoraLayer, names: list[str]):
    """(slot of each adapter name, SA and SB side by side, their shapes) for a LoRA layer, cached."""
    # Every layer is checked in every block: read the ParameterDicts' own dicts (by name, in
    # insertion order), since their [] costs about a microsecond per factor.
    factors = [*layer.factors_a._parameters.values(), *layer.factors_b._parameters.values()]
    key = _key(factors, tuple(layer.scaling.items()))
    cached = layer.__dict__.get(_STACKS)
    if cached is None or cached.key != key:
        with torch.no_grad():
            cached = _update_layer_stacks(layer, names, cached, key)
        layer.__dict__[_STACKS] = cached
    return cached.slots, cached.stack, cached.shapes


def _update_layer_stacks(layer: LoraLayer, names: list[str], old: _LayerStacks | None, key: tuple) -> _LayerStacks:
    r = max(layer.rank[n] for n in names)
    dtype = layer.factors_a[names[0]].dtype
    for n in names:
        dtype = torch.promote_types(dtype, layer.factors_a[n].dtype)
    a0, b0 = layer.factors_a[names[0]], layer.factors_b[names[0]]
    if isinstance(layer, Embedding):
        shapes = (a0.shape[1], r), (r, b0.shape[0])  # lookup tables A^T
    elif isinstance(layer, Conv):
        shapes = (r, *a0.shape[1:]), (b0.shape[0], r)  # conv weights; pointwise B (d_out, r)
    else:  # A kept (r, d_in): MKL runs bmm(x, A^T) about 2x faster from this layout than from A^T stored
        shapes = (r, a0.shape[1]), (r, b0.shape[0])
    # what each adapter's slot must hold, from ``key`` (ids, versions, storages of all A, then all B)
    _, ids, versions, ptrs = key
    a_names, b_names = list(layer.factors_a._parameters), list(layer.factors_b._parameters)
    of = dict(zip(a_names, zip(ids, versions, ptrs)))
    of_b = dict(zip(b_names, zip(ids[len(a_names):], versions[len(a_names):], ptrs[len(a_names):])))
    parts = {n: (of[n], of_b[n], layer.scaling[n]) for n in names}
    # start afresh when the layout changes (another rank, dtype or device) or the stack is mostly free
    if (old is None or old.shapes != shapes or old.stack.dtype != dtype or old.stack.device != a0.device
            or old.stack.shape[0] > 4 * (len(names) + 1)):
        # SA and SB side by side in one tensor: one gather per layer fetches both
        stack = torch.zeros(2 * len(names) + 1, sum(math.prod(s) for s in shapes), dtype=dtype, device=a0.device)
        old = _LayerStacks(key, {}, {}, stack, shapes)
    slots = {n: i for n, i in old.slots.items() if n in parts}
    free = sorted(set(range(1, old.stack.shape[0])) - set(slots.values()), reverse=True)
    todo = [n for n in names if n not in slots or old.parts.get(n) != parts[n]]
    stack = old.stack
    if sum(n not in slots for n in todo) > len(free):  # grow by doubling: appends stay cheap on average
        stack = torch.zeros(2 * len(names) + 1, stack.shape[1], dtype=dtype, device=stack.device)
        stack[:old.stack.shape[0]] = old.stack
        free = sorted(set(range(1, stack.shape[0])) - set(slots.values()), reverse=True)
    sa, sb = _split(stack, shapes)
    for n in todo:
        i = slots[n] if n in slots else free.pop()
        slots[n] = i
        a, b, k, s = layer.factors_a[n].detach(), layer.factors_b[n].detach(), layer.rank[n], layer.scaling[n]
        stack[i].zero_()  # a reused slot may hold a higher-rank adapter's columns
        if isinstance(layer, Embedding):
            sa[i, :, :k] = a.T
            sb[i, :k] = b.T * s
        elif isinstance(layer, Conv):
            sa[i, :k] = a
            sb[i, :, :k] = grouped_pointwise(b, layer.b_groups) * s  # block-diagonal for a grouped convolution
        else:
            sa[i, :k] = a
            sb[i, :k] = b.T * s
    return _LayerStacks(key, slots, parts, stack, shapes)


def _split(stack: torch.Tensor, shapes) -> tuple[torch.Tensor, torch.Tensor]:
    """The (A, B) views of a stack whose rows hold A and B flattened, side by side."""
    a, b = stack.split([math.prod(s) for s in shapes], 1)
    return a.view(-1, *shapes[0]), b.view(-1, *shapes[1])


def _index(cache: dict, values: tuple, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """``values`` as a tensor on ``device``, built once per block: a tensor made from a list
    directly on a GPU is a synchronous host-to-device copy, and the layers would each pay one."""
    key = (values, device, dtype)
    if key not in cache:
        idx = torch.tensor(values, dtype=dtype)
        if device.type == "cuda":  # from pinned memory the copy is asynchronous
            idx = idx.pin_memory()
        cache[key] = idx.to(device, non_blocking=True)
    return cache[key]


def _gather(stack: torch.Tensor, slots: tuple[int, ...], index: dict) -> torch.Tensor:
    """``stack[slots]``. On a GPU one index_select kernel with the block's shared index. On a CPU
    torch.stack of views is a plain copy per row, while index_select on dim 0 of a small stack
    was measured ~40x slower (it splits the copy across threads)."""
    if stack.device.type == "cpu":
        return torch.stack([stack[i] for i in slots])
    return stack.index_select(0, _index(index, slots, stack.device))


# -- LoRA layers -------------------------------------------------------------------
def _plan_layer(layer: LoraLayer, rows: list[str | None], distinct: set, index: dict):
    base = layer.base_layer
    names = layer.adapter_names
    if layer.disabled or distinct.isdisjoint(names):
        return lambda x, *args, **kwargs: base(x, *args, **kwargs)
    if isinstance(layer, Linear) and len(distinct) == 1 and rows[0] not in layer.lora_magnitude_vector \
            and rows[0] not in layer.activation:
        return _uniform_linear(layer, rows[0])
    if isinstance(layer, ParameterLora):
        what = ("the weights of an nn.MultiheadAttention" if isinstance(layer, MultiheadAttentionLora)
                else f"{layer.parameter_name!r} (target_parameters)")
        raise ValueError(f"adapters {names} adapt {what}, which a batch with an adapter per row does not support")
    n = len(rows)
    gathered = []
    biased = not distinct.isdisjoint(layer.lora_B_bias.keys())  # adapters with a bias of their own (lora_bias)
    scaled = not distinct.isdisjoint(layer.lora_magnitude_vector.keys())  # DoRA adapters
    activated = sorted(distinct & set(layer.activation))  # aLoRA adapters (linear layers only)

    def rows_factors():
        """The rows' (A, B) and, where some row's adapter has one, their biases (n, d_out) and DoRA factors
        (n, features), gathered in the layer's first forward: on a GPU this CPU work then overlaps the device's
        work on the layers before (see the module docstring)."""
        if not gathered:
            slot_of, stack, shapes = _layer_stacks(layer, names)
            slots = tuple(slot_of.get(r, 0) for r in rows)  # None and names without an adapter here: slot 0
            gathered.extend(_split(_gather(stack, slots, index), shapes))
            gathered.append(_gather(_bias_stack(layer, slot_of, stack), slots, index) if biased else None)
            gathered.append(_gather(_dora_stack(layer, slot_of, stack), slots, index) if scaled else None)
        return gathered

    if isinstance(layer, Embedding):
        scale = embed_scale(base, layer.factors_a[names[0]])

        def forward(ids, *args, **kwargs):
            _check_rows(ids, n)
            y = base(ids, *args, **kwargs)
            a_rows, b_rows, _, f_rows = rows_factors()
            h = a_rows[torch.arange(n, device=ids.device)[:, None], ids.reshape(n, -1)]  # (n, T, r)
            if scale is not None:  # a scaled embedding's rows (Gemma, BART): the adapter's rows too
                h = h * scale.to(h.device, h.dtype)
            y = _accumulate(y, h, b_rows)
            return y if f_rows is None else _rescaled(y, f_rows, None)
    elif isinstance(layer, Conv):
        conv = conv_function(base)
        if base.padding_mode != "zeros":
            pad, padding = base._reversed_padding_repeated_twice, 0
        else:
            pad, padding = None, base.padding

        def forward(x, *args, **kwargs):
            _check_rows(x, n)
            y = base(x, *args, **kwargs)
            a_rows, b_rows, bias_rows, f_rows = rows_factors()
            a_grouped = a_rows.flatten(0, 1)  # (n r, C_in, *k): one group per row
            xa = x.to(a_grouped.dtype)
            if pad is not None:
                xa = F.pad(xa, pad, mode=base.padding_mode)
            h = conv(xa.reshape(1, -1, *xa.shape[2:]), a_grouped, None, base.stride, padding, base.dilation, n)
            delta = torch.bmm(b_rows, h.reshape(n, a_rows.shape[1], -1))  # (n, d_out, positions)
            if bias_rows is not None:
                delta = delta + bias_rows[:, :, None]
            y = y + delta.view(y.shape).to(y.dtype)
            return y if f_rows is None else _rescaled(y, f_rows, base.bias, conv=True)
    else:
        def forward(x, *args, **kwargs):
            _check_rows(x, n)
            a_rows, b_rows, bias_rows, f_rows = rows_factors()
            h = torch.bmm(x.reshape(n, -1, x.shape[-1]).to(a_rows.dtype), a_rows.mT)  # (n, T, r)
            if activated:
                h = h * _activation_mask(layer, activated, rows, index, x)[..., None].to(h.dtype)
            if f_rows is not None:  # DoRA rows: f (the base output and the low-rank sum) + (1 - f) the bias
                y = _accumulate(base(x, *args, **kwargs), h, b_rows)
                if bias_rows is not None:
                    y = (y.view(n, -1, y.shape[-1]) + bias_rows[:, None].to(y.dtype)).view(y.shape)
                return _rescaled(y, f_rows, base.bias)
            if not args and not kwargs and _sum_first(layer, x, b_rows):
                # the low-rank sum written first and x W^T added into it by the base GEMM, which reads it in
                # its epilogue: no read-modify-write pass over the output after the base product
                z = torch.bmm(h, b_rows) if bias_rows is None else torch.baddbmm(bias_rows[:, None], h, b_rows)
                w = base.weight
                z.view(-1, z.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), w if layer.fan_in_fan_out else w.T)
                return z.view(*x.shape[:-1], z.shape[-1])
            y = _accumulate(base(x, *args, **kwargs), h, b_rows)
            if bias_rows is None:
                return y
            return (y.view(n, -1, y.shape[-1]) + bias_rows[:, None].to(y.dtype)).view(y.shape)
    return forward


def _plan_tied_head(head: TiedLoraHead, rows: list[str | None], distinct: set, index: dict):
    """A tied output head (ensure_weight_tying) adds ``s (h B) A`` of its row's embedding adapter: from the
    embedding's own stacks, A^T (vocabulary, r) and s B^T (r, dim) per slot."""
    base, embedding = head.base_layer, head.embedding
    names = embedding.adapter_names
    if head.disabled or embedding.disabled or distinct.isdisjoint(names):
        return base
    n = len(rows)
    gathered = []

    def forward(h):
        _check_rows(h, n)
        if not gathered:  # in the first forward, as the LoRA layers gather theirs
            slot_of, stack, shapes = _layer_stacks(embedding, names)
            gathered.extend(_split(_gather(stack, tuple(slot_of.get(r, 0) for r in rows), index), shapes))
        tables, b_rows = gathered
        t = torch.bmm(h.reshape(n, -1, h.shape[-1]).to(b_rows.dtype), b_rows.mT)  # (n, T, r)
        return _accumulate(base(h), t, tables.mT)

    return forward


def _bias_stack(layer: LoraLayer, slot_of: dict[str, int], stack: torch.Tensor) -> torch.Tensor:
    """The adapters' own biases, scaled, in their factors' slots (zero for the rest): (slots, d_out), cached on
    the layer until a bias, a scale or the slots change."""
    biases = layer.lora_B_bias._parameters
    key = (_key(list(biases.values()), tuple(layer.scaling.items())), tuple(slot_of.items()), stack.shape[0],
           stack.dtype, stack.device)
    cached = layer.__dict__.get(_BIAS_STACK)
    if cached is None or cached[0] != key:
        out_features = next(iter(biases.values())).shape[0]
        with torch.no_grad():
            rows = torch.zeros(stack.shape[0], out_features, dtype=stack.dtype, device=stack.device)
            for name, bias in biases.items():
                if name in slot_of:
                    rows[slot_of[name]] = bias.detach() * layer.scaling[name]
        cached = (key, rows)
        layer.__dict__[_BIAS_STACK] = cached
    return cached[1]


def _activation_mask(layer: Linear, activated: list[str], rows: list[str | None], index: dict,
                     x: torch.Tensor) -> torch.Tensor:
    """(n, tokens): where each row's low-rank output applies. A row on an aLoRA adapter from its invocation on
    (the mask the model's pre-hook found for that adapter, in that row; nowhere without input ids), every other
    row everywhere. Which rows use an adapter is an index made once per block, copied without a sync."""
    keep = None
    for name in activated:
        uses = _index(index, tuple(r == name for r in rows), x.device, torch.bool)
        mask = layer.activation[name].mask(name, x.shape)
        if mask is None:
            mask = torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device)
        keep = torch.where(uses[:, None], mask, True if keep is None else keep)
    return keep


def _dora_stack(layer: LoraLayer, slot_of: dict[str, int], stack: torch.Tensor) -> torch.Tensor:
    """DoRA's factor m / ||W + s B A|| per feature in each DoRA adapter's slot, 1 in the others (plain adapters,
    the base model's slot 0): (slots, features), in float32, cached on the layer until a magnitude, a factor,
    a scale, the base weight or the slots change."""
    magnitudes = layer.lora_magnitude_vector._parameters
    tensors = [*magnitudes.values(), *layer.factors_a._parameters.values(), *layer.factors_b._parameters.values(),
               layer.target_source()]
    key = (_key(tensors, tuple(layer.scaling.items())), tuple(slot_of.items()), stack.shape[0], stack.device)
    cached = layer.__dict__.get(_DORA_STACK)
    if cached is None or cached[0] != key:
        features = next(iter(magnitudes.values())).numel()
        with torch.no_grad():
            rows = torch.ones(stack.shape[0], features, dtype=torch.float32, device=stack.device)
            for name, magnitude in magnitudes.items():
                if name in slot_of:
                    rows[slot_of[name]] = magnitude.detach().reshape(-1).float() / dora.adapted_norm(layer, name)
        cached = (key, rows)
        layer.__dict__[_DORA_STACK] = cached
    return cached[1]


def _rescaled(y: torch.Tensor, f_rows: torch.Tensor, bias: torch.Tensor | None, conv: bool = False) -> torch.Tensor:
    """DoRA per row: ``f (y - b) + b`` for the layer's output ``y`` (base output plus low-rank path, bias ``b``
    included), with ``f`` (n, features) 1 for rows whose adapter is not a DoRA one. The features are last in a
    linear layer's or an embedding's output, dimension 1 of a convolution's."""
    n = f_rows.shape[0]
    f = f_rows.to(y.dtype)
    if conv:
        f = f.view(*f.shape, *[1] * (y.dim() - 2))  # (n, C, 1, ...)
        b = None if bias is None else bias.to(y.dtype).view(-1, *[1] * (y.dim() - 2))
        out = y * f
    else:
        f = f[:, None, :]  # (n, 1, features)
        b = None if bias is None else bias.to(y.dtype)
        out = y.view(n, -1, y.shape[-1]) * f
    if b is not None:
        out = out + (1 - f) * b
    return out.view(y.shape)


def _sum_first(layer: Linear, x: torch.Tensor, b_rows: torch.Tensor) -> bool:
    """Whether the output can start as the rows' low-rank sum: a plain layer without a bias (a bias would cost
    a pass of its own), one dtype, nothing that needs a graph."""
    return (layer._fusable() and layer.base_layer.bias is None and x.dtype == b_rows.dtype
            == layer.base_layer.weight.dtype and not torch.is_grad_enabled())


def _accumulate(y: torch.Tensor, h: torch.Tensor, b_rows: torch.Tensor) -> torch.Tensor:
    """y + bmm(h, b_rows), in place into the fresh base output when nothing needs its graph."""
    n = h.shape[0]
    if y.dtype == b_rows.dtype and y.is_contiguous() and not torch.is_grad_enabled():
        y.view(n, -1, y.shape[-1]).baddbmm_(h, b_rows)
        return y
    return y + torch.bmm(h, b_rows).view(y.shape).to(y.dtype)


def _uniform_linear(layer: Linear, name: str):
    """Every row on the same plain adapter: the ordinary single-adapter path (it folds when that is cheaper)."""
    a, b, s = layer.factors_a[name].detach(), layer.factors_b[name].detach(), layer.scaling[name]
    own = layer.lora_B_bias[name].detach() if name in layer.lora_B_bias else None
    base = layer.base_layer
    with torch.no_grad():  # constant inside the block, as the factors are
        fused_bias = layer._bias_with_adapters([name])

    def forward(x, *args, **kwargs):
        if not args and not kwargs and layer._fusable():
            return lora_linear(x, base.weight, fused_bias, layer.fan_in_fan_out, [LowRank(a, b, s)], training=False)
        y = base(x, *args, **kwargs)
        h = F.linear(x.to(a.dtype), a)
        return y + (F.linear(h, b, own) * s).to(y.dtype)
    return forward


# -- token rows (trainable_token_indices) ----------------------------------------------
def _token_stacks(tokens: TrainableTokens, names: list[str]):
    """Each adapter's token ids and new rows, padded to the longest by repeating its first (so a padded entry
    writes what the real one does), slot 0 for the base model: ids (slots, M), rows (slots, M, dim), whether a
    slot has rows (slots,); cached on the layer until a row tensor or the ids change."""
    params = [tokens.rows[n] for n in names]
    key = (_key(params, tuple((n, tuple(tokens.indices[n])) for n in names)),)
    cached = tokens.__dict__.get(_TOKEN_STACK)
    if cached is not None and cached[0] == key:
        return cached[1]
    longest = max(len(tokens.indices[n]) for n in names)
    first = params[0]
    with torch.no_grad():
        ids = torch.zeros(len(names) + 1, longest, dtype=torch.long, device=first.device)
        rows = torch.zeros(len(names) + 1, longest, first.shape[1], dtype=first.dtype, device=first.device)
        for slot, (name, new) in enumerate(zip(names, params), start=1):
            pad = longest - len(tokens.indices[name])
            ids[slot] = torch.tensor(tokens.indices[name] + tokens.indices[name][:1] * pad)
            rows[slot] = torch.cat([new.detach(), new.detach()[:1].expand(pad, -1)])
        has_rows = torch.arange(len(names) + 1, device=first.device) > 0
    value = ({n: i for i, n in enumerate(names, start=1)}, ids, rows, has_rows)
    tokens.__dict__[_TOKEN_STACK] = (key, value)
    return value


def _plan_tokens(layer: TrainableTokens | TiedTokens, rows: list[str | None], index: dict):
    """An embedding (or a head) whose token rows adapters train, or a module sharing its table: each batch row
    looks up (scores) its adapter's tokens with that adapter's new rows."""
    tokens = layer if isinstance(layer, TrainableTokens) else layer.tokens
    base = layer.base_layer
    names = tokens.adapter_names
    if layer.disabled or tokens.disabled or set(rows).isdisjoint(names):
        return base
    n = len(rows)
    gathered = []

    def rows_stacks():
        if not gathered:
            slot_of, ids, new, has_rows = _token_stacks(tokens, names)
            slots = tuple(slot_of.get(r, 0) for r in rows)
            gathered.extend([_gather(ids, slots, index), _gather(new, slots, index), _gather(has_rows, slots, index)])
        return gathered

    if isinstance(base, nn.Linear):
        def forward(h):
            _check_rows(h, n)
            out = base(h)
            ids, new, has_rows = rows_stacks()
            scores = torch.bmm(h.reshape(n, -1, h.shape[-1]).to(new.dtype), new.mT)  # (n, T, M)
            if base.bias is not None:
                scores = scores + base.bias[ids][:, None, :].to(scores.dtype)
            logits = out.view(n, -1, out.shape[-1])
            columns = ids[:, None, :].expand(-1, logits.shape[1], -1)
            # rows on the base model (or on adapters without rows here) write back what they had
            values = torch.where(has_rows[:, None, None], scores.to(logits.dtype), logits.gather(-1, columns))
            if torch.is_grad_enabled():
                return logits.scatter(-1, columns, values).view(out.shape)
            return logits.scatter_(-1, columns, values).view(out.shape)  # no copy of the logits
        return forward

    def forward(x):
        _check_rows(x, n)
        out = base(x)
        ids, new, has_rows = rows_stacks()
        match = x.reshape(n, -1, 1) == ids[:, None, :]  # (n, T, M)
        hit = match.any(-1) & has_rows[:, None]
        position = match.to(torch.uint8).argmax(-1)  # the first match: a padded entry repeats the first
        picked = torch.gather(new, 1, position[..., None].expand(-1, -1, new.shape[-1]))  # (n, T, dim)
        scale = embed_scale(base, picked)  # transformers' scaled embeddings (Gemma, BART)
        if scale is not None:
            picked = picked * scale
        vectors = out.view(n, -1, out.shape[-1])
        return torch.where(hit[..., None], picked.to(out.dtype), vectors).view(out.shape)
    return forward


# -- modules_to_save ---------------------------------------------------------------
def _plan_saved(wrapper: ModulesToSave, rows: list[str | None], index: dict):
    copies = [wrapper.original_module] + [wrapper.modules_to_save[n] for n in wrapper.adapter_names]
    slot_of = {n: i + 1 for i, n in enumerate(wrapper.adapter_names)}
    slots = tuple(0 if wrapper.disabled or r is None else slot_of.get(r, 0) for r in rows)
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
        w_rows = _gather(w, slots, index)  # (n, d_in, d_out)
        b_rows = _gather(bias, slots, index)[:, None, :] if bias is not None else None

        def forward(x):
            _check_rows(x, n)
            h = x.reshape(n, -1, x.shape[-1]).to(w_rows.dtype)
            y = torch.baddbmm(b_rows, h, w_rows) if b_rows is not None else torch.bmm(h, w_rows)
            return y.view(*x.shape[:-1], y.shape[-1]).to(x.dtype)
        return forward
    if plain == {nn.Embedding} and same_shapes and all(c.max_norm is None for c in copies):
        tables = _cached(wrapper, _key([c.weight for c in copies], "embedding"),
                         lambda: torch.stack([c.weight.detach() for c in copies]))
        idx = _index(index, slots, tables.device)

        def forward(ids):
            _check_rows(ids, n)
            return tables[idx.view(n, *([1] * (ids.dim() - 1))), ids]
        return forward

    # Any other module: run each distinct copy once, on its rows (rows sorted into segments).
    groups = {}
    for row, slot in enumerate(slots):
        groups.setdefault(slot, []).append(row)
    # each copy's rows, indexed on the copy's device, where its inputs and output live
    segments = []
    for slot, members in groups.items():
        param = next(copies[slot].parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        segments.append((copies[slot], _index(index, tuple(members), device)))

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
        raise ValueError(f"adapter_per_row was given {n} rows but a module got a batch of {x.shape[0]} "
                         "(beam search and other batch expansions are not supported)")


def _take(value, idx: torch.Tensor, n: int):
    """The rows ``idx`` of every batch-shaped tensor in ``value`` (tuples, lists, dicts)."""
    if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == n:
        return value[idx.to(value.device)]
    if isinstance(value, dict):
        return {k: _take(v, idx, n) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_take(v, idx, n) for v in value)
    return value
