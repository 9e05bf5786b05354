"""The fused Linear paths compute exactly the plain formula: forward, and gradients of A, B and x."""

import shutil

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorafit
from lorafit import LoraConfig
from lorafit.kernels import cpu as cpu_kernels
from lorafit.kernels import mask as dropout_mask
from lorafit.layers.base import LoraLayer

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
       torch.float64: dict(atol=1e-10, rtol=1e-10)}


def _layer(base, adapters, dtype, dropout=0.0, adapter_dtype=None):
    model = nn.Sequential(base.to(dtype))
    for name, r in adapters:
        lorafit.attach(model, LoraConfig(r=r, lora_alpha=2 * r + 1, lora_dropout=dropout, target_modules=["0"],
                                         init_lora_weights=False), name, dtype=adapter_dtype)
    lorafit.set_active(model, [n for n, _ in adapters])
    for p in model.parameters():
        p.requires_grad_(".lora_" in _name_of(model, p))
    return model


def _name_of(model, param):
    return next(n for n, p in model.named_parameters() if p is param)


def _reference(layer, x, masks, factors=None):
    """base(x) + sum s * B A (mask * x) by plain autograd, in x's dtype, with no fused code."""
    base = layer.base_layer
    w = base.weight.T if layer.fan_in_fan_out else base.weight
    out = nn.functional.linear(x, w.to(x.dtype), None if base.bias is None else base.bias.to(x.dtype))
    for name in layer.active:
        a, b = factors[name] if factors else (layer.lora_A[name], layer.lora_B[name])
        xi = x.to(a.dtype)
        if name in masks:
            keep, rescale = masks[name]
            xi = xi * keep.view(xi.shape).to(xi.dtype) * rescale
        out = out + ((xi @ a.T @ b.T) * layer.scaling[name]).to(out.dtype)
    return out


def _compare(model, x, dropout, dtype):
    """Fused output and gradients in ``dtype`` against a float64 reference from the same values."""
    layer = model[0]
    model.train()
    torch.manual_seed(123)
    x1 = x.clone().requires_grad_(True)
    out = model(x1)
    assert "LoraLinear" in type(out.grad_fn).__name__  # the fused path really ran
    g = torch.randn_like(out)
    out.backward(g)
    torch.manual_seed(123)  # the fused path draws one mask key per adapter with dropout, in order
    masks = {}
    for n in layer.active if dropout else ():
        t, rescale = dropout_mask.threshold(layer.dropout[n])
        keep = dropout_mask.keep_mask(x.numel() // x.shape[-1], x.shape[-1], dropout_mask.new_key(x.device), t)
        masks[n] = (keep, rescale)
    factors = {n: (layer.lora_A[n].detach().double().requires_grad_(True),
                   layer.lora_B[n].detach().double().requires_grad_(True)) for n in layer.active}
    x2 = x.detach().double().requires_grad_(True)
    ref = _reference(layer, x2, masks, factors)
    ref.backward(g.double())
    pairs = [(out, ref), (x1.grad, x2.grad)]
    for n in layer.active:
        for mine, theirs in zip((layer.lora_A[n], layer.lora_B[n]), factors[n]):
            if mine.requires_grad:
                pairs.append((mine.grad, theirs.grad))
    for got, want in pairs:
        tol = TOL[got.dtype]
        # absolute tolerance relative to the tensor's scale: low precision errors grow with magnitude
        torch.testing.assert_close(got.double(), want, atol=tol["atol"] * max(1.0, want.abs().max().item()),
                                   rtol=tol["rtol"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("gpt2", [False, True])
@pytest.mark.parametrize("rows", [5, 40])  # 40 rows > d_in, d_out: the folded forward and backward
def test_training_path_matches_formula(dtype, dropout, gpt2, rows):
    base = Conv1D(24, 16) if gpt2 else nn.Linear(16, 24)
    if gpt2:
        nn.init.normal_(base.weight, std=0.2)
    model = _layer(base, [("a", 4), ("b", 2), ("c", 12)], dtype, dropout)  # r 12: C only with a mask
    x = torch.randn(rows // 5, 5, 16, dtype=dtype)
    _compare(model, x, dropout, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("gpt2", [False, True])
def test_accelerator_implementation_matches_formula(dtype, dropout, gpt2, monkeypatch):
    """The implementation GPUs run (cuBLAS products added in place, masks in Triton there), run here on CPU
    tensors, where its masked products take the C or torch ops: the same math, checked in CI."""
    from lorafit.kernels import linear

    monkeypatch.setattr(linear, "cpu_path", lambda x: False)
    base = Conv1D(24, 16) if gpt2 else nn.Linear(16, 24)
    if gpt2:
        nn.init.normal_(base.weight, std=0.2)
    model = _layer(base, [("a", 4), ("b", 2), ("c", 12)], dtype, dropout)
    _compare(model, torch.randn(8, 5, 16, dtype=dtype), dropout, dtype)
    model.zero_grad()
    model[0].lora_A["a"].requires_grad_(False)  # a frozen adapter next to trained ones
    _compare(model, torch.randn(8, 5, 16, dtype=dtype), dropout, dtype)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("rows", [5, 40])
def test_training_path_without_bias(dropout, rows):
    """The output starts as the low-rank sum alone when the base layer has no bias (as in Llama)."""
    model = _layer(nn.Linear(16, 24, bias=False), [("a", 4), ("b", 2)], torch.float32, dropout)
    _compare(model, torch.randn(rows // 5, 5, 16), dropout, torch.float32)


def test_float32_adapters_on_bfloat16_base():
    model = _layer(nn.Linear(16, 24), [("a", 4)], torch.bfloat16, 0.1, adapter_dtype=torch.float32)
    _compare(model, torch.randn(7, 16, dtype=torch.bfloat16), 0.1, torch.bfloat16)


def test_dropout_really_drops_and_is_repeatable():
    model = _layer(nn.Linear(64, 64), [("a", 8)], torch.float32, 0.5).train()
    x = torch.randn(32, 64)
    torch.manual_seed(5)
    y1 = model(x)
    torch.manual_seed(5)
    y2 = model(x)
    torch.manual_seed(6)
    y3 = model(x)
    assert torch.equal(y1, y2) and not torch.allclose(y1, y3)
    model.eval()
    assert torch.allclose(model(x), _reference(model[0], x, {}), atol=1e-5)


@pytest.mark.parametrize("rows", [1, 4, 500])  # below and above the fold-into-weight threshold
@pytest.mark.parametrize("gpt2", [False, True])
def test_inference_paths_match_formula(rows, gpt2):
    base = Conv1D(24, 16) if gpt2 else nn.Linear(16, 24)
    model = _layer(base, [("a", 4), ("b", 3)], torch.float32).eval()
    x = torch.randn(rows, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _reference(model[0], x, {}), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_inference_that_folds_gives_the_merged_models_output(dtype):
    """Without gradients a bf16/fp16 layer folds W + s B A when that is cheaper: the merged model's numbers, to
    the last bit of the folded weight (a 16-bit GEMM may round its sum once or twice)."""
    model = _layer(nn.Linear(64, 96), [("a", 8)], dtype).eval()
    x = torch.randn(500, 64, dtype=dtype)  # 500 (64 + 96) > 64 x 96: the folded path
    with torch.no_grad():
        got = model(x)
        lorafit.merge(model)
        merged = model(x)
        lorafit.unmerge(model)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got.float(), merged.float(), atol=4 * eps, rtol=4 * eps)
    with torch.no_grad():
        few = x[:3]  # below the threshold: the low-rank path, to bf16 rounding
        torch.testing.assert_close(model(few).double(), _reference(model[0], few.double(), {},
                                   {n: (model[0].lora_A[n].double(), model[0].lora_B[n].double()) for n in ["a"]}),
                                   atol=0.05, rtol=0.05)


def test_base_weight_gradients_when_base_is_trainable():
    model = _layer(nn.Linear(8, 6), [("a", 2)], torch.float64)
    for p in model.parameters():
        p.requires_grad_(True)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    model(x).pow(2).sum().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    _reference(model[0], x, {}).pow(2).sum().backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_hooks_on_the_base_layer_still_run():
    model = _layer(nn.Linear(8, 6), [("a", 2)], torch.float32)
    calls = []
    model[0].base_layer.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(2, 8)
    torch.testing.assert_close(model(x), _reference(model[0], x, {}))
    assert calls == [1]


def test_frozen_adapter_with_dropout_next_to_a_trained_one():
    # backward must pair each adapter with its own saved mask even when one needs no gradient
    model = _layer(nn.Linear(16, 24), [("a", 4), ("b", 2)], torch.float64, 0.3)
    model[0].lora_A["a"].requires_grad_(False)
    model[0].lora_B["a"].requires_grad_(False)
    _compare(model, torch.randn(6, 16, dtype=torch.float64), 0.3, torch.float64)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_torch_compile_fullgraph_has_no_graph_breaks(dropout):
    # aot_eager traces forward and backward like inductor does, without the C++ compile time
    torch._dynamo.reset()
    model = _layer(nn.Linear(16, 24), [("a", 4)], torch.float32, dropout)
    model[0].lora_A["a"].requires_grad_(True)
    x = torch.randn(5, 16, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(7)  # aot_eager draws the same masks as eager from the same seed
    out = compiled(x)
    out.square().sum().backward()
    got, got_x = model[0].lora_A["a"].grad.clone(), x.grad.clone()
    model.zero_grad()
    x.grad = None
    torch.manual_seed(7)
    want = model(x)
    want.square().sum().backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(got, model[0].lora_A["a"].grad)
    torch.testing.assert_close(got_x, x.grad)
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(x), model.eval()(x))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_autocast_runs_the_fused_path_with_autocasts_numbers(dropout, bias):
    check_autocast("cpu", dropout, bias)


def check_autocast(device: str, dropout: float, bias: bool) -> None:
    """float32 weights under bf16 autocast (mixed-precision training): the fused path runs on what autocast
    would cast to bf16, its gradients come back in float32, and the numbers are the formula's to bf16
    rounding, and without dropout those of the plain path under autocast."""
    model = _layer(nn.Linear(16, 24, bias=bias), [("a", 4), ("b", 2)], torch.float32, dropout).to(device).train()
    layer = model[0]
    x = torch.randn(40, 16, device=device)
    g = torch.randn(40, 24, device=device)
    x1 = x.clone().requires_grad_(True)
    torch.manual_seed(3)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = model(x1)
    assert out.dtype == torch.bfloat16 and "LoraLinear" in type(out.grad_fn).__name__
    out.backward(g.bfloat16())
    grads = {n: (layer.lora_A[n].grad.clone(), layer.lora_B[n].grad.clone()) for n in layer.active}
    assert x1.grad.dtype == torch.float32 and all(t.dtype == torch.float32 for pair in grads.values() for t in pair)

    torch.manual_seed(3)  # one key per adapter with dropout, in order, as _compare redraws them
    masks = {}
    for n in layer.active if dropout else ():
        t, rescale = dropout_mask.threshold(layer.dropout[n])
        masks[n] = (dropout_mask.keep_mask(40, 16, dropout_mask.new_key(x.device), t), rescale)
    factors = {n: (layer.lora_A[n].detach().double().requires_grad_(True),
                   layer.lora_B[n].detach().double().requires_grad_(True)) for n in layer.active}
    x2 = x.double().requires_grad_(True)
    ref = _reference(layer, x2, masks, factors)
    ref.backward(g.double())
    pairs = [(out, ref), (x1.grad, x2.grad)] + [(mine, theirs.grad) for n in layer.active
                                                for mine, theirs in zip(grads[n], factors[n])]
    for got, want in pairs:  # bf16 rounding, relative to each tensor's scale as in _compare
        torch.testing.assert_close(got.double(), want, atol=3e-2 * max(1.0, want.abs().max().item()), rtol=3e-2)
    if not dropout:
        with torch.autocast(device, dtype=torch.bfloat16):
            plain = LoraLayer.forward(layer, x)  # base(x), then each adapter added, autocast casting op by op
        torch.testing.assert_close(out.float(), plain.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_dropout_keep_rate_and_rescale(p):
    cpu = torch.device("cpu")
    t, rescale = dropout_mask.threshold(p)
    assert abs(1 / rescale - (1 - p)) < 2 ** -16  # p is used to 16 bits and the rescale matches it exactly
    torch.manual_seed(0)
    keep = dropout_mask.keep_mask(1000, 1001, dropout_mask.new_key(cpu), t)
    assert keep.dtype == torch.bool and keep.shape == (1000, 1001)
    assert abs(keep.float().mean().item() - (1 - p)) < 3e-3  # ~6 standard deviations at 1e6 draws
    for axis in (0, 1):  # no row or column keeps at a rate of its own (1000 draws each: 6 sd ~ 0.09)
        assert (keep.float().mean(axis) - (1 - p)).abs().max() < 0.09


def test_dropout_masks_are_independent_across_keys_and_neighbours():
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    t, _ = dropout_mask.threshold(0.5)
    m1, m2 = (dropout_mask.keep_mask(512, 384, dropout_mask.new_key(cpu), t).float().flatten() for _ in range(2))
    bound = 6 / 512  # ~6 standard deviations of a correlation over 196k pairs
    assert abs(torch.corrcoef(torch.stack([m1, m2]))[0, 1]) < bound  # two adapters of one input
    assert abs(torch.corrcoef(torch.stack([m1[:-1], m1[1:]]))[0, 1]) < bound  # neighbouring elements
    assert abs(torch.corrcoef(torch.stack([m1[:-384], m1[384:]]))[0, 1]) < bound  # neighbouring rows


def test_keep_mask_is_the_documented_hash():
    """keep_mask against lowbias32's two rounds written out in Python integers, position by position: a
    key's mask is the formula dropout_mask documents, whatever computes it (C, compiled or eager ops)."""
    m32 = 0xFFFFFFFF
    for p, key in [(0.1, -7), (0.5, 123456789), (0.9, -(1 << 31))]:
        t, _ = dropout_mask.threshold(p)
        rows, cols = 3, 7
        want = []
        for i in range(rows * cols):
            v = (i ^ key) & m32
            v = ((v ^ (v >> 16)) * 0x7FEB352D) & m32
            v = ((v ^ (v >> 15)) * 0x846CA68B) & m32
            want.append((v - (1 << 32) if v >= 1 << 31 else v) >= t)
        got = dropout_mask.keep_mask(rows, cols, torch.tensor(key, dtype=torch.int32), t)
        assert got.flatten().tolist() == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dropout_kernels_equal_the_eager_ops(dtype):
    """The C kernel (CPU) gives the eager reference's masks bit for bit, with and without a rescale."""
    torch.manual_seed(0)
    key = dropout_mask.new_key(torch.device("cpu"))
    t, _ = dropout_mask.threshold(0.3)
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler:  # with a C compiler the C kernel must build and run
        assert cpu_kernels.library() is not None
    for rows, cols in [(37, 19), (64, 384)]:  # odd sizes: the vector loops' tails
        x = torch.randn(rows, cols + 5, dtype=dtype)[:, 2:-3]  # rows with a stride of their own
        keep = dropout_mask.keep_mask(rows, cols, key, t)
        assert 0.6 < keep.float().mean() < 0.8
        assert torch.equal(dropout_mask.dropped(x, key, t), torch.where(keep, x, 0))
        assert torch.equal(dropout_mask.dropped(x, key, t, 1.25), torch.where(keep, x * 1.25, 0))
        xt = torch.randn(cols, rows, dtype=dtype).T  # columns with a stride: the kernel reads a contiguous copy
        assert torch.equal(dropout_mask.dropped(xt, key, t), torch.where(keep, xt, 0))


def test_keep_mask_positions_wrap_at_2_to_the_32():
    """Position row * cols + col is taken mod 2^32 at any size: rows past 2^32 elements repeat the first ones."""
    key, (t, _) = torch.tensor(99, dtype=torch.int32), dropout_mask.threshold(0.5)
    cols = 1 << 16  # 2^16 rows of 2^16 columns are 2^32 elements
    first = dropout_mask.keep_mask(3, cols, key, t)
    assert torch.equal(dropout_mask.keep_mask(3, cols, key, t, first_row=1 << 16), first)
    # and rows around 2^31 elements are the hash of their positions, as in the C and Triton kernels
    m32 = 0xFFFFFFFF
    row = (1 << 31) // cols - 1
    got = dropout_mask.keep_mask(2, cols, key, t, first_row=row).flatten()
    for j in (0, cols - 1, cols, 2 * cols - 1):
        v = ((row * cols + j) ^ 99) & m32
        v = ((v ^ (v >> 16)) * 0x7FEB352D) & m32
        v = ((v ^ (v >> 15)) * 0x846CA68B) & m32
        assert bool(got[j]) == ((v - (1 << 32) if v >= 1 << 31 else v) >= t)


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="needs a C compiler")
@pytest.mark.parametrize("masked", [True, False])
def test_c_lora_products_equal_the_plain_formula(masked):
    """The float32 C products, with and without a fused mask, against float64 ops on the same mask."""
    torch.manual_seed(0)
    assert cpu_kernels.library() is not None
    key, (t, _) = dropout_mask.new_key(torch.device("cpu")), dropout_mask.threshold(0.3)
    args = (int(key), t) if masked else (None, 0)
    # odd sizes for the vector loops' tails, r below, at and past a block of 8; fewer rows than
    # grad_a's block of 4; columns past one panel of grad_a's accumulators; grad_b's fixed blocks of
    # rows: one up to 127 rows, three at 200
    shapes = [(37, 19, 3), (64, 384, 8), (50, 101, 13), (5, 8, 16), (3, 24, 8), (9, 1100, 13), (200, 40, 8)]
    for rows, cols, r in shapes:
        x = torch.randn(rows, cols + 5)[:, 2:-3]  # rows with a stride of their own
        a, g, total, bias = torch.randn(r, cols), torch.randn(rows, r), torch.randn(rows, cols), torch.randn(cols)
        keep = dropout_mask.keep_mask(rows, cols, key, t) if masked else torch.ones(rows, cols, dtype=torch.bool)
        xd = torch.where(keep, x, 0).double()
        close = dict(rtol=1e-5, atol=1e-5 * cols ** 0.5)
        torch.testing.assert_close(cpu_kernels.lora_down(x, a, *args).double(), xd @ a.double().T, **close)
        torch.testing.assert_close(cpu_kernels.lora_grad_a(g, x, *args).double(), g.double().T @ xd, **close)
        if not masked:  # backward's products of dY: dY B and H^T dY, with x as dY and A^T as B
            gh, gbt = cpu_kernels.lora_grad_b(x, a, g)
            assert torch.equal(gh, cpu_kernels.lora_down(x, a, None, 0))  # the same sums in the same order
            torch.testing.assert_close(gbt.double(), g.double().T @ xd, **close)
        ad, gd = a.double(), g.double()
        want = total.double() + 0.7 * torch.where(keep, gd @ ad, 0)
        out = torch.zeros(rows, cols + 1)
        out[:, 1:] = total
        got = cpu_kernels.lora_up(g, a, 0.7, out[:, 1:], None, *args)  # in place, through a row stride
        assert got.data_ptr() == out[:, 1:].data_ptr() and torch.equal(out[:, 0], torch.zeros(rows))
        torch.testing.assert_close(got.double(), want, **close)
        # a new output: bias + s mask(G A), or without a bias
        up = cpu_kernels.lora_up(g, a, 0.7, None, bias, *args)
        torch.testing.assert_close(up.double(), bias.double() + 0.7 * torch.where(keep, gd @ ad, 0), **close)
        torch.testing.assert_close(cpu_kernels.lora_up(g, a, 2.0, None, None, *args).double(),
                                   2.0 * torch.where(keep, gd @ ad, 0), **close)
        # or a matrix start (a weight to fold into), read through a row stride
        start = torch.zeros(rows, cols + 1)
        start[:, 1:] = total
        torch.testing.assert_close(cpu_kernels.lora_up(g, a, 0.7, None, start[:, 1:], *args).double(), want, **close)
        assert torch.equal(start[:, 1:], total)
        # sums run in a fixed order: the thread count does not change a bit (1 against 3, whatever the
        # machine has, so the check means something on a 1-core runner too)
        threads = torch.get_num_threads()
        runs = []
        try:
            for n in (1, 3):
                torch.set_num_threads(n)
                runs.append([cpu_kernels.lora_down(x, a, *args), cpu_kernels.lora_grad_a(g, x, *args),
                             cpu_kernels.lora_up(g, a, 0.7, None, bias, *args), *cpu_kernels.lora_grad_b(x, a, g)])
        finally:
            torch.set_num_threads(threads)
        for one, three in zip(*runs):
            assert torch.equal(one, three)


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="needs a C compiler")
def test_c_kernels_raise_when_their_scratch_memory_cannot_be_had():
    """Asked for scratch space of 2^58 columns (more than any address space), the kernels fail before
    they read an input, and the caller gets a MemoryError instead of a write through a null pointer."""
    lib = cpu_kernels.library()
    p, huge = torch.zeros(64).data_ptr(), 1 << 58
    with pytest.raises(MemoryError, match="lorafit_lora_grad_b"):
        lib.lorafit_lora_grad_b(p, huge, p, p, p, p, 64, huge, 1, 1)
    with pytest.raises(MemoryError, match="lorafit_lora_down"):  # the masked row's buffer
        lib.lorafit_lora_down(p, huge, p, p, 1, huge, 1, 1, 0, 0, 1)


def test_dropout_without_a_c_compiler_warns_and_gives_the_same_masks(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels, "_library", None)  # forget the built kernel, build again without a compiler
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "cache"))
    key, (t, _) = torch.tensor(11, dtype=torch.int32), dropout_mask.threshold(0.5)
    x = torch.randn(8, 16)
    with pytest.warns(UserWarning, match="CPU kernels are unavailable.*no-such-cc"):
        got = dropout_mask.dropped(x, key, t)
    assert torch.equal(got, torch.where(dropout_mask.keep_mask(8, 16, key, t), x, 0))
    assert cpu_kernels.library() is None and not list((tmp_path / "cache").glob("*"))  # nothing half-built kept
