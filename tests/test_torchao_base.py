"""LoRA on linear layers whose weight is one of torchao's quantized tensors (int8 and float8 weight-only through
``quantize_``, NF4 as torchtune's QLoRA builds it): the base computes through torchao, the adapter beside it.
Checked against a twin model whose plain weights are the dequantized ones."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

torchao = pytest.importorskip("torchao")

from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_  # noqa: E402
from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4  # noqa: E402

import lorafit  # noqa: E402
from lorafit.quantized_base import dense_weight, is_quantized  # noqa: E402


def _nf4(model: nn.Module) -> None:
    for module in model.modules():
        if type(module) is nn.Linear:
            module.weight = nn.Parameter(to_nf4(module.weight.detach()), requires_grad=False)


QUANTIZERS = {
    "int8": lambda m: quantize_(m, Int8WeightOnlyConfig()),
    "float8": lambda m: quantize_(m, Float8WeightOnlyConfig()),
    "nf4": _nf4,
}
# float32: the two models differ only by rounding; bfloat16: by a few of its ulps
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def mlp(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)  # NF4 needs weights of whole 64 x 256-element blocks
    return nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128, bias=False)).to(dtype)


def quantized_and_twin(kind: str, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    """The model with torchao weights, and a plain one with those weights dequantized."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = mlp(dtype)
        QUANTIZERS[kind](quantized)
    twin = mlp(dtype)
    with torch.no_grad():
        for q, plain in zip(quantized.modules(), twin.modules()):
            if isinstance(q, nn.Linear):
                assert is_quantized(q) and type(q.weight).__module__.startswith("torchao.")
                plain.weight.copy_(dense_weight(q))
    return quantized, twin


def same_adapter(config: lorafit.LoraConfig, *models: nn.Module) -> None:
    """Attach ``config`` to each model, with one set of non-zero factors."""
    for model in models:
        lorafit.attach(model, config)
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for _, p in sorted(model.named_parameters()):
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype] * want.abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", sorted(QUANTIZERS))
def test_lora_on_a_torchao_base_computes_and_trains_as_on_its_dequantized_weights(kind, dtype):
    quantized, twin = quantized_and_twin(kind, dtype)
    codes = [copy.deepcopy(m.weight) for m in quantized.modules() if isinstance(m, nn.Linear)]
    # no dropout: the twin's fused path and the torchao layer's draw their masks differently
    config = lorafit.LoraConfig(r=4, target_modules=["0", "2"])
    same_adapter(config, quantized, twin)
    assert lorafit.trainable_parameters(quantized).total == lorafit.trainable_parameters(twin).total

    x = torch.randn(6, 128, dtype=dtype)
    for model in (quantized, twin):
        model.eval()
    with torch.no_grad():
        assert_close(quantized(x), twin(x), dtype)
    grads = []
    for model in (quantized, twin):
        model.train()
        model(x).float().square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 4
    for name in grads[0]:
        assert_close(grads[0][name], grads[1][name], dtype)
    torch.optim.AdamW([p for p in quantized.parameters() if p.requires_grad], lr=1e-2).step()
    now = [m.weight for m in quantized.modules() if isinstance(m, nn.Linear) and not hasattr(m, "base_layer")]
    for before, after in zip(codes, now):  # the base stays as torchao stored it
        assert type(after) is type(before)
        torch.testing.assert_close(dense_weight_of(after), dense_weight_of(before), atol=0, rtol=0)


def dense_weight_of(weight: torch.Tensor) -> torch.Tensor:
    layer = nn.Linear(1, 1)
    layer.weight = weight
    return dense_weight(layer)


def test_merging_into_torchao_codes_is_refused_and_merge_and_unload_dequantizes():
    quantized, twin = quantized_and_twin("int8", torch.float32)
    same_adapter(lorafit.LoraConfig(r=4, target_modules=["0", "2"]), quantized, twin)
    x = torch.randn(6, 128)
    with torch.no_grad():
        want = twin(x)
        with pytest.raises(ValueError, match="cannot merge into a quantized base layer"):
            lorafit.merge(quantized)
        assert not lorafit.merged_adapters(quantized)
        merged = lorafit.merge_and_unload(quantized)
        assert all(type(m.weight) is nn.Parameter for m in merged.modules() if isinstance(m, nn.Linear))
        assert_close(merged(x), want, torch.float32)


def test_dora_and_adapter_per_row_on_a_torchao_base_match_the_dequantized_twin():
    quantized, twin = quantized_and_twin("float8", torch.float32)
    for model in (quantized, twin):
        lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=["0", "2"], use_dora=True))
        lorafit.attach(model, lorafit.LoraConfig(r=2, target_modules=["0", "2"]), "other")
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for name, p in sorted(model.named_parameters()):
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1 + ("magnitude" in name))
        lorafit.set_active(model, "default")
    x = torch.randn(4, 128)
    rows = ["default", "other", None, "other"]
    with torch.no_grad():
        assert_close(quantized(x), twin(x), torch.float32)
        with lorafit.adapter_per_row(quantized, rows):
            got = quantized(x)
        with lorafit.adapter_per_row(twin, rows):
            want = twin(x)
    assert_close(got, want, torch.float32)


def test_a_saved_adapter_reloads_onto_a_torchao_model_to_the_same_outputs(tmp_path):
    quantized, _ = quantized_and_twin("int8", torch.float32)
    same_adapter(lorafit.LoraConfig(r=4, target_modules=["0", "2"]), quantized)
    lorafit.save_adapter(quantized, tmp_path / "a")
    other, _ = quantized_and_twin("int8", torch.float32)
    lorafit.load_adapter(other, tmp_path / "a")
    x = torch.randn(3, 128)
    with torch.no_grad():
        torch.testing.assert_close(other(x), quantized(x), atol=0, rtol=0)


def test_what_rewrites_or_requantizes_the_weight_is_refused_on_a_torchao_base():
    quantized, _ = quantized_and_twin("int8", torch.float32)
    with pytest.raises(ValueError, match="rewrites the base weight, and this layer is quantized"):
        lorafit.attach(quantized, lorafit.LoraConfig(r=4, target_modules=["0"], init_lora_weights="pissa"))
    with pytest.raises(ValueError, match="KaSA"):
        lorafit.attach(quantized, lorafit.LoraConfig(r=4, target_modules=["0"], kasa_config={}))
    assert not lorafit.adapter_configs(quantized)
    from lorafit.quantize import quantize_base

    with pytest.raises(ValueError, match="found no nn.Linear layer to quantize"):
        quantize_base(quantized)
