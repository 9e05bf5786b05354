"""lora_bias: B with a bias of its own, ``W x + b0 + s (B A x + b)``, as PEFT's ``lora_B.bias``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorafit

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

IDS = torch.tensor([[1, 3, 5, 7, 9, 9, 2], [7, 0, 3, 4, 8, 9, 6]])
TARGETS = ["q_proj", "v_proj", "down_proj"]


def llama(dtype=torch.float32, bias: bool = True):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, attention_bias=bias,
                                      mlp_bias=bias)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def randomize(model, seed: int = 1):
    """Factors and biases unlike their start, so that every part changes the output."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.normal_(std=0.1)


def test_the_layer_adds_the_scaled_bias_in_the_fused_and_the_plain_path():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    layer = lorafit.layers.Linear(copy.deepcopy(base))
    layer.add_adapter("default", r=4, scale=0.5, init=False, bias=True)
    layer.set_active(["default"])
    a, b, bias = layer.lora_A["default"], layer.lora_B["default"], layer.lora_B_bias["default"]
    assert bias.shape == (12,) and bias.abs().max() > 0  # init False: random, like B
    x = torch.randn(3, 5, 16, requires_grad=True)
    y = layer(x)
    want = base(x) + 0.5 * (x @ a.T @ b.T + bias)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(bias.grad, 0.5 * g.sum((0, 1)), rtol=1e-5, atol=1e-5)
    # a base layer with a forward hook takes the unfused path: the same output and gradient
    hooked = lorafit.layers.Linear(copy.deepcopy(base))
    hooked.add_adapter("default", r=4, scale=0.5, init=None, bias=True)
    hooked.load_state_dict(layer.state_dict())
    hooked.set_active(["default"])
    hooked.base_layer.register_forward_hook(lambda module, args, out: out)
    assert not hooked._fusable()
    y2 = hooked(x.detach())
    torch.testing.assert_close(y2, want, rtol=1e-5, atol=1e-6)
    y2.backward(g)
    torch.testing.assert_close(hooked.lora_B_bias["default"].grad, bias.grad, rtol=1e-5, atol=1e-5)


def test_a_base_layer_without_bias_gets_the_adapters_bias_and_refuses_to_merge_it():
    model = lorafit.attach(llama(bias=False), lorafit.LoraConfig(r=2, target_modules=TARGETS, lora_bias=True,
                                                                  init_lora_weights=False))
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        for p in (layer.lora_A["default"], layer.lora_B["default"]):
            p.zero_()  # only the bias changes the output
    x = torch.randn(2, 32)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + layer.scaling["default"] * layer.lora_B_bias["default"])
    # a model whose other layers have biases: none merges before the refusal
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.base_layer.bias = nn.Parameter(torch.zeros(32), requires_grad=False)
    before = {n: p.clone() for n, p in model.named_parameters()}
    for operation in (lorafit.merge, lorafit.merge_and_unload):
        with pytest.raises(ValueError, match="has a bias of its own .* but 'model.layers.0.self_attn.v_proj' has no "
                                             "bias to merge it into; nothing was merged"):
            operation(model)
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_autocast_gives_the_bias_in_the_autocast_dtype_and_its_gradient_in_float32():
    model = lorafit.attach(llama(), lorafit.LoraConfig(r=2, target_modules=TARGETS, lora_bias=True,
                                                        init_lora_weights=False))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(IDS).logits
    reference = lorafit.merge_and_unload(copy.deepcopy(model))
    torch.testing.assert_close(out.float(), logits(reference), rtol=0.05, atol=0.05)
    out.float().square().mean().backward()
    grad = model.model.layers[0].self_attn.q_proj.lora_B_bias["default"].grad
    assert grad.dtype == torch.float32 and grad.abs().max() > 0


def test_peft_and_lorafit_read_each_others_files_with_the_same_logits_and_gradients(tmp_path):
    config = dict(r=2, lora_alpha=4, target_modules=TARGETS, lora_bias=True)
    ours = lorafit.attach(llama(), lorafit.LoraConfig(**config))
    randomize(ours)
    lorafit.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(llama(), tmp_path / "ours", is_trainable=True).eval()
    assert any(n.endswith("q_proj.lora_B.default.bias") for n, _ in theirs.named_parameters())
    torch.testing.assert_close(logits(theirs), logits(ours), rtol=1e-5, atol=1e-5)
    grads = []
    for model in (ours, theirs):
        model(IDS).logits.square().mean().backward()
        grads.append({n.removeprefix("base_model.model.").replace(".default.weight", "")
                      .replace(".default.bias", "_bias").replace(".default", ""): p.grad
                      for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and any(k.endswith("lora_B_bias") for k in grads[0])
    for key, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][key], rtol=1e-4, atol=1e-6, msg=key)

    made = peft.get_peft_model(llama(), peft.LoraConfig(**config, init_lora_weights=False))
    randomize(made, seed=2)
    made.save_pretrained(tmp_path / "peft")
    loaded = lorafit.load_adapter(llama(), tmp_path / "peft")
    torch.testing.assert_close(logits(loaded), logits(made.eval()), rtol=1e-5, atol=1e-5)
    assert logits(loaded).sub(logits(llama())).abs().max() > 1e-3


def test_bf16_merge_adds_the_bias_and_unmerge_restores_weight_and_bias_bit_for_bit():
    base = llama(torch.bfloat16)
    before = {n: p.clone() for n, p in base.named_parameters()}
    model = lorafit.attach(llama(torch.bfloat16), lorafit.LoraConfig(r=2, target_modules=TARGETS, lora_bias=True))
    randomize(model)
    unmerged = logits(model)
    lorafit.merge(model)
    merged = logits(model)
    torch.testing.assert_close(merged.float(), unmerged.float(), rtol=0.02, atol=0.02)
    with lorafit.disabled(model):
        torch.testing.assert_close(logits(model), logits(base), rtol=0, atol=0)
    lorafit.unmerge(model)
    torch.testing.assert_close(logits(model), unmerged, rtol=0, atol=0)
    lorafit.unload(model)
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_float32_merge_and_unload_equals_the_adapter_and_safe_merge_refuses_an_infinite_bias():
    model = lorafit.attach(llama(), lorafit.LoraConfig(r=2, target_modules=TARGETS, lora_bias=True))
    randomize(model)
    want = logits(model)
    plain = lorafit.merge_and_unload(copy.deepcopy(model))
    torch.testing.assert_close(logits(plain), want, rtol=1e-5, atol=1e-5)
    layer = model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        layer.lora_B_bias["default"][3] = float("inf")
    weight, bias = layer.base_layer.weight.clone(), layer.base_layer.bias.clone()
    with pytest.raises(ValueError, match="would put NaN or inf into the bias"):
        lorafit.merge(model, safe=True)
    assert torch.equal(layer.base_layer.weight, weight) and torch.equal(layer.base_layer.bias, bias)


def test_a_convolution_adds_the_bias_and_merges_it():
    torch.manual_seed(0)
    base = nn.Conv2d(3, 6, 3, padding=1)
    layer = lorafit.layers.Conv(copy.deepcopy(base))
    layer.add_adapter("default", r=2, scale=2.0, init=False, bias=True)
    layer.set_active(["default"])
    x = torch.randn(2, 3, 5, 5)
    a, b, bias = layer.lora_A["default"], layer.lora_B["default"], layer.lora_B_bias["default"]
    want = base(x) + 2.0 * (nn.functional.conv2d(nn.functional.conv2d(x, a, padding=1), b) + bias.view(-1, 1, 1))
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    layer.merge()
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.bias, base.bias, rtol=0, atol=1e-6)


@pytest.mark.parametrize("extra, message", [
    ({"use_dora": True}, "lora_bias=True is not supported with use_dora=True"),
    ({"init_lora_weights": "pissa"}, "lora_bias=True needs init_lora_weights true or false, got 'pissa'"),
    ({"target_parameters": ["mlp.experts.gate_up_proj"]}, "lora_bias=True is not supported with target_parameters"),
    ({"lora_bias": 1}, "lora_bias must be true or false"),
])
def test_bad_configs_name_the_field(extra, message):
    with pytest.raises(ValueError, match=message):
        lorafit.LoraConfig(**{"lora_bias": True, **extra})


def test_refusals():
    model = llama()
    with pytest.raises(ValueError, match="lora_bias=True is supported for Linear and convolution layers, not "
                                         "Embedding"):
        lorafit.attach(model, lorafit.LoraConfig(target_modules=["q_proj", "embed_tokens"], lora_bias=True))
    assert type(model.model.embed_tokens) is nn.Embedding and type(model.model.layers[0].self_attn.q_proj) is nn.Linear


@pytest.mark.parametrize("method", ["exact", "linear", "svd"])
def test_combine_adapters_adds_the_weighted_biases(method):
    """An adapter with a bias and one without, combined: the biases add exactly (w_i s_i b_i), whatever the
    method; with "exact" the combination's output is the weighted sum of the adapters' changes."""
    model = llama()
    lorafit.attach(model, lorafit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_bias=True), name="a")
    lorafit.attach(model, lorafit.LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS), name="b")
    randomize(model)
    weights = {"a": 0.7, "b": -0.4}
    lorafit.combine_adapters(model, weights, "c", method=method, rank=8 if method == "svd" else None)
    assert lorafit.adapter_configs(model)["c"].lora_bias
    x = torch.randn(3, 64)
    for path, layer in lorafit.model.lora_layers(model):
        torch.testing.assert_close(layer.lora_B_bias["c"], 0.7 * 2.0 * layer.lora_B_bias["a"])
        if method != "exact":
            continue
        x_in = x[:, :layer.in_features]
        with torch.no_grad():
            base = layer.base_layer(x_in)
            out = {}
            for name in ("a", "b", "c"):
                layer.set_active([name])
                out[name] = layer(x_in)
        torch.testing.assert_close(out["c"] - base, 0.7 * (out["a"] - base) - 0.4 * (out["b"] - base),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grad", [False, True])
def test_a_batch_with_an_adapter_per_row_adds_each_rows_bias(grad):
    """Rows on adapters with and without their own bias, and on the base model, in Linear (the fused path and
    the sum-first one) and convolution layers: each row as if it ran alone."""
    from tests.models import ALL_KINDS, Mixed, mixed_inputs, randomize_adapters

    def attach(model):
        kinds = [k for k in ALL_KINDS if k != "embed"]
        lorafit.attach(model, lorafit.LoraConfig(r=2, target_modules=kinds, lora_bias=True), name="a")
        lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=kinds), name="b")
        lorafit.attach(model, lorafit.LoraConfig(r=2, target_modules=kinds, lora_bias=True), name="c")
        randomize_adapters(model)
        return model

    torch.manual_seed(0)
    model = attach(Mixed().eval())
    llms = []
    for bias in (True, False):  # without a base bias, the rows' low-rank sums start the output (sum first)
        llm = llama(bias=bias)
        lorafit.attach(llm, lorafit.LoraConfig(r=2, target_modules=TARGETS, lora_bias=True), name="a")
        lorafit.attach(llm, lorafit.LoraConfig(r=2, target_modules=TARGETS), name="b")
        randomize(llm)
        llms.append(llm)
    rows = ["a", "b", None, "c", "a"]
    inputs = mixed_inputs(batch=len(rows))
    ids = torch.randint(0, 50, (len(rows), 6), generator=torch.Generator().manual_seed(2))
    llm_rows = [r if r != "c" else "a" for r in rows]
    with torch.set_grad_enabled(grad):
        for net, args, names in ((model, inputs, rows), *((llm, (ids,), llm_rows) for llm in llms)):
            want = []
            for i, name in enumerate(names):
                row = tuple(t[i:i + 1] for t in args)
                if name is None:
                    with lorafit.disabled(net):
                        want.append(_out(net, row))
                else:
                    lorafit.set_active(net, name)
                    want.append(_out(net, row))
            with lorafit.adapter_per_row(net, names):
                got = _out(net, args)
            torch.testing.assert_close(got, torch.cat(want), rtol=1e-5, atol=1e-5)
            with lorafit.adapter_per_row(net, ["a"] * len(names)):  # one adapter for all rows: its own path
                got = _out(net, args)
            lorafit.set_active(net, "a")
            torch.testing.assert_close(got, _out(net, args), rtol=1e-5, atol=1e-5)


def _out(net, args):
    out = net(*args)
    return (out.logits if hasattr(out, "logits") else out).detach()
