"""torch's fused encoder path reads the layers' weights directly: with adapters inside, it must not run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorafit


def encoder() -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, activation="gelu")
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)


X = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
PADDING = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
KEPT = ~PADDING  # the fused path zeroes padded positions, the unfused one computes them: compare the others


def randomize(model) -> None:
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.normal_(std=0.2)


@pytest.mark.parametrize("padding", [None, PADDING])
def test_inference_applies_adapters_the_fused_encoder_path_would_skip(padding):
    model = lorafit.attach(encoder(), lorafit.LoraConfig(r=4, target_modules=["linear1", "linear2"]))
    randomize(model)
    kept = KEPT if padding is not None else torch.ones_like(KEPT)
    training = model.train()(X, src_key_padding_mask=padding)
    model.eval()
    with torch.no_grad():
        inference = model(X, src_key_padding_mask=padding)
        with lorafit.disabled(model):
            base = model(X, src_key_padding_mask=padding)
        reference = encoder().eval()(X, src_key_padding_mask=padding)  # fused, where torch takes it
    torch.testing.assert_close(inference[kept], training[kept], rtol=1e-5, atol=1e-5)
    assert (inference[kept] - reference[kept]).abs().max() > 1e-2
    torch.testing.assert_close(base[kept], reference[kept], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("remove", ["unload", "merge_and_unload", "detach"])
def test_the_fused_path_comes_back_when_the_last_adapter_goes(remove):
    model = encoder()
    flags = [layer.activation_relu_or_gelu for layer in model.layers]
    assert flags == [2, 2] and model.use_nested_tensor
    lorafit.attach(model, lorafit.LoraConfig(r=2, target_modules=["linear1"], layers_to_transform=[1]), "a")
    # only the layer holding an adapter, and the encoder above it, lose their fused path
    assert [layer.activation_relu_or_gelu for layer in model.layers] == [2, 0] and not model.use_nested_tensor
    lorafit.attach(model, lorafit.LoraConfig(r=2, target_modules=["linear2"]), "b")
    assert [layer.activation_relu_or_gelu for layer in model.layers] == [0, 0]
    if remove == "detach":
        lorafit.detach(model, "a")
        assert [layer.activation_relu_or_gelu for layer in model.layers] == [0, 0]  # "b" is still there
        lorafit.detach(model, "b")
    else:
        model = getattr(lorafit, remove)(model)
    assert [layer.activation_relu_or_gelu for layer in model.layers] == flags and model.use_nested_tensor
    assert "_lorafit_fused_paths" not in model.__dict__


def test_a_deep_copy_restores_its_own_modules():
    original = lorafit.attach(encoder(), lorafit.LoraConfig(r=2, target_modules=["linear1"]), "a")
    copy = __import__("copy").deepcopy(original)
    lorafit.attach(copy, lorafit.LoraConfig(r=2, target_modules=["linear2"]), "b")
    lorafit.unload(copy)
    assert [layer.activation_relu_or_gelu for layer in copy.layers] == [2, 2] and copy.use_nested_tensor
    assert [layer.activation_relu_or_gelu for layer in original.layers] == [0, 0]  # the original keeps its adapter
