"""The LoRA linear computation without avoidable temporaries, as two torch custom ops.

Training, for adapters i with factors A_i (r x d_in), B_i (d_out x r):

    y   = x W^T + b + sum_i s_i (D_i(x) A_i^T) B_i^T       D_i = dropout with mask M_i
    dB_i = s_i dY^T H_i                                      H_i = D_i(x) A_i^T   (N x r, saved)
    dA_i = s_i (dY B_i)^T D_i(x)
    dx   = dY W + sum_i s_i ((dY B_i) A_i) * M_i / q_i          q_i = P(M_i = 1), see mask.py

What autograd would keep for ``base(x) + B(A(dropout(x))) * s`` is, per
adapter, the dropped copy of x and its mask, plus the scaled product. Here
backward keeps only x (which adapters on q, k and v share), the small H_i and
each mask's 32-bit key: a mask is a hash of its key and the element
positions, recomputed inside each product that applies it (products.py).
The low-rank parts add into the base product's output (``addmm_``) instead of
being summed as separate activation-sized tensors.

Where the adapters see x undropped, x W^T + s (x A^T) B^T = x (W + s B A)^T, and
dY (W + s B A) is the whole input gradient. Folding the adapters into a
temporary weight costs r d_in d_out multiply-adds and one weight-sized
buffer; the unfolded path costs a pass over an N x d activation instead. On a
CPU those passes are what LoRA's extra time is made of, so the cheaper one
runs, by shape: forward folds when N > d_in, backward when N > d_out, and
inference without gradients when N (d_in + d_out) > d_in d_out. Where both
passes fold, backward reuses forward's folded weight. Training folds on the
CPU only: on a GPU the passes are cheap and a weight-sized buffer kept for
backward is not. Training folds only in float32/float64 with adapters of the
weight's dtype: in bf16 or fp16 a small s B A would be rounded away against W.
Inference folds in any dtype (see ``_infer``): there the folded weight is the
merged one.

``lorafit::lora_linear_forward`` and ``lorafit::lora_linear_backward`` are
registered with ``torch.library`` (typed arguments, fake implementations), so
``torch.compile`` traces them as single ops; eager calls skip the dispatcher,
whose Python round trip costs more than a small layer's products.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch.nn import functional as F

from lorafit.kernels import mask, products


class LowRank(NamedTuple):
    """One adapter of a linear layer: ``s * B (A dropout(x))`` with A (r x d_in), B (d_out x r)."""

    a: Tensor
    b: Tensor
    scale: float
    dropout: float = 0.0


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool,
                adapters: Sequence[LowRank], training: bool) -> Tensor:
    """``x W^T + b + sum s B A dropout(x)``; ``transposed``: W is stored (d_in, d_out) (GPT-2's Conv1D).
    Dropout applies only where ``training``."""
    # one loop, no generators: a step calls this for every adapted layer, and on a GPU its host time is what
    # small layers wait for
    tensors, scales, ps = [], [], []
    needs_grad = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    for ad in adapters:
        a, b = ad.a, ad.b
        tensors += (a, b)
        scales.append(ad.scale)
        ps.append(ad.dropout if training else 0.0)
        needs_grad = needs_grad or a.requires_grad or b.requires_grad
    masked = training and any(ps)
    if not masked and not (needs_grad and torch.is_grad_enabled()):
        return _infer(x, weight, bias, transposed, adapters)
    if masked:
        tensors += [mask.new_key(x.device) for p in ps if p > 0]
    return _LoraLinear.apply(x, weight, bias, (transposed, tuple(scales), tuple(ps)), *tensors)


def _d_out(weight: Tensor, transposed: bool) -> int:
    return weight.shape[1] if transposed else weight.shape[0]


def _base_linear(x2: Tensor, weight: Tensor, bias, transposed: bool) -> Tensor:
    if transposed:  # GPT-2 Conv1D: weight is (d_in, d_out)
        return torch.addmm(bias, x2, weight) if bias is not None else x2 @ weight
    return F.linear(x2, weight, bias)


def _can_fold(weight: Tensor, factors) -> bool:
    return weight.dtype in (torch.float32, torch.float64) and all(f.dtype == weight.dtype for f in factors)


def _training_folds(rows: int, d: int, masked: bool, weight: Tensor, factors) -> bool:
    """Whether a training pass folds: forward with d = d_in, backward (dx) with d = d_out; ``masked``: an
    adapter has dropout."""
    return weight.device.type == "cpu" and not masked and rows > d and _can_fold(weight, factors)


def _folded(weight: Tensor, transposed: bool, a: list[Tensor], b: list[Tensor], scales) -> Tensor:
    """W + sum s B A, in W's own layout (a new tensor)."""
    for ai, bi, s in zip(a, b, scales):
        weight = products.up(ai.T, bi, s, start=weight) if transposed else products.up(bi, ai.T, s, start=weight)
    return weight


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in dtype; the check is Python's, so the common case (already in it) costs no torch call."""
    return t if t.dtype == dtype else t.to(dtype)


def _scaled_mm(a: Tensor, b: Tensor, s: float, zero: Tensor) -> Tensor:
    """s a b as one product (alpha = s; beta = 0, so ``zero``, a 0-d tensor of a's dtype, is never read): no
    launch and no pass of its own for the scale."""
    return torch.addmm(zero, a, b, beta=0, alpha=s)


def cpu_path(x: Tensor) -> bool:
    """The CPU implementation (C loops, folding) for CPU tensors; the accelerator one (cuBLAS, Triton) for the
    rest. A function, so that tests can run the accelerator implementation on CPU tensors."""
    return x.device.type == "cpu"


# An adapter's mask as the products take it: (its key or None, its threshold t, the adapter's scale times
# 1 / P(keep)); see _masks
Mask = tuple[Optional[Tensor], int, float]


def _masks(keys: Sequence[Tensor], ps: Sequence[float], scales: Sequence[float]) -> list[Mask]:
    """Per adapter (key, t, s): its mask's key (None without dropout; ``keys`` holds those of the adapters with
    dropout, in order), the mask's threshold t, and its scale with the mask's 1 / P(keep) folded in: the
    products apply the bare mask and the rescale rides on s."""
    it = iter(keys)
    out = []
    for p, s in zip(ps, scales):
        if p > 0:
            t, rescale = mask.threshold(p)
            out.append((next(it), t, s * rescale))
        else:
            out.append((None, 0, s))
    return out


def _masked(masks: Sequence[Mask]) -> bool:
    return any(key is not None for key, _, _ in masks)


def _forward_impl(x: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool, a: Sequence[Tensor],
                  b: Sequence[Tensor], masks: Sequence[Mask], keep_folded: bool
                  ) -> tuple[Tensor, Tensor, list[Tensor], Tensor | None]:
    """(y, x as 2-D rows, H_i per adapter, the folded weight where backward reuses it, else None); ``masks``
    from _masks."""
    x2 = x.reshape(-1, x.shape[-1])
    if cpu_path(x):
        y, hs, folded = _forward_cpu(x2, weight, bias, transposed, a, b, masks, keep_folded)
    else:
        y, hs, folded = _forward_accelerator(x2, weight, bias, transposed, a, b, masks)
    return y.view(*x.shape[:-1], y.shape[-1]), x2, hs, folded


def _forward_accelerator(x2, weight, bias, transposed, a, b, masks):
    """Each adapter's H = mask(x) A^T (with a mask one Triton pass over x, else cuBLAS); the output starts as
    the low-rank sum and cuBLAS adds x W^T into it (beta != 0). The base GEMM reads that sum in its epilogue,
    where its compute-bound main loop hides most of the read; adding the sum after the base product would be
    a read-modify-write pass of its own over the output. The unmasked products call torch directly, not
    through products.py: at a few thousand rows a small layer's GPU work is shorter than the host time that
    issues it, and the dispatch there costs host time on every product."""
    hs = []
    low_rank = _LowRankSum(weight.dtype, bias)
    for ai, bi, (key, t, s) in zip(a, b, masks):
        h = products.down(x2, ai, key, t) if key is not None else _as(x2, ai.dtype) @ ai.T
        hs.append(h)  # kept for dB; it is small (N x r)
        low_rank.add(h, bi.T, s)
    return low_rank.plus(x2, weight if transposed else weight.T), hs, None


class _LowRankSum:
    """start + sum s_i G_i M_i, then plus a base product P Q: built so that each pass over the output is
    also a product's (no pass of its own). The sum is held divided by ``scale``, the first term's s when
    there is no start, and the base GEMM's beta multiplies it back; later terms add with alpha = s_i / scale.
    A masked term (``key``) goes through products.up: Triton on CUDA, writing s mask(G M) or adding it."""

    def __init__(self, dtype: torch.dtype, start: Tensor | None = None):
        self.dtype, self.start, self.sum, self.scale = dtype, start, None, 1.0

    def add(self, g: Tensor, m: Tensor, s: float, key: Tensor | None = None, t: int = 0) -> None:
        if key is not None:
            if self.sum is None:
                self.sum = products.up(g, m.T, s, None, None, self.dtype, key, t)
            else:
                products.up(g, m.T, s / self.scale, self.sum, None, self.dtype, key, t)
        elif self.sum is not None:
            if m.dtype == self.dtype:
                self.sum.addmm_(g, m, alpha=s / self.scale)
            else:
                self.sum.add_((g @ m).to(self.dtype), alpha=s / self.scale)
        elif self.start is not None and self.start.dtype == m.dtype == self.dtype:
            self.sum = torch.addmm(self.start, g, m, alpha=s)
            self.start = None
        else:
            self.sum, self.scale = _as(g @ m, self.dtype), s
        if self.start is not None:  # a start that the first term could not take in its own product
            self.sum = (self.sum.mul_(self.scale) if self.scale != 1.0 else self.sum).add_(self.start)
            self.start, self.scale = None, 1.0

    def add_masked_with_grad_a(self, g: Tensor, m: Tensor, s: float, key: Tensor, t: int, x: Tensor) -> Tensor:
        """add(g, m, s, key, t), and s G^T mask(x) from the same pass (products.grad_a_and_up): a masked
        adapter's dx part and A's gradient. Backward's sums have no start."""
        first = self.sum is None
        grad_a, self.sum = products.grad_a_and_up(g, x, m, key, t, s, s if first else s / self.scale, self.sum,
                                                  self.dtype)
        return grad_a

    def plus(self, p: Tensor, q: Tensor) -> Tensor:
        """sum + P Q, in the sum's tensor."""
        return self.sum.addmm_(p, q, beta=self.scale)


def _forward_cpu(x2, weight, bias, transposed, a, b, masks, keep_folded):
    rows, d_in = x2.shape
    masked = _masked(masks)
    fold = _training_folds(rows, d_in, masked, weight, a + b)
    hs = [products.down(x2, ai, key, t) for ai, (key, t, _) in zip(a, masks)]  # kept for dB; small (N x r)
    folded = None
    if fold:
        w = _folded(weight, transposed, a, b, [s for _, _, s in masks])  # unmasked: s is the scale
        y = _base_linear(x2, w, bias, transposed)
        if keep_folded and _training_folds(rows, _d_out(weight, transposed), masked, weight, a + b):
            folded = w
    else:
        # the output starts as bias + s H B^T (later adapters add into it) and x W^T adds into it: one
        # pass over the output for the bias and the low-rank sum together (products.up in C)
        y = None
        for hi, bi, (_, _, s) in zip(hs, b, masks):
            y = products.up(hi, bi, s, y, bias if y is None else None, weight.dtype)
        y.addmm_(x2, weight if transposed else weight.T)
    return y, hs, folded


def _forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], transposed: bool, a: list[Tensor],
             b: list[Tensor], scales: list[float], ps: list[float], keys: list[Tensor],
             keep_folded: bool) -> tuple[Tensor, list[Tensor], Tensor]:
    """_forward_impl as the op returns it: an empty tensor where there is no folded weight."""
    y, _, hs, folded = _forward_impl(x, weight, bias, transposed, a, b, _masks(keys, ps, scales), keep_folded)
    return y, hs, x.new_empty(0) if folded is None else folded


_forward_op = torch.library.custom_op("lorafit::lora_linear_forward", _forward, mutates_args=())


@_forward_op.register_fake
def _(x, weight, bias, transposed, a, b, scales, ps, keys, keep_folded):
    rows = x.numel() // x.shape[-1]
    d_out = _d_out(weight, transposed)
    folded = x.new_empty(0)
    masked = any(p > 0 for p in ps)
    if keep_folded and _training_folds(rows, x.shape[-1], masked, weight, a + b) and _training_folds(
            rows, d_out, masked, weight, a + b):
        folded = torch.empty_like(weight)
    hs = [x.new_empty(rows, ai.shape[0], dtype=ai.dtype) for ai in a]
    return x.new_empty(*x.shape[:-1], d_out, dtype=weight.dtype), hs, folded


def _backward_impl(gy: Tensor, x2: Tensor, weight: Tensor, folded: Tensor | None, transposed: bool,
                   a: Sequence[Tensor], b: Sequence[Tensor], masks: Sequence[Mask], hs: Sequence[Tensor],
                   needs: Sequence[bool]) -> tuple:
    """(dx, dW, dbias, [dA_i], [dB_i]) for ``needs`` = [x, W, bias, A_1, B_1, A_2, ...]; None where not needed.
    x2 and dx: x as 2-D rows."""
    g2 = gy.reshape(-1, gy.shape[-1])
    gw = (x2.T @ g2 if transposed else g2.T @ x2) if needs[1] else None
    gbias = g2.sum(0) if needs[2] else None
    if cpu_path(x2):
        gx, gas, gbs = _backward_cpu(g2, x2, weight, folded, transposed, a, b, masks, hs, needs)
    else:
        gx, gas, gbs = _backward_accelerator(g2, x2, weight, transposed, a, b, masks, hs, needs)
    return gx, gw, gbias, gas, gbs


# _scaled_mm's 0-d input per (dtype, device): beta = 0, so it is never read, only allocated once
_zeros: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def _zero(like: Tensor) -> Tensor:
    zero = _zeros.get((like.dtype, like.device))
    if zero is None:
        zero = _zeros[like.dtype, like.device] = like.new_zeros(())
    return zero


def _backward_accelerator(g2, x2, weight, transposed, a, b, masks, hs, needs):
    """dx starts as the low-rank sum s mask(dY B A) (Triton with a mask, else cuBLAS) and cuBLAS adds dY W
    into it, as in _forward_accelerator; dA and dB straight from torch or Triton."""
    low_rank = _LowRankSum(g2.dtype) if needs[0] else None
    gas, gbs = [], []
    for i, (ai, bi, (key, t, s)) in enumerate(zip(a, b, masks)):
        need_a, need_b = needs[3 + 2 * i], needs[4 + 2 * i]
        gl = _as(g2, bi.dtype)
        zero = _zero(gl)
        gbs.append(_scaled_mm(gl.T, hs[i], s, zero) if need_b else None)
        if not (need_a or low_rank is not None):
            gas.append(None)
            continue
        gh = gl @ bi
        if key is not None and need_a and low_rank is not None:
            gas.append(low_rank.add_masked_with_grad_a(gh, ai, s, key, t, x2))
            continue
        if not need_a:
            gas.append(None)
        elif key is not None:
            gas.append(products.grad_a(gh, x2, key, t, s))
        else:
            gas.append(_scaled_mm(gh.T, _as(x2, gh.dtype), s, zero))
        if low_rank is not None:
            low_rank.add(gh, ai, s, key, t)
    gx = None
    if low_rank is not None:
        w = weight.T if transposed else weight
        gx = low_rank.plus(g2, w) if low_rank.sum is not None else g2 @ w
    return gx, gas, gbs


def _backward_cpu(g2, x2, weight, folded, transposed, a, b, masks, hs, needs):
    rows, d_out = g2.shape
    fold = needs[0] and _training_folds(rows, d_out, _masked(masks), weight, a + b)
    lora_gx = needs[0] and not fold
    gx = None
    gas, gbs = [], []
    for i, (ai, bi, (key, t, s)) in enumerate(zip(a, b, masks)):
        need_a, need_b = needs[3 + 2 * i], needs[4 + 2 * i]
        gl = _as(g2, bi.dtype)
        gh = gbt = None
        if need_b and (need_a or lora_gx):
            gh, gbt = products.grad_b(gl, bi, hs[i])  # dY B and H^T dY, from one pass over dY in C
        elif need_a or lora_gx:
            gh = products.down(gl, bi.T.contiguous())  # dY B as dY (B^T)^T, see grad_b
        elif need_b:
            gbt = products.grad_a(hs[i], gl)
        # dB as (H^T dY)^T: MKL is about twice as fast at this layout than at dY^T H; the small copy
        # gives the op's outputs the contiguous layout its fake implementation promises
        gbs.append(gbt.mul_(s).T.contiguous() if gbt is not None else None)
        # with dropout, the mask is recomputed from its key in each product that applies it
        gas.append(products.grad_a(gh, x2, key, t, s) if need_a else None)
        if lora_gx:
            # dx starts as s mask(dY B A) and dY W adds into it below, as in forward
            gx = products.up(gh, ai.T, s, gx, None, x2.dtype, key, t)
    if fold:
        w = folded if folded is not None else _folded(weight, transposed, a, b, [s for _, _, s in masks])
        gx = g2 @ (w.T if transposed else w)
    elif needs[0]:
        gx = gx.addmm_(g2, weight.T if transposed else weight)
    return gx, gas, gbs


def _backward(gy: Tensor, x2: Tensor, weight: Tensor, folded: Tensor, transposed: bool, a: list[Tensor],
              b: list[Tensor], scales: list[float], ps: list[float], keys: list[Tensor], hs: list[Tensor],
              needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, list[Tensor], list[Tensor]]:
    """_backward_impl as the op returns it: an empty tensor (each its own: an op's outputs may not alias) for
    each gradient not needed, and an empty ``folded`` for none. x2 and dx: x as 2-D rows."""
    gx, gw, gbias, gas, gbs = _backward_impl(gy, x2, weight, folded if folded.numel() else None, transposed, a, b,
                                             _masks(keys, ps, scales), hs, needs)

    def tensor(g: Tensor | None) -> Tensor:
        return x2.new_empty(0) if g is None else g

    return tensor(gx), tensor(gw), tensor(gbias), [tensor(g) for g in gas], [tensor(g) for g in gbs]


_backward_op = torch.library.custom_op("lorafit::lora_linear_backward", _backward, mutates_args=())


@_backward_op.register_fake
def _(gy, x2, weight, folded, transposed, a, b, scales, ps, keys, hs, needs):
    def maybe(need, like):
        return torch.empty_like(like) if need else x2.new_empty(0)
    gbias = x2.new_empty(_d_out(weight, transposed), dtype=gy.dtype) if needs[2] else x2.new_empty(0)
    return (maybe(needs[0], x2), maybe(needs[1], weight), gbias,
            [maybe(needs[3 + 2 * i], ai) for i, ai in enumerate(a)],
            [maybe(needs[4 + 2 * i], bi) for i, bi in enumerate(b)])


class _LoraLinear(torch.autograd.Function):
    """Autograd around the two ops: what forward keeps for backward, and which gradients are needed. While
    torch.compile traces, it calls the registered ops (it must see one op each); eager calls skip the
    dispatcher and the ops' placeholder outputs.

    ``tensors``: A_1, B_1, A_2, B_2, ..., then the masks' keys (see _masks)."""

    @staticmethod
    def forward(ctx, x, weight, bias, spec, *tensors):
        transposed, scales, ps = spec
        n = len(scales)
        a, b, keys = tensors[: 2 * n: 2], tensors[1: 2 * n: 2], tensors[2 * n:]
        need = ctx.needs_input_grad
        if torch.compiler.is_compiling():
            y, hs, folded = _forward_op(x, weight, bias, transposed, list(a), list(b), list(scales), list(ps),
                                        list(keys), need[0])
            x2 = x.reshape(-1, x.shape[-1])
        else:
            y, x2, hs, folded = _forward_impl(x, weight, bias, transposed, a, b, _masks(keys, ps, scales), need[0])
        # x is read in backward only for W's and the A factors' gradients: with those frozen (LoRA-FA) a
        # stand-in of its shape is kept instead, and the layer's input need not outlive the forward
        if not (need[1] or any(need[4: 4 + 2 * n: 2])):
            x2 = x2.new_empty(()).expand(x2.shape)
        ctx.save_for_backward(x2, weight, folded, *tensors, *hs)
        ctx.spec, ctx.has_bias, ctx.x_shape = spec, bias is not None, x.shape
        return y

    @staticmethod
    def backward(ctx, gy):
        transposed, scales, ps = ctx.spec
        n = len(scales)
        x2, weight, folded, *rest = ctx.saved_tensors
        a, b, keys, hs = rest[: 2 * n: 2], rest[1: 2 * n: 2], rest[2 * n: -n], rest[-n:]
        need = ctx.needs_input_grad
        needs = [need[0], need[1], need[2] and ctx.has_bias, *need[4: 4 + 2 * n]]
        if torch.compiler.is_compiling():
            gx, gw, gbias, gas, gbs = _backward_op(gy, x2, weight, folded, transposed, list(a), list(b), list(scales),
                                                   list(ps), list(keys), list(hs), needs)
            gx, gw, gbias = (g if wanted else None for g, wanted in zip((gx, gw, gbias), needs))  # placeholders
            gas = [g if wanted else None for g, wanted in zip(gas, needs[3::2])]
            gbs = [g if wanted else None for g, wanted in zip(gbs, needs[4::2])]
        else:
            gx, gw, gbias, gas, gbs = _backward_impl(gy, x2, weight, folded, transposed, a, b,
                                                     _masks(keys, ps, scales), hs, needs)
        grads = [gx.view(ctx.x_shape) if gx is not None else None, gw, gbias, None]
        for ga, gb in zip(gas, gbs):
            grads += (ga, gb)
        return (*grads, *[None] * len(keys))


def _infer(x: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool, adapters: Sequence[LowRank]) -> Tensor:
    """No gradients, no dropout: fold into a temporary weight when that is cheaper, else add into the output.

    Here a bf16/fp16 weight folds too: W + s B A from one GEMM that accumulates in float32 is what ``merge``
    puts into the weight (to its last bit), so the output is the merged model's, and what a small s B A loses
    to rounding is what merging loses. Training never folds in 16 bits."""
    d_in = x.shape[-1]
    d_out = _d_out(weight, transposed)
    x2 = x.reshape(-1, d_in)
    a = [ad.a for ad in adapters]
    b = [ad.b for ad in adapters]
    if x2.shape[0] * (d_in + d_out) > d_in * d_out and all(f.dtype == weight.dtype for f in a + b):
        y = _base_linear(x2, _folded(weight, transposed, a, b, [ad.scale for ad in adapters]), bias, transposed)
    else:  # the low-rank sum first and x W^T into it, as in training (see _forward_accelerator)
        low_rank = _LowRankSum(weight.dtype, bias)
        for ad in adapters:
            low_rank.add(_as(x2, ad.a.dtype) @ ad.a.T, ad.b.T, ad.scale)
        y = low_rank.plus(x2, weight if transposed else weight.T)
    return y.view(*x.shape[:-1], d_out)
