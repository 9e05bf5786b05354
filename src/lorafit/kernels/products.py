"""The skinny products of the LoRA path, with an optional dropout mask fused in, and the one place that
picks which implementation runs them.

For x (N x d_in), A (r x d_in), G (N x r) and a mask given by (key, t) from mask.py (key None: no mask):

    down(x, A)              = mask(x) A^T              the N x r input of B
    grad_a(G, x, s)         = s G^T mask(x)            A's gradient
    grad_b(dY, B, H)        = (dY B, H^T dY)           A's path back, and B's gradient before scaling
    up(H, B, s, start=bias) = bias + s H B^T           the output, before x W^T adds into it
    up(G, A^T, s, out=gx)   = gx + s mask(G A)         the low-rank part of dx
    up(B, A^T, s, start=W)  = W + s B A                a weight with the adapter folded in
    grad_a_and_up(G, x, A)  = grad_a and up over one mask  a masked adapter's backward, one Triton launch

Which implementation (``backend``):
- ``"c"``: float32 on a CPU, small r: cpu_kernels.c, one loop per product that reads the activation once and
  applies the mask as it goes. Those loops beat MKL's skinny products at small r only (see the ranks below).
- ``"triton"``: a product with a mask on CUDA: triton_kernels.py, the mask applied inside the product, so no
  dropped copy is written or read.
- ``"torch"``: everything else (cuBLAS on CUDA without a mask, MKL on a CPU, any other device), with
  mask.dropped writing the dropped copy where a mask is needed.
"""

from __future__ import annotations

import torch

from lorafit.kernels import cpu, mask, triton_kernels

# Ranks up to which the C loops win (N = 800 and 2048 rows, d = 384 and 1536): with a mask to fuse,
# through r = 16 (down 2.1x and 1.3x faster than mask-then-MKL, grad_a 2.1x and 1.3x); without one,
# through r = 8 (down 1.4-2.0x, grad_a 1.0-1.4x faster than MKL). At r = 32 MKL wins either way.
# Adding G A into an existing tensor runs in C only with a mask: without one, MKL's addmm_ is 2x
# faster. A new output (bias + s H B^T, or W + s B A) is written in C in one pass either way.
_MAX_RANK_MASKED, _MAX_RANK_PLAIN = 16, 8


def backend(r: int, key, *tensors: torch.Tensor | None, triton: bool = True) -> str:
    """"c", "triton" or "torch": which implementation runs a product of rank r over these tensors (not "triton"
    where ``triton`` is False)."""
    first = tensors[0]  # every caller's first tensor is given
    device = first.device
    if device.type == "cpu" and r <= (_MAX_RANK_PLAIN if key is None else _MAX_RANK_MASKED) and _all_dtype(
            tensors, torch.float32) and cpu.serves(first):
        return "c"
    if triton and key is not None and triton_kernels.serves_rank(r) and triton_kernels.available(device) and (
            not _any_dtype(tensors, torch.float64)) and not cpu.serves(first):
        return "triton"
    return "torch"


# loops rather than all() and any() over generators: backend runs for every masked product
def _all_dtype(tensors, dtype: torch.dtype) -> bool:
    for x in tensors:
        if x is not None and x.dtype is not dtype:
            return False
    return True


def _any_dtype(tensors, dtype: torch.dtype) -> bool:
    for x in tensors:
        if x is not None and x.dtype is dtype:
            return True
    return False


def _ints(key, t) -> tuple:
    return (None, 0) if key is None else (int(key), t)


def down(x: torch.Tensor, a: torch.Tensor, key=None, t: int = 0) -> torch.Tensor:
    """mask(x) A^T, in A's dtype."""
    where = backend(a.shape[0], key, x, a)
    if where == "c":
        return cpu.lora_down(x, a, *_ints(key, t))
    if where == "triton" and (h := triton_kernels.run(triton_kernels.down, x, a, key, t)) is not None:
        return h
    x = x.to(a.dtype)
    # where the kernel was tried and is still being compiled, the mask runs as torch ops too (see grad_a_and_up)
    return (x if key is None else mask.dropped(x, key, t, triton=where != "triton")) @ a.T


def up(h: torch.Tensor, b: torch.Tensor, s: float, out: torch.Tensor | None = None,
       start: torch.Tensor | None = None, dtype: torch.dtype | None = None, key=None, t: int = 0,
       triton: bool = True) -> torch.Tensor:
    """out + s mask(H B^T), formed in out; where out is None, a new tensor start + s mask(H B^T) in ``dtype``
    (default B's), start being None (zeros), a bias vector or a matrix of the output's shape."""
    dtype = out.dtype if out is not None else dtype or b.dtype
    where = backend(b.shape[1], key, h, b, out, start, triton=triton)
    if (where == "c" and dtype == torch.float32 and (out is None or (key is not None and out.stride(-1) == 1))
            and (start is None or start.stride(-1) == 1)):
        return cpu.lora_up(h, b.T, s, out, start, *_ints(key, t))
    tried = where == "triton" and start is None and (out is None or out.stride(-1) == 1)
    if tried and (done := triton_kernels.run(triton_kernels.up, h, b.T, s, out, dtype, key, t)) is not None:
        return done
    if key is not None:
        part = mask.dropped((h @ b.T).mul_(s), key, t, triton=triton and not tried)
        if out is not None:
            return out.add_(part)
        part = part.to(dtype)
        return part if start is None else part.add_(start)
    if out is not None:
        return out.addmm_(h, b.T, alpha=s) if b.dtype == out.dtype else out.add_((h @ b.T).to(out.dtype), alpha=s)
    if start is not None and b.dtype == dtype == start.dtype:
        return torch.addmm(start, h, b.T, alpha=s)
    part = (h @ b.T).mul_(s).to(dtype)
    return part if start is None else part.add_(start)


def grad_a(g: torch.Tensor, x: torch.Tensor, key=None, t: int = 0, scale: float = 1.0,
           triton: bool = True) -> torch.Tensor:
    """scale G^T mask(x), in G's dtype: a new tensor."""
    where = backend(g.shape[1], key, g, x, triton=triton)
    if where == "c":
        out = cpu.lora_grad_a(g, x, *_ints(key, t))
    elif where == "triton" and (out := triton_kernels.run(triton_kernels.grad_a, g, x, key, t, scale)) is not None:
        return out  # the scale applied inside: no launch of its own
    else:
        x = x.to(g.dtype)
        out = torch.mm(g.T, x if key is None else mask.dropped(x, key, t, triton=triton and where != "triton"))
    return out.mul_(scale) if scale != 1.0 else out


def grad_a_and_up(g: torch.Tensor, x: torch.Tensor, a: torch.Tensor, key, t: int, scale_a: float, scale_up: float,
                  out: torch.Tensor | None = None, dtype: torch.dtype | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_a(G, x, key, t, scale_a), up(G, A^T, scale_up, out, None, dtype, key, t)): A's gradient and dx's
    low-rank part of a masked adapter. On CUDA one Triton kernel computes both (one launch, one hash of the
    mask per tile); elsewhere the two products above.

    Where that kernel was tried and is still being compiled (triton_warmup.py), the two products and their
    masks run as torch ops: asking the warm-up helper for their kernels too would queue variants that later
    steps never launch ahead of the ones they do."""
    tried = backend(g.shape[1], key, g, x, a, out) == "triton" and (out is None or out.stride(-1) == 1)
    if tried and (done := triton_kernels.run(triton_kernels.grad_a_and_up, g, x, a, key, t, scale_a, scale_up, out,
                                             dtype)) is not None:
        return done
    return (grad_a(g, x, key, t, scale_a, triton=not tried),
            up(g, a.T, scale_up, out, None, dtype, key, t, triton=not tried))


def grad_b(g: torch.Tensor, b: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dY B, H^T dY), in B's dtype: the two products backward takes of dY, from one pass over it in C."""
    if backend(b.shape[1], None, g, b, h) == "c":
        return cpu.lora_grad_b(g, b.T, h)
    if g.device.type == "cpu":
        # dY (B^T)^T: with B^T stored r-major MKL runs this skinny product about 2x faster than with B itself
        return down(g, b.T.contiguous()), grad_a(h, g)
    return g @ b, h.T @ g
