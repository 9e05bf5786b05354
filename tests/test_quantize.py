import copy

import pytest
import torch
from torch import nn

import lorafit
from lorafit import LoraConfig
from lorafit.kernels import dequantize as dq
from lorafit.quantize import NF4, QuantizedLinear, quantize_base, quantize_int8, quantize_nf4


def _reference_nf4(weight, block):
    """Straightforward per-element nearest-level NF4, to check the vectorised code against."""
    levels = torch.tensor(NF4)
    blocks = weight.reshape(-1, block)
    absmax = blocks.abs().amax(1, keepdim=True)
    codes = (blocks / absmax).unsqueeze(-1).sub(levels).abs().argmin(-1)
    return codes.flatten(), absmax.flatten()


def test_nf4_codes_match_nearest_level_reference():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    packed, absmax = quantize_nf4(w, 64)
    codes_ref, absmax_ref = _reference_nf4(w, 64)
    codes = torch.stack((packed >> 4, packed & 15), -1).flatten().long()
    assert torch.equal(codes, codes_ref)
    torch.testing.assert_close(absmax, absmax_ref)
    deq = dq.dequantize(packed, absmax, 4, 64, w.shape, torch.float32)
    # error bounded by half the widest gap between NF4 levels, times the block's absmax
    gap = max(b - a for a, b in zip(NF4, NF4[1:])) / 2
    assert ((deq - w).abs().view(-1, 64) <= gap * absmax[:, None] + 1e-6).all()
    assert (deq - w).abs().mean() < 0.1 * w.abs().mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_dequantization_in_slices_is_the_formula_bit_for_bit(dtype, monkeypatch):
    """The torch-ops path works a few whole blocks at a time (bounded temporaries); the last slice is partial."""
    monkeypatch.setattr(dq, "_SLICE", 3 * 64)
    torch.manual_seed(0)
    w = torch.randn(40, 80)  # 50 blocks of 64: 16 slices of 3 blocks and one of 2
    packed, absmax = quantize_nf4(w, 64)
    codes = torch.stack((packed >> 4, packed & 15), -1).flatten().long()
    want = (torch.tensor(NF4)[codes].view(-1, 64) * absmax[:, None]).view(40, 80).to(dtype)
    assert torch.equal(dq.dequantize(packed, absmax, 4, 64, (40, 80), dtype), want)
    int8, absmax = quantize_int8(w, 64)
    want = (int8.view(-1, 64).float() * (absmax[:, None] / 127)).view(40, 80).to(dtype)
    assert torch.equal(dq.dequantize(int8, absmax, 8, 64, (40, 80), dtype), want)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("double_quant", [True, False])
def test_quantized_linear_forward_and_backward(bits, double_quant):
    torch.manual_seed(0)
    lin = nn.Linear(256, 128)
    q = QuantizedLinear(lin, bits=bits, double_quant=double_quant)
    assert q.double_quant == double_quant  # 512 blocks of 64: a multiple of 256
    w = q.dequantize()
    rel = ((w - lin.weight).norm() / lin.weight.norm()).item()
    assert rel < (0.12 if bits == 4 else 0.01)
    x = torch.randn(5, 256, requires_grad=True)
    y = q(x)
    torch.testing.assert_close(y, nn.functional.linear(x, w, lin.bias))
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ w)
    stored = sum(b.numel() * b.element_size() for b in q.buffers())
    assert stored < lin.weight.numel() * lin.weight.element_size() / (7 if bits == 4 else 3.5)


def test_lora_on_nf4_base_trains_and_merges_into_a_float_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 8))
    quantize_base(model, bits=4, skip=("4",))
    assert isinstance(model[0], QuantizedLinear) and type(model[4]) is nn.Linear
    lorafit.attach(model, LoraConfig(r=4, target_modules=["0", "2"], modules_to_save=["4"]))
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in params)
    opt = torch.optim.AdamW(params, lr=1e-2)
    x, y = torch.randn(64, 64), torch.randint(0, 8, (64,))
    first = None
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first
    assert model[0].base_layer.codes.dtype == torch.uint8  # the base stayed quantized
    with pytest.raises(ValueError, match="cannot merge into a quantized base layer"):
        lorafit.merge(model)
    expected = model(x)
    with lorafit.disabled(model):  # nothing merged, so nothing to merge back into the codes afterwards
        base = model(x)
    assert not torch.allclose(base, expected, atol=1e-2)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    merged = lorafit.merge_and_unload(model)
    assert all(type(m) is nn.Linear for m in merged if not isinstance(m, nn.ReLU))
    torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)


def test_block_size_that_does_not_fit_is_named():
    model = nn.Sequential(nn.Linear(10, 7))
    before = copy.deepcopy(model)
    with pytest.raises(ValueError,
                       match=r"0: a weight of shape \[7, 10\] \(70 values\) does not split into blocks of 64"):
        quantize_base(model, skip=())
    assert type(model[0]) is nn.Linear and torch.equal(model[0].weight, before[0].weight)
    with pytest.raises(ValueError, match="bits must be 4"):
        QuantizedLinear(nn.Linear(64, 64), bits=3)


def test_bfloat16_compute():
    torch.manual_seed(0)
    q = QuantizedLinear(nn.Linear(64, 64), compute_dtype=torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert q(x).dtype == torch.bfloat16


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_dora_on_a_quantized_base_dequantizes_once_beside_the_base_forward(dropout, monkeypatch):
    """DoRA needs W for its norms (and, with dropout, for the dropped input's base output): one dequantization
    serves all of that; the base layer's own forward dequantizes once more."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    quantize_base(model, bits=4, skip=())
    lorafit.attach(model, LoraConfig(r=4, target_modules=["0"], use_dora=True, lora_dropout=dropout))
    x = torch.randn(8, 64, requires_grad=True)
    expected = model.eval()(x)
    calls = []
    original = QuantizedLinear.dequantize
    monkeypatch.setattr(QuantizedLinear, "dequantize", lambda self, *a: calls.append(1) or original(self, *a))
    torch.testing.assert_close(model(x), expected)
    assert len(calls) == 2
    calls.clear()
    model.train()(x).sum().backward()
    assert len(calls) == 2 + 1  # + the base's backward for dx


@pytest.mark.parametrize("bits", [4, 8])
def test_adding_and_loading_adapters_dequantizes_nothing(bits, tmp_path, monkeypatch):
    """An adapter's factors need the base's dtype and device, not its weight: a server that loads adapters onto a
    quantized base all day must not dequantize every layer for each (the temporaries fragmented its heap: a
    MiniLM server's RSS grew by hundreds of MB over its first ten adapters)."""
    torch.manual_seed(0)
    model = quantize_base(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)), bits=bits, skip=())
    calls = []
    original = QuantizedLinear.dequantize
    monkeypatch.setattr(QuantizedLinear, "dequantize", lambda self, *a: calls.append(1) or original(self, *a))
    config = LoraConfig(r=4, target_modules=["0", "2"])
    lorafit.attach(model, config, "first")
    lorafit.attach(model, config, "second")
    lorafit.save_adapter(model, tmp_path / "first", "first")
    lorafit.load_adapter(model, tmp_path / "first", "third")
    assert calls == []
    assert {a.dtype for _, a in model.named_parameters() if "lora_A" in _} == {torch.float32}
    model(torch.randn(2, 64))
    assert len(calls) == 2  # the forward reads each base weight once
    calls.clear()
    lorafit.attach(model, LoraConfig(r=4, target_modules=["0", "2"], use_dora=True), "dora")
    assert len(calls) == 2  # DoRA's magnitude is the weight's norm: one read of each


def test_dora_rows_on_a_quantized_base_keep_their_norms_between_forwards(monkeypatch):
    """A mixed batch caches DoRA's per-row norms keyed on the base's codes, not on a weight that each read
    dequantizes anew: after the first forward, each layer dequantizes only for its own base output."""
    torch.manual_seed(0)
    model = quantize_base(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)), bits=4, skip=())
    lorafit.attach(model, LoraConfig(r=4, target_modules=["0", "2"], use_dora=True, init_lora_weights=False), "dora")
    lorafit.attach(model, LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False), "plain")
    x = torch.randn(3, 64)
    rows = ["dora", "plain", None]
    with torch.no_grad(), lorafit.adapter_per_row(model, rows):
        mixed = model(x)
    with torch.no_grad():
        for i, name in enumerate(rows[:2]):
            lorafit.set_active(model, name)
            torch.testing.assert_close(mixed[i], model(x[i:i + 1])[0])
        with lorafit.disabled(model):
            torch.testing.assert_close(mixed[2], model(x[2:])[0])
    calls = []
    original = QuantizedLinear.dequantize
    monkeypatch.setattr(QuantizedLinear, "dequantize", lambda self, *a: calls.append(1) or original(self, *a))
    with torch.no_grad(), lorafit.adapter_per_row(model, rows):
        torch.testing.assert_close(model(x), mixed)
    assert len(calls) == 2
