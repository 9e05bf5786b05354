"""Data-dependent initialisations that start from the base weight.

PiSSA and OLoRA put the principal part of ``W`` into the factors and leave the
residual in the base weight, so ``W_res + s * B A == W`` right after attach:
the model's output is unchanged, but the base weight *is* modified (``unload``
then returns the residual, not the original weight).
"""

from __future__ import annotations

import torch


def _weight_matrix(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    w = weight.detach().float()
    return w.T if transposed else w


def _store(weight: torch.Tensor, a, b, new_a, new_b, residual, transposed: bool) -> None:
    with torch.no_grad():
        a.copy_(new_a.to(a.dtype))
        b.copy_(new_b.to(b.dtype))
        weight.copy_((residual.T if transposed else residual).to(weight.dtype))


def pissa_init(weight: torch.Tensor, a, b, scale: float, transposed: bool = False,
               iterations: int | None = None) -> None:
    """A, B from the top-r singular triplets of W (Meng et al., 2024); with ``iterations``, from a randomized SVD
    with that many subspace iterations (much faster for large W, approximate)."""
    w = _weight_matrix(weight, transposed)
    r = a.shape[0]
    if iterations is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
    else:
        u, s, v = torch.svd_lowrank(w, q=r, niter=iterations)
        vh = v.T
    root = (s[:r] / scale).sqrt()
    new_a = root[:, None] * vh[:r]
    new_b = u[:, :r] * root[None, :]
    _store(weight, a, b, new_a, new_b, w - scale * new_b @ new_a, transposed)


def olora_init(weight: torch.Tensor, a, b, scale: float, transposed: bool = False) -> None:
    """A, B from the first r columns of the QR decomposition of W (Büyükakyüz, 2024)."""
    w = _weight_matrix(weight, transposed)
    r = a.shape[0]
    q, rmat = torch.linalg.qr(w)
    new_a, new_b = rmat[:r], q[:, :r]
    _store(weight, a, b, new_a, new_b, w - scale * new_b @ new_a, transposed)
