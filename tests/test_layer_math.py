"""Property tests: every layer kind computes base + s * B A exactly as the formula says."""

import math

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorafit
from lorafit import LoraConfig

DTYPES = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 6e-2}
dims = st.integers(1, 24)
ranks = st.integers(1, 8)
dtypes = st.sampled_from(list(DTYPES))


def _close(a, b, dtype):
    tol = DTYPES[dtype]
    scale = max(1.0, b.abs().max().item())
    torch.testing.assert_close(a.double(), b.double(), atol=tol * scale, rtol=tol)


def _wrap(layer, r, alpha, rslora=False):
    model = nn.Sequential(layer)
    lorafit.attach(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"], use_rslora=rslora,
                                     init_lora_weights=False))
    return model, model[0]


@given(d_in=dims, d_out=dims, r=ranks, alpha=st.sampled_from([1, 8, 16]), rslora=st.booleans(),
       batch=st.integers(1, 5), dtype=dtypes, seed=st.integers(0, 2**16))
def test_linear_formula(d_in, d_out, r, alpha, rslora, batch, dtype, seed):
    torch.manual_seed(seed)
    model, layer = _wrap(nn.Linear(d_in, d_out).to(dtype), r, alpha, rslora)
    x = torch.randn(batch, 3, d_in, dtype=dtype)
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    s = alpha / math.sqrt(r) if rslora else alpha / r
    w, bias = layer.base_layer.weight, layer.base_layer.bias
    expected = x.double() @ w.double().T + bias.double() + s * (x.double() @ a.double().T) @ b.double().T
    _close(model(x), expected, dtype)
    lorafit.merge(model)
    _close(model(x), expected, dtype)


@given(d_in=dims, d_out=dims, r=ranks, dtype=dtypes, seed=st.integers(0, 2**16))
def test_gpt2_conv1d_formula(d_in, d_out, r, dtype, seed):
    torch.manual_seed(seed)
    conv = Conv1D(d_out, d_in).to(dtype)
    nn.init.normal_(conv.weight)
    model, layer = _wrap(conv, r, 4)
    assert layer.fan_in_fan_out and layer.lora_A["default"].shape == (r, d_in)
    x = torch.randn(2, d_in, dtype=dtype)
    a, b = layer.lora_A["default"].double(), layer.lora_B["default"].double()
    expected = x.double() @ conv.weight.double() + conv.bias.double() + (4 / r) * (x.double() @ a.T) @ b.T
    _close(model(x), expected, dtype)
    lorafit.merge(model)
    _close(model(x), expected, dtype)


@given(num=st.integers(2, 30), dim=dims, r=ranks, dtype=dtypes, seed=st.integers(0, 2**16))
def test_embedding_formula(num, dim, r, dtype, seed):
    torch.manual_seed(seed)
    model, layer = _wrap(nn.Embedding(num, dim).to(dtype), r, 2)
    ids = torch.randint(0, num, (3, 5))
    a, b = layer.lora_embedding_A["default"].double(), layer.lora_embedding_B["default"].double()
    table = layer.base_layer.weight.double() + (2 / r) * (b @ a).T
    _close(model(ids), table[ids], dtype)
    lorafit.merge(model)
    _close(model(ids), table[ids], dtype)


@given(c_in=st.integers(1, 6), c_out=st.integers(1, 6), k=st.integers(1, 3), stride=st.integers(1, 2),
       r=ranks, two_d=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_conv_formula(c_in, c_out, k, stride, r, two_d, dtype, seed):
    torch.manual_seed(seed)
    cls, conv = (nn.Conv2d, nn.functional.conv2d) if two_d else (nn.Conv1d, nn.functional.conv1d)
    base = cls(c_in, c_out, k, stride=stride, padding=k // 2).to(dtype)
    model, layer = _wrap(base, r, 3)
    x = torch.randn(2, c_in, *([7, 6] if two_d else [9]), dtype=dtype)
    a, b = layer.lora_A["default"].double(), layer.lora_B["default"].double()
    w = base.weight.double() + (3 / r) * (b.flatten(1) @ a.flatten(1)).view(base.weight.shape)
    expected = conv(x.double(), w, base.bias.double(), stride=stride, padding=k // 2)
    _close(model(x), expected, dtype)
    lorafit.merge(model)
    _close(model(x), expected, dtype)


@given(d_in=dims, d_out=dims, r=ranks, seed=st.integers(0, 2**16))
def test_linear_gradients_match_formula(d_in, d_out, r, seed):
    torch.manual_seed(seed)
    model, layer = _wrap(nn.Linear(d_in, d_out).double(), r, 8)
    x = torch.randn(4, d_in, dtype=torch.float64, requires_grad=True)
    model(x).sin().sum().backward()
    a = layer.lora_A["default"].detach().clone().requires_grad_(True)
    b = layer.lora_B["default"].detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    w, bias = layer.base_layer.weight, layer.base_layer.bias
    (x2 @ w.T + bias + (8 / r) * (x2 @ a.T) @ b.T).sin().sum().backward()
    torch.testing.assert_close(layer.lora_A["default"].grad, a.grad)
    torch.testing.assert_close(layer.lora_B["default"].grad, b.grad)
    torch.testing.assert_close(x.grad, x2.grad)
    assert w.grad is None
