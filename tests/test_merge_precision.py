"""Merging into bf16/fp16 weights and unmerging again gives back the base weights bit for bit."""

import pytest
import torch
from torch import nn

import lorafit
from lorafit import LoraConfig
from lorafit.model import lora_layers
from tests.models import ALL_KINDS, Mixed

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
LOW = [torch.bfloat16, torch.float16]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _mlp(device, dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8)).to(device, dtype)


def _llama(device, dtype=torch.bfloat16):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(device, dtype).eval()


def _attach(model, name, targets, dora=False, r=4, alpha=8):
    # init_lora_weights=False: random A and B, so every delta is non-zero.
    lorafit.attach(model, LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False, use_dora=dora,
                                     target_modules=targets), name)
    if dora:  # a magnitude that differs from ||W + s B A||, so the merge really rescales
        with torch.no_grad():
            for _, layer in lora_layers(model):
                if name in getattr(layer, "lora_magnitude_vector", {}):
                    layer.lora_magnitude_vector[name].mul_(1.3)


def _weights(model, paths):
    # A wrapper forwards .weight to its base layer, so the same path works before and after attaching.
    return {p: model.get_submodule(p).weight.detach().clone() for p in paths}


def _assert_bitwise(model, expected):
    for path, w in expected.items():
        assert torch.equal(model.get_submodule(path).weight, w), path


def _logits(model, device):
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merge_unmerge_restores_weights_bitwise(device, dtype, dora):
    model = _mlp(device, dtype)
    paths = ["0", "2", "4"]
    original = _weights(model, paths)
    _attach(model, "default", paths, dora=dora)
    lorafit.merge(model)
    assert all(not torch.equal(model.get_submodule(p).weight, w) for p, w in original.items())
    lorafit.unmerge(model)
    _assert_bitwise(model, original)
    assert all(not layer._premerge for _, layer in lora_layers(model))  # copy dropped when unmerged


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW)
def test_every_layer_kind_restores_bitwise(device, dtype):
    """Embedding, Conv1d, Conv2d, GPT-2 Conv1D (transposed layout) and Linear, with DoRA on the linear ones."""
    torch.manual_seed(0)
    model = Mixed().to(device, dtype)
    original = _weights(model, ALL_KINDS)
    _attach(model, "plain", ["embed", "conv1", "conv2"])
    _attach(model, "dora", ["proj", "mlp.0", "mlp.2"], dora=True)
    lorafit.set_active(model, ["plain", "dora"])
    lorafit.merge(model)
    lorafit.unmerge(model)
    _assert_bitwise(model, original)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("first", ["a", "b"])
def test_two_adapters_unmerged_one_then_the_other(device, dtype, dora, first):
    model = _mlp(device, dtype).eval()
    paths = ["0", "2", "4"]
    original = _weights(model, paths)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    _attach(model, "a", paths, dora=dora)
    _attach(model, "b", paths, alpha=4)
    lorafit.set_active(model, ["a", "b"])
    lorafit.merge(model)
    lorafit.unmerge(model, first)
    other = "b" if first == "a" else "a"
    if not dora:  # what stays is the original plus the other adapter's delta, rounded once
        for path, w in original.items():
            layer = model.get_submodule(path)
            assert torch.equal(layer.weight, (w.float() + layer.delta_weight(other)).to(dtype)), path
    lorafit.set_active(model, other)
    with torch.no_grad():
        merged_other = model(x)
        lorafit.unmerge(model, other)
        _assert_bitwise(model, original)
        torch.testing.assert_close(merged_other, model(x), atol=0.03, rtol=0.02)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_disabled_on_a_merged_llama_is_the_base_model(device, dora):
    model = _llama(device)
    base = _logits(model, device)
    _attach(model, "default", LLAMA_TARGETS, dora=dora, r=8, alpha=4)
    unmerged = _logits(model, device)
    assert not torch.equal(unmerged, base)
    lorafit.merge(model)
    merged = _logits(model, device)
    # bf16 rounding of the merged weights, against bf16 rounding of the separate low-rank path
    scale = unmerged.abs().max()
    assert (merged - unmerged).abs().max() <= 0.02 * scale
    with lorafit.disabled(model):
        assert torch.equal(_logits(model, device), base)
    assert torch.equal(_logits(model, device), merged)  # merged back to the very same weights
    lorafit.unmerge(model)
    with lorafit.disabled(model):
        assert torch.equal(_logits(model, device), base)


@pytest.mark.parametrize("device", DEVICES)
def test_kept_copy_is_not_saved_and_merge_and_unload_keeps_none(device):
    model = _llama(device)
    _attach(model, "default", LLAMA_TARGETS)
    keys = set(model.state_dict())
    layers = [layer for _, layer in lora_layers(model)]
    lorafit.merge(model)
    assert set(model.state_dict()) == keys
    assert all("weight" in layer._premerge for layer in layers)
    expected = _logits(model, device)
    lorafit.merge_and_unload(model)
    assert torch.equal(_logits(model, device), expected)
    assert all(not layer._premerge for layer in layers)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW)
def test_safe_merge_refuses_non_finite_and_keeps_nothing(device, dtype):
    model = _mlp(device, dtype)
    _attach(model, "default", ["0"])
    layer = model.get_submodule("0")
    with torch.no_grad():
        # finite in float32 but past the fp16 range, or inf outright for bf16
        layer.lora_B["default"][0, 0] = 1e6 if dtype == torch.float16 else float("inf")
    before = layer.weight.clone()
    with pytest.raises(ValueError, match="would put NaN or inf"):
        lorafit.merge(model, safe=True)
    assert torch.equal(layer.weight, before)
    assert layer.merged == [] and not layer._premerge


@pytest.mark.parametrize("device", DEVICES)
def test_float32_merge_keeps_no_copy(device):
    model = _mlp(device, torch.float32)
    original = _weights(model, ["0", "2", "4"])
    _attach(model, "default", ["0", "2", "4"])
    lorafit.merge(model)
    assert all(not layer._premerge for _, layer in lora_layers(model))
    lorafit.unmerge(model)
    for path, w in original.items():
        torch.testing.assert_close(model.get_submodule(path).weight, w, atol=1e-6, rtol=1e-5)
