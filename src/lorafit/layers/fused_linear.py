"""The LoRA linear computation without avoidable temporaries.

Training, for adapters i with factors A_i (r x d_in), B_i (d_out x r):

    y   = x W^T + b + sum_i s_i (D_i(x) A_i^T) B_i^T       D_i = dropout with mask M_i
    dB_i = s_i dY^T H_i                                      H_i = D_i(x) A_i^T   (N x r, saved)
    dA_i = s_i (dY B_i)^T D_i(x)
    dx   = dY W + sum_i s_i ((dY B_i) A_i) * M_i / q_i          q_i = P(M_i = 1), see dropout_mask

What autograd would keep for ``base(x) + B(A(dropout(x))) * s`` is, per
adapter, the dropped copy of x (4 bytes an element in float32) and its mask,
plus the scaled product. Here backward keeps only x (which adapters on q, k
and v share), the small H_i and each mask's 32-bit key: a mask is a hash of
its key and the element positions, recomputed inside each pass that applies
it: to x for H and for dA, and to the input gradient (low_rank_ops, in C on
a CPU in float32).
The output starts as bias + sum_i s_i H_i B_i^T (low_rank_ops.up: one pass
over it) and the base product x W^T adds into it in place (``addmm_``).

Where the adapters see x undropped, x W^T + s (x A^T) B^T = x (W + s B A)^T, and
dY (W + s B A) is the whole input gradient. Folding the adapters into a
temporary weight costs r d_in d_out multiply-adds and one weight-sized
buffer; the unfolded path costs a pass over an N x d activation instead. On a
CPU those passes are what LoRA's extra time is made of, so the cheaper one
runs, by shape: forward folds when N > d_in, backward when N > d_out, and
inference without gradients when N (d_in + d_out) > d_in d_out. Where both
passes fold, backward reuses forward's folded weight: rebuilding it was 1-2%
of a MiniLM step, and it is smaller than the x that is kept anyway (N > d_out).
Folding is only used in float32/float64 with adapters of the weight's dtype:
in bf16 or fp16 a small s B A would be rounded away against W.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from lorafit.layers import dropout_mask, low_rank_ops


def _base_linear(x2: torch.Tensor, weight: torch.Tensor, bias, transposed: bool) -> torch.Tensor:
    if transposed:  # GPT-2 Conv1D: weight is (d_in, d_out)
        return torch.addmm(bias, x2, weight) if bias is not None else x2 @ weight
    return F.linear(x2, weight, bias)


def _can_fold(weight: torch.Tensor, factors) -> bool:
    return weight.dtype in (torch.float32, torch.float64) and all(f.dtype == weight.dtype for f in factors)


def _training_folds(rows: int, d: int, ps, weight: torch.Tensor, factors) -> bool:
    """Whether a training pass folds: forward with d = d_in, backward (dx) with d = d_out."""
    return not any(ps) and rows > d and _can_fold(weight, factors)


def _folded(weight: torch.Tensor, transposed: bool, factors, scales) -> torch.Tensor:
    """W + sum s B A, in W's own layout (a new tensor)."""
    for i, s in enumerate(scales):
        a, b = factors[2 * i], factors[2 * i + 1]
        weight = low_rank_ops.up(a.T, b, s, start=weight) if transposed else low_rank_ops.up(b, a.T, s, start=weight)
    return weight


class LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, transposed, scales, ps, *factors):
        d_in = x.shape[-1]
        x2 = x.reshape(-1, d_in)
        rows = x2.shape[0]
        fold = _training_folds(rows, d_in, ps, weight, factors)
        hs, keys, y = [], [], None
        for i, s in enumerate(scales):
            a, b = factors[2 * i], factors[2 * i + 1]
            if ps[i] > 0:
                # H = (x * keep) A^T without the rescale: that factor rides on the scalar s instead
                t, rescale = dropout_mask.threshold(ps[i], x.device)
                keys.append(dropout_mask.new_key(x.device))
                h = low_rank_ops.down(x2, a, keys[-1], t)
                s = s * rescale
            else:
                h = low_rank_ops.down(x2, a)
            hs.append(h)  # kept for dB; it is small (N x r)
            if not fold:
                # the output starts as bias + s H B^T (later adapters add into it) and x W^T adds into
                # it below: one pass over the output for the bias and the low-rank sum together
                y = low_rank_ops.up(h, b, s, y, bias if y is None else None, weight.dtype)
        folded = None
        if fold:
            folded = _folded(weight, transposed, factors, scales)
            y = _base_linear(x2, folded, bias, transposed)
            d_out = weight.shape[1] if transposed else weight.shape[0]
            if not (ctx.needs_input_grad[0] and _training_folds(rows, d_out, ps, weight, factors)):
                folded = None  # kept only for a backward that folds too, which then need not rebuild it
        else:
            y.addmm_(x2, weight if transposed else weight.T)
        ctx.save_for_backward(x, weight, folded, *factors, *hs, *keys)
        ctx.meta = (transposed, scales, ps, bias is not None)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        transposed, scales, ps, has_bias = ctx.meta
        x, weight, folded, *rest = ctx.saved_tensors
        n = len(scales)
        factors, hs = rest[: 2 * n], rest[2 * n: 3 * n]
        keys = iter(rest[3 * n:])
        need = ctx.needs_input_grad
        x2 = x.reshape(-1, x.shape[-1])
        g2 = gy.reshape(-1, gy.shape[-1])
        rows, d_out = g2.shape

        fold = need[0] and _training_folds(rows, d_out, ps, weight, factors)
        lora_gx = need[0] and not fold
        gw = None
        if need[1]:
            gw = x2.T @ g2 if transposed else g2.T @ x2
        gbias = g2.sum(0) if has_bias and need[2] else None

        gx = None
        gfactors: list[torch.Tensor | None] = []
        for i, s in enumerate(scales):
            a, b = factors[2 * i], factors[2 * i + 1]
            need_a, need_b = need[6 + 2 * i], need[7 + 2 * i]
            key = t = None
            if ps[i] > 0:
                key = next(keys)
                t, rescale = dropout_mask.threshold(ps[i], x.device)
                s = s * rescale
            gl = g2.to(b.dtype)
            ga = gh = gbt = None
            if need_b and (need_a or lora_gx):
                gh, gbt = low_rank_ops.grad_b(gl, b, hs[i])  # dY B and H^T dY from one pass over dY
            elif need_a or lora_gx:
                gh = low_rank_ops.down(gl, b.T.contiguous())  # dY B as dY (B^T)^T, see grad_b
            elif need_b:
                gbt = low_rank_ops.grad_a(hs[i], gl)
            # dB as (H^T dY)^T: MKL is about twice as fast at this layout than at dY^T H
            gb = gbt.T.mul_(s) if gbt is not None else None
            # with dropout, the mask is recomputed from its key in each pass that applies it
            if need_a:
                ga = low_rank_ops.grad_a(gh, x2, key, t).mul_(s)
            if lora_gx:
                # dx starts as s mask(dY B A), and dY W adds into it below, as in forward
                gx = low_rank_ops.up(gh, a.T, s, gx, None, x.dtype, key, t)
            gfactors += [ga, gb]
        if need[0]:
            w = (folded if folded is not None else _folded(weight, transposed, factors, scales)) if fold else weight
            w = w.T if transposed else w
            gx = g2 @ w if gx is None else gx.addmm_(g2, w)
        if gx is not None:
            gx = gx.view(x.shape)
        return (gx, gw, gbias, None, None, None, *gfactors)


def lora_linear_train(x, weight, bias, transposed, adapters):
    """``adapters``: list of (A, B, scale, dropout_p): the training path with a compact backward."""
    scales = tuple(s for _, _, s, _ in adapters)
    ps = tuple(p for _, _, _, p in adapters)
    factors = [t for a, b, _, _ in adapters for t in (a, b)]
    return LoraLinearFunction.apply(x, weight, bias, transposed, scales, ps, *factors)


def lora_linear_infer(x, weight, bias, transposed, adapters):
    """No-gradient path, no dropout: fold into a temporary weight when that is cheaper."""
    d_in = x.shape[-1]
    d_out = weight.shape[1] if transposed else weight.shape[0]
    x2 = x.reshape(-1, d_in)
    factors = [t for a, b, _, _ in adapters for t in (a, b)]
    scales = [s for _, _, s, _ in adapters]
    if x2.shape[0] * (d_in + d_out) > d_in * d_out and _can_fold(weight, factors):
        y = _base_linear(x2, _folded(weight, transposed, factors, scales), bias, transposed)
    else:
        y = _base_linear(x2, weight, bias, transposed)
        for a, b, s, _ in adapters:
            h = x2.to(a.dtype) @ a.T
            if b.dtype == y.dtype:
                y.addmm_(h, b.T, alpha=s)
            else:
                y.add_((h @ b.T).to(y.dtype), alpha=s)
    return y.view(*x.shape[:-1], d_out)
