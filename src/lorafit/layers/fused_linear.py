"""The LoRA linear computation without avoidable temporaries.

Training, for adapters i with factors A_i (r x d_in), B_i (d_out x r):

    y   = x W^T + b + sum_i s_i (D_i(x) A_i^T) B_i^T       D_i = dropout with mask M_i
    dB_i = s_i dY^T H_i                                      H_i = D_i(x) A_i^T   (N x r, saved)
    dA_i = s_i (dY B_i)^T D_i(x)
    dx   = dY W + sum_i s_i ((dY B_i) A_i) * M_i / q_i          q_i = P(M_i = 1), see dropout_keep

What autograd would keep for ``base(x) + B(A(dropout(x))) * s`` is, per
adapter, the dropped copy of x (4 bytes an element in float32) and its mask,
plus the scaled product. Here backward keeps only x (which adapters on q, k
and v share), the small H_i and the keep-mask packed to one bit an element;
the dropped input is recomputed from them when backward needs it. Redrawing
the mask from a saved RNG state instead would save that bit but cost a second
pass of the RNG, which runs on one thread on a CPU.
The low-rank product is accumulated into the base output in place (``addmm_``).

Where the adapters see x undropped, x W^T + s (x A^T) B^T = x (W + s B A)^T, and
dY (W + s B A) is the whole input gradient. Folding the adapters into a
temporary weight costs r d_in d_out multiply-adds and one weight-sized
buffer; the unfolded path costs a pass over an N x d activation instead. On a
CPU those passes are what LoRA's extra time is made of, so the cheaper one
runs, by shape: forward folds when N > d_in, backward when N > d_out, and
inference without gradients when N (d_in + d_out) > d_in d_out. Folding is
only used in float32/float64 with adapters of the weight's dtype: in bf16 or
fp16 a small s B A would be rounded away against W.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

_MASK_LEVELS = 1 << 16  # the keep-mask compares 16-bit random integers with a threshold


def dropout_keep(like: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """Dropout's keep-mask (uint8, 1 = keep) for a tensor shaped like ``like``, and the rescale 1 / P(keep).

    Each element is dropped when a uniform 16-bit integer falls below round(p * 2^16), so the
    drop probability is p rounded to a multiple of 2^-16 (0.1 becomes 0.1000061); the rescale
    uses that exact probability, so E[mask * scale] = 1 holds exactly. Four 16-bit lanes come
    from each 64-bit draw of the device's default generator: on a CPU that is about 5x faster
    than ``bernoulli_``, whose per-element draws made dropout the largest cost of a LoRA step."""
    drop = min(round(p * _MASK_LEVELS), _MASK_LEVELS - 1)
    n = like.numel()
    # randint over the whole int64 range rather than random_(): torch.compile traces randint
    words = torch.randint(-(1 << 63), (1 << 63) - 1, ((n + 3) // 4,), dtype=torch.int64, device=like.device)
    lanes = words.view(torch.int16)[:n].view(like.shape)  # each lane uniform over [-2^15, 2^15)
    # 0/1 bytes rather than bool: x.mul(uint8) runs about 3x faster than x.mul(bool), which
    # converts the mask to x's dtype in a pass of its own (and than torch.where)
    keep = (lanes >= drop - (_MASK_LEVELS >> 1)).view(torch.uint8)
    return keep, _MASK_LEVELS / (_MASK_LEVELS - drop)


# byte i of an int64 word of 0/1 bytes lands on bit 56 + i of word * _GATHER (no carries occur)
_GATHER = 0x0102040810204080


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """0/1 bytes to one bit each (uint8, 8 per byte): what backward keeps of a dropout mask."""
    flat = keep.reshape(-1)
    if flat.numel() % 8:
        flat = torch.cat([flat, flat.new_zeros(8 - flat.numel() % 8)])
    return ((flat.view(torch.int64) * _GATHER) >> 56).to(torch.uint8)  # the cast keeps the low byte


def unpack_mask(packed: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The 0/1 mask of ``shape`` that ``pack_mask`` packed, in ``dtype``: one lookup of 8 values per byte."""
    device = packed.device
    table = ((torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device)) & 1).to(dtype)
    return table.index_select(0, packed.int()).view(-1)[: shape.numel()].view(shape)


def _base_linear(x2: torch.Tensor, weight: torch.Tensor, bias, transposed: bool) -> torch.Tensor:
    if transposed:  # GPT-2 Conv1D: weight is (d_in, d_out)
        return torch.addmm(bias, x2, weight) if bias is not None else x2 @ weight
    return F.linear(x2, weight, bias)


def _can_fold(weight: torch.Tensor, factors) -> bool:
    return weight.dtype in (torch.float32, torch.float64) and all(f.dtype == weight.dtype for f in factors)


def _folded(weight: torch.Tensor, transposed: bool, factors, scales) -> torch.Tensor:
    """W + sum s B A, in W's own layout."""
    for i, s in enumerate(scales):
        a, b = factors[2 * i], factors[2 * i + 1]
        weight = torch.addmm(weight, a.T, b.T, alpha=s) if transposed else torch.addmm(weight, b, a, alpha=s)
    return weight


class LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, transposed, scales, ps, *factors):
        d_in = x.shape[-1]
        x2 = x.reshape(-1, d_in)
        rows = x2.shape[0]
        no_dropout = not any(ps)
        fold = no_dropout and rows > d_in and _can_fold(weight, factors)
        y = _base_linear(x2, _folded(weight, transposed, factors, scales) if fold else weight, bias, transposed)
        hs, keeps, rescales = [], [], []
        for i, s in enumerate(scales):
            a, b = factors[2 * i], factors[2 * i + 1]
            xi = x2.to(a.dtype)
            if ps[i] > 0:
                # H = (x * keep) A^T without the rescale: that factor rides on the scalar s instead
                keep, rescale = dropout_keep(xi, ps[i])
                xi = xi.mul(keep)
                s = s * rescale
                keeps.append(pack_mask(keep))
                rescales.append(rescale)
            h = xi @ a.T  # kept for dB; small (N x r)
            if not fold:
                if b.dtype == y.dtype:
                    y.addmm_(h, b.T, alpha=s)
                else:
                    y.add_((h @ b.T).to(y.dtype), alpha=s)
            hs.append(h)
        ctx.save_for_backward(x, weight, *factors, *hs, *keeps)
        ctx.meta = (transposed, scales, ps, tuple(rescales), bias is not None)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        transposed, scales, ps, rescales, has_bias = ctx.meta
        x, weight, *rest = ctx.saved_tensors
        n = len(scales)
        factors, hs = rest[: 2 * n], rest[2 * n: 3 * n]
        keeps, rescales = iter(rest[3 * n:]), iter(rescales)
        need = ctx.needs_input_grad
        x2 = x.reshape(-1, x.shape[-1])
        g2 = gy.reshape(-1, gy.shape[-1])
        rows, d_out = g2.shape

        gx = None
        fold = need[0] and not any(ps) and rows > d_out and _can_fold(weight, factors)
        if need[0]:
            w = _folded(weight, transposed, factors, scales) if fold else weight
            gx = g2 @ (w.T if transposed else w)
        gw = None
        if need[1]:
            gw = x2.T @ g2 if transposed else g2.T @ x2
        gbias = g2.sum(0) if has_bias and need[2] else None

        gfactors: list[torch.Tensor | None] = []
        for i, s in enumerate(scales):
            a, b = factors[2 * i], factors[2 * i + 1]
            need_a, need_b = need[6 + 2 * i], need[7 + 2 * i]
            keep = next(keeps) if ps[i] > 0 else None
            if keep is not None:
                s = s * next(rescales)
                keep = unpack_mask(keep, x2.shape, a.dtype)
            gl = g2.to(b.dtype)
            # (H^T dY)^T: MKL is about twice as fast at this layout than at dY^T H
            gb = torch.mm(hs[i].T, gl).T.mul_(s) if need_b else None
            ga = None
            lora_gx = gx is not None and not fold
            if need_a or lora_gx:
                # dY B (N x r) as dY (B^T)^T: with B^T stored r-major MKL runs this skinny product
                # about 2x faster than with B itself (measured at N=832, d_out=384 and 1536)
                gh = F.linear(gl, b.T.contiguous())
                if need_a:
                    xi = x2.to(a.dtype)
                    ga = torch.mm(gh.T, xi if keep is None else xi.mul(keep)).mul_(s)
                if lora_gx:
                    if keep is None and a.dtype == gx.dtype:
                        gx.addmm_(gh, a, alpha=s)
                    else:
                        part = gh @ a
                        if keep is None:
                            gx.add_(part.to(gx.dtype), alpha=s)
                        elif a.dtype == gx.dtype:
                            gx.addcmul_(part, keep, value=s)
                        else:
                            gx.add_(part.mul_(keep).to(gx.dtype), alpha=s)
            gfactors += [ga, gb]
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
