"""LoftQ (init_lora_weights="loftq"): the quantized base and the factors that start on it, exact through
quantize_base, saving and loading, and lorafit train's QLoRA order; plus the base-rewriting inits on a
quantized base (PiSSA), which start from the full-precision weights too."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import lorafit
from lorafit.layers import Linear, LoraLayer
from lorafit.quantize import QuantizedLinear, quantize_base, quantized_weight

transformers = pytest.importorskip("transformers")

IDS = torch.tensor([[1, 3, 5, 7, 9, 9, 2], [7, 0, 3, 4, 8, 9, 6]])


def llama(dtype=torch.float32):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def logits(model):
    with torch.no_grad():
        return model(IDS.to(model.lm_head.weight.device)).logits.float().cpu()


def low_rank_plus_noise(d_out=128, d_in=64, rank=4, seed=0):
    """A weight like a trained one: a few strong directions over a noise floor, so r can take up much of it."""
    g = torch.Generator().manual_seed(seed)
    strong = torch.randn(d_out, rank, generator=g) @ torch.randn(rank, d_in, generator=g) * 0.3
    return strong + 0.02 * torch.randn(d_out, d_in, generator=g)


def config(**kwargs):
    return lorafit.LoraConfig(**{"r": 4, "lora_alpha": 16, "target_modules": "all-linear",
                                 "init_lora_weights": "loftq", **kwargs})


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_weight_is_a_fixed_point_of_the_quantizer(bits):
    w = low_rank_plus_noise()
    q = quantized_weight(w, bits)
    assert (q - w).abs().max() > 0  # it did quantize
    torch.testing.assert_close(quantized_weight(q, bits), q, rtol=1e-6, atol=0)
    stored = QuantizedLinear(_linear(q), bits, double_quant=False)
    torch.testing.assert_close(stored.dequantize(torch.float32), q, rtol=1e-6, atol=0)


def _linear(weight):
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("alpha", [4, 16])
def test_loftq_starts_nearer_the_weight_than_the_quantized_weight_alone(bits, alpha):
    w = low_rank_plus_noise()
    errors = {}
    for iterations in (1, 4):
        layer = Linear(_linear(w))
        layer.add_adapter("default", r=4, scale=alpha / 4, init=lorafit.config.LoftQ(bits, iterations))
        q = layer.base_layer.weight.detach()
        # the base holds a point of the quantization grid, which quantize_base keeps as it is
        torch.testing.assert_close(quantized_weight(q, bits), q, rtol=1e-6, atol=0)
        start = q + layer.scaling["default"] * layer.lora_B["default"] @ layer.lora_A["default"]
        errors[iterations] = (start - w).norm().item()
    plain = (quantized_weight(w, bits) - w).norm().item()
    # a rank-4 signal: the factors take up the part of the error the quantizer made on it, at any alpha (PEFT's
    # factors ignore the scale, which overshoots unless lora_alpha = r)
    assert errors[1] < 0.9 * plain, (errors, plain)
    assert errors[4] < errors[1], errors


def test_loftq_on_a_model_then_quantize_base_keeps_its_weights_exactly():
    model = llama()
    reference = logits(model)
    qlora = quantize_base(copy.deepcopy(model), 4, double_quant=False)
    lorafit.attach(model, config())
    start = logits(model)
    # nearer the float model than QLoRA's start (the quantized base with B = 0)
    assert (start - reference).abs().mean() < (logits(qlora) - reference).abs().mean()
    grids = {n: m.base_layer.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    quantize_base(model, 4)  # double quantization asked for: LoftQ's layers keep their grid without it
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            assert isinstance(module.base_layer, QuantizedLinear) and not module.base_layer.double_quant
            assert torch.equal(module.base_layer.dequantize(torch.float32), grids[name]), name
    assert type(model.lm_head) is nn.Linear  # the head is skipped as before
    torch.testing.assert_close(logits(model), start, rtol=0, atol=1e-5)


def test_loftq_refuses_what_would_lose_its_compensation():
    model = llama()
    lorafit.attach(model, config(loftq_config={"loftq_bits": 4, "loftq_iter": 2}))
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.base_layer: LoftQ quantized this weight "
                                         r"to 4 bits; quantize_base\(bits=8\).*use bits=4"):
        quantize_base(model, 8)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # nothing was quantized

    quantized = quantize_base(llama(), 4)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj: init_lora_weights='loftq' needs the "
                                         r"full-precision weight.*before quantize_base"):
        lorafit.attach(quantized, config())
    with pytest.raises(ValueError, match=r"q_proj: init_lora_weights='pissa' rewrites the base weight, and this "
                                         r"layer is quantized"):
        lorafit.attach(quantized, config(init_lora_weights="pissa"))
    assert not lorafit.adapter_configs(quantized)

    # a target that cannot be quantized is found before any weight is rewritten
    odd = llama()
    odd.model.layers[1].mlp.down_proj = nn.Linear(127, 63, bias=False)  # 8001 values: not whole blocks of 64
    weights = {n: p.clone() for n, p in odd.named_parameters()}
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.down_proj: init_lora_weights='loftq': a weight of "
                                         r"shape \[63, 127\] does not split into quantization blocks of 64"):
        lorafit.attach(odd, config(target_modules=["q_proj", "down_proj"]))
    assert all(torch.equal(weights[n], p) for n, p in odd.named_parameters())
    with pytest.raises(ValueError, match="init_lora_weights='loftq' is supported for nn.Linear layers, not Embedding"):
        lorafit.attach(llama(), config(target_modules=["embed_tokens"]))

    for bad, message in [({"loftq_bits": 3}, r"loftq_config.loftq_bits must be 4 \(NF4\) or 8 \(int8\), got 3"),
                         ({"loftq_iter": 0}, "loftq_config.loftq_iter must be an integer >= 1, got 0"),
                         ({"bits": 4}, r"loftq_config: unknown keys \['bits'\]")]:
        with pytest.raises(ValueError, match=message):
            config(loftq_config=bad)
    with pytest.raises(ValueError, match="loftq_config is used only with init_lora_weights='loftq'"):
        config(init_lora_weights=True, loftq_config={"loftq_bits": 4})


def test_a_saved_loftq_adapter_loads_onto_the_original_weights_and_quantizes_to_the_same_model(tmp_path):
    model = llama()
    lorafit.attach(model, config(loftq_config={"loftq_bits": 4, "loftq_iter": 2}))
    with torch.no_grad():  # a trained adapter
        for name, p in lorafit.adapter_parameters(model, "default").items():
            p.add_(torch.randn_like(p) * 0.05)
    quantize_base(model, 4)
    lorafit.save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "loftq" and saved["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2}
    peft = pytest.importorskip("peft")
    assert peft.LoraConfig.from_pretrained(tmp_path / "adapter").loftq_config == saved["loftq_config"]

    fresh = llama()  # the original full-precision weights: loading runs LoftQ on them again
    lorafit.load_adapter(fresh, tmp_path / "adapter")
    quantize_base(fresh, 4)
    torch.testing.assert_close(logits(fresh), logits(model), rtol=0, atol=1e-5)
    # merge_and_unload gives the trained model as plain float weights
    merged = lorafit.merge_and_unload(fresh)
    assert not any(isinstance(m, QuantizedLinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged), logits(model), rtol=0, atol=1e-4)

    with pytest.raises(ValueError, match="as_plain_lora: 'default' is a LoftQ adapter"):
        lorafit.save_adapter(model, tmp_path / "plain", as_plain_lora=True)


def test_loftq_on_bfloat16_weights():
    model = llama(torch.bfloat16)
    reference = logits(llama())
    lorafit.attach(model, config())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    start = logits(model)
    quantize_base(model, 4)
    # the grid point rounded to bf16 quantizes back to the same codes: the same model up to bf16 rounding
    torch.testing.assert_close(logits(model), start, rtol=0, atol=0.05)
    assert (start - reference).abs().mean() < 0.05


def test_lorafit_train_starts_loftq_and_pissa_on_full_precision_weights_and_quantizes_after(tmp_path):
    from lorafit.train import evaluate, train
    from lorafit.train.run import load_run
    from tests.test_train_support import classification_setup

    for init, extra in (("loftq", "lora.loftq_config={loftq_bits=4, loftq_iter=1}"), ("pissa", None)):
        root = tmp_path / init
        root.mkdir()
        config_path = classification_setup(root)
        overrides = ["model.quantize=4", f'lora.init_lora_weights="{init}"', "train.epochs=2"]
        summary = train(config_path, overrides + ([extra] if extra else []), progress=False)
        prep = load_run(root / "run", None, None)
        bases = [m.base_layer for m in prep.model.modules() if isinstance(m, LoraLayer)]
        assert bases and all(isinstance(b, QuantizedLinear) for b in bases)
        if init == "loftq":  # LoftQ's grid is kept as it is: no double quantization
            assert not any(b.double_quant for b in bases)
        else:  # what was quantized is PiSSA's residual, not the weight (the principal part is in the factors)
            original = transformers.AutoModel.from_pretrained(prep.config.model.name)
            w = original.encoder.layer[0].attention.self.query.weight
            residual = prep.model.bert.encoder.layer[0].attention.self.query.base_layer.dequantize(torch.float32)
            assert (residual - w).norm() > 0.3 * w.norm()
        again = evaluate(root / "run", "validation")
        assert again["eval_loss"] == pytest.approx(summary["validation"]["eval_loss"], abs=1e-5)
    with pytest.raises(ValueError, match=r"lora.loftq_config loftq_bits = 4 fits a base quantized to 4 bits, and "
                                         r"model.quantize = 8"):
        train(config_path, ["model.quantize=8", 'lora.init_lora_weights="loftq"'], progress=False)
