"""Data-dependent initialisations that start from the base weight.

PiSSA and OLoRA put the principal part of ``W`` into the factors and leave the
residual in the base weight, so ``W_res + s * B A == W`` right after attach:
the model's output is unchanged, but the base weight *is* modified (``unload``
then returns the residual, not the original weight). LoftQ replaces ``W`` by
its quantized form ``Q`` and lets ``s * B A`` take up as much of ``W - Q`` as
rank r can, so ``Q + s * B A`` is nearer ``W`` than ``Q`` alone. MiCA only
reads ``W``: B spans its least used output directions and A starts at zero.
"""

from __future__ import annotations

import torch

from lorafit.quantize import quantized_weight


def _weight_matrix(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    w = weight.detach().float()
    return w.T if transposed else w


def _store(weight: torch.Tensor, a, b, new_a, new_b, residual, transposed: bool) -> None:
    with torch.no_grad():
        a.copy_(new_a.to(a.dtype))
        b.copy_(new_b.to(b.dtype))
        weight.copy_((residual.T if transposed else residual).to(weight.dtype))


def _top_r(w: torch.Tensor, r: int, scale: float, iterations: int | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """A, B with ``s * B A`` the best rank-r approximation of ``w`` (its top-r singular triplets, the root of
    each singular value in each factor); with ``iterations``, from a randomized SVD."""
    if iterations is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
    else:
        u, s, v = torch.svd_lowrank(w, q=r, niter=iterations)
        vh = v.T
    root = (s[:r] / scale).sqrt()
    return root[:, None] * vh[:r], u[:, :r] * root[None, :]


def pissa_init(weight: torch.Tensor, a, b, scale: float, transposed: bool = False,
               iterations: int | None = None) -> None:
    """A, B from the top-r singular triplets of W (Meng et al., 2024); with ``iterations``, from a randomized SVD
    with that many subspace iterations (much faster for large W, approximate)."""
    w = _weight_matrix(weight, transposed)
    new_a, new_b = _top_r(w, a.shape[0], scale, iterations)
    _store(weight, a, b, new_a, new_b, w - scale * new_b @ new_a, transposed)


def loftq_init(weight: torch.Tensor, a, b, scale: float, bits: int, iterations: int, block_size: int,
               where: str = "weight") -> None:
    """LoftQ (Li et al., 2023): Q = quantized(W - s B A) and s B A = top-r SVD of W - Q, alternated
    ``iterations`` times from B A = 0; W is replaced by Q. Unlike PEFT's, the factors carry 1/s, so
    ``Q + s B A`` approximates W at any lora_alpha."""
    w = weight.detach().float()
    r = a.shape[0]
    target = w
    for _ in range(iterations):
        q = quantized_weight(target, bits, block_size, where)
        new_a, new_b = _top_r(w - q, r, scale)
        target = w - scale * new_b @ new_a
    _store(weight, a, b, new_a, new_b, q, transposed=False)


def olora_init(weight: torch.Tensor, a, b, scale: float, transposed: bool = False) -> None:
    """A, B from the first r columns of the QR decomposition of W (Büyükakyüz, 2024)."""
    w = _weight_matrix(weight, transposed)
    r = a.shape[0]
    q, rmat = torch.linalg.qr(w)
    new_a, new_b = rmat[:r], q[:, :r]
    _store(weight, a, b, new_a, new_b, w - scale * new_b @ new_a, transposed)


def mica_init(weight: torch.Tensor, a, b, transposed: bool = False) -> None:
    """MiCA (Minor Component Adaptation): B the left singular vectors of W's r smallest singular values, A = 0, so
    B A = 0 and W stays as it is. Only A trains (``attach`` freezes B)."""
    w = _weight_matrix(weight, transposed)
    u = torch.linalg.svd(w, full_matrices=False)[0]
    with torch.no_grad():
        a.zero_()
        b.copy_(u[:, -a.shape[0]:].to(b.dtype))


def kasa_truncate_(weight: torch.Tensor, r: int) -> None:
    """KaSA (Wang et al., 2024): W loses its r smallest singular components, in place: the adapter learns in the
    space they leave."""
    with torch.no_grad():
        u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
        keep = s.numel() - r
        weight.copy_(((u[:, :keep] * s[:keep]) @ vh[:keep]).to(weight.dtype))
