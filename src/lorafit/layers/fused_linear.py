"""The LoRA linear computation without avoidable temporaries.

Training, for adapters i with factors A_i (r x d_in), B_i (d_out x r):

    y   = x W^T + b + sum_i s_i (D_i(x) A_i^T) B_i^T       D_i = dropout with mask M_i
    dB_i = s_i dY^T H_i                                      H_i = D_i(x) A_i^T   (N x r, saved)
    dA_i = s_i (dY B_i)^T D_i(x)
    dx   = dY W + sum_i s_i ((dY B_i) A_i) * M_i / (1 - p_i)

What autograd would keep for ``base(x) + B(A(dropout(x))) * s`` is, per
adapter, the dropped copy of x (4 bytes an element in float32) and its mask,
plus the scaled product. Here backward keeps only x (which adapters on q, k
and v share), the small H_i and the keep-mask as bool (1 byte an element); the
dropped input is recomputed from them when backward needs it. Redrawing the
mask from a seed instead would save that byte but costs a second RNG pass,
and on a CPU the RNG is the most expensive part of dropout. The low-rank
product is accumulated into the base output in place (``addmm_``).

Inference (no gradients needed) picks by shape: the unmerged low-rank path
costs about N r (d_in + d_out) multiply-adds for N rows, folding the adapters
into a temporary weight costs r d_in d_out; the cheaper one runs.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def dropout_keep(like: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout's keep-mask (True with probability 1 - p) from the global RNG, as a bool tensor."""
    return torch.rand_like(like) >= p


def _base_linear(x2: torch.Tensor, weight: torch.Tensor, bias, transposed: bool) -> torch.Tensor:
    if transposed:  # GPT-2 Conv1D: weight is (d_in, d_out)
        return torch.addmm(bias, x2, weight) if bias is not None else x2 @ weight
    return F.linear(x2, weight, bias)


class LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, transposed, scales, ps, *factors):
        d_in = x.shape[-1]
        x2 = x.reshape(-1, d_in)
        y = _base_linear(x2, weight, bias, transposed)
        hs, keeps = [], []
        for i, s in enumerate(scales):
            a, b = factors[2 * i], factors[2 * i + 1]
            xi = x2.to(a.dtype)
            if ps[i] > 0:
                keep = dropout_keep(xi, ps[i])
                xi = xi.mul(keep).mul_(1.0 / (1.0 - ps[i]))
                keeps.append(keep)
            h = xi @ a.T
            if b.dtype == y.dtype:
                y.addmm_(h, b.T, alpha=s)
            else:
                y.add_((h @ b.T).to(y.dtype), alpha=s)
            hs.append(h)
        ctx.save_for_backward(x, weight, *factors, *hs, *keeps)
        ctx.meta = (transposed, scales, ps, bias is not None)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        transposed, scales, ps, has_bias = ctx.meta
        x, weight, *rest = ctx.saved_tensors
        n = len(scales)
        factors, hs, keeps = rest[: 2 * n], rest[2 * n: 3 * n], iter(rest[3 * n:])
        need = ctx.needs_input_grad
        x2 = x.reshape(-1, x.shape[-1])
        g2 = gy.reshape(-1, gy.shape[-1])

        gx = None
        if need[0]:
            gx = g2 @ (weight.T if transposed else weight)
        gw = None
        if need[1]:
            gw = x2.T @ g2 if transposed else g2.T @ x2
        gbias = g2.sum(0) if has_bias and need[2] else None

        gfactors: list[torch.Tensor | None] = []
        for i, s in enumerate(scales):
            a, b = factors[2 * i], factors[2 * i + 1]
            need_a, need_b = need[6 + 2 * i], need[7 + 2 * i]
            keep = next(keeps) if ps[i] > 0 else None
            gl = g2.to(b.dtype)
            gb = torch.mm(gl.T, hs[i]).mul_(s) if need_b else None
            ga = None
            if need_a or gx is not None:
                gh = gl @ b  # dY B, N x r
                xi = x2.to(a.dtype)
                mask = None if keep is None else keep.to(a.dtype).mul_(1.0 / (1.0 - ps[i]))
                if need_a:
                    ga = torch.mm(gh.T, xi if mask is None else xi * mask).mul_(s)
                if gx is not None:
                    if mask is None and a.dtype == gx.dtype:
                        gx.addmm_(gh, a, alpha=s)
                    else:
                        lora_gx = gh @ a
                        if mask is not None:
                            lora_gx.mul_(mask)
                        gx.add_(lora_gx.to(gx.dtype), alpha=s)
            gfactors += [ga, gb]
        if gx is not None:
            gx = gx.view(x.shape)
        return (gx, gw, gbias, None, None, None, *gfactors)


def lora_linear_train(x, weight, bias, transposed, adapters):
    """``adapters``: list of (A, B, scale, dropout_p) — the training path with a compact backward."""
    scales = tuple(s for _, _, s, _ in adapters)
    ps = tuple(p for _, _, _, p in adapters)
    factors = [t for a, b, _, _ in adapters for t in (a, b)]
    return LoraLinearFunction.apply(x, weight, bias, transposed, scales, ps, *factors)


def lora_linear_infer(x, weight, bias, transposed, adapters):
    """No-gradient path: fold into a temporary weight when that is cheaper than the low-rank path."""
    d_in = x.shape[-1]
    d_out = weight.shape[1] if transposed else weight.shape[0]
    rows = x.numel() // d_in
    if rows * (d_in + d_out) > d_in * d_out:
        w = weight
        for a, b, s, _ in adapters:
            delta = (a.T @ b.T) if transposed else (b @ a)
            w = w + delta.to(w.dtype) * s if delta.dtype != w.dtype else torch.add(w, delta, alpha=s)
        return _base_linear(x.reshape(-1, d_in), w, bias, transposed).view(*x.shape[:-1], d_out)
    y = _base_linear(x.reshape(-1, d_in), weight, bias, transposed)
    for a, b, s, _ in adapters:
        h = x.reshape(-1, d_in).to(a.dtype) @ a.T
        if b.dtype == y.dtype:
            y.addmm_(h, b.T, alpha=s)
        else:
            y.add_((h @ b.T).to(y.dtype), alpha=s)
    return y.view(*x.shape[:-1], d_out)
