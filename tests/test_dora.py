import copy

import pytest
import torch

import lorafit
from lorafit import LoraConfig
from tests.models import ALL_KINDS, Mixed, mixed_inputs, randomize_adapters


def _dora_model(dropout=0.0, seed=0):
    torch.manual_seed(seed)
    model = Mixed().eval()
    lorafit.attach(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, use_dora=True,
                                     target_modules=["mlp.0", "mlp.2", "proj", "classifier"]))
    return model


def test_fresh_dora_adapter_keeps_the_output():
    torch.manual_seed(0)
    base = Mixed().eval()
    inputs = mixed_inputs()
    expected = base(*inputs)
    torch.manual_seed(0)
    model = _dora_model()
    torch.testing.assert_close(model(*inputs), expected, atol=1e-6, rtol=0)
    assert model.mlp[0].lora_magnitude_vector["default"].shape == (24,)


def test_dora_forward_is_the_formula():
    model = _dora_model()
    randomize_adapters(model, scale=0.3)
    layer = model.mlp[0]
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].mul_(1.5)
    x = torch.randn(6, 12, dtype=torch.float64)
    w = layer.base_layer.weight.double()
    a, b = layer.lora_A["default"].double(), layer.lora_B["default"].double()
    s = layer.scaling["default"]
    adapted = w + s * b @ a
    m = layer.lora_magnitude_vector["default"].double()
    expected = (m / adapted.norm(dim=1)) * (x @ adapted.T) + layer.base_layer.bias.double()
    torch.testing.assert_close(layer(x.float()).double(), expected, atol=1e-5, rtol=1e-5)


def test_dora_norm_is_detached_and_magnitude_trains():
    model = _dora_model().train()
    randomize_adapters(model, scale=0.3)
    model(*mixed_inputs()).square().sum().backward()
    layer = model.mlp[0]
    assert layer.lora_magnitude_vector["default"].grad.abs().sum() > 0
    assert layer.lora_A["default"].grad.abs().sum() > 0


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_dora_merge_unmerge(dropout):
    model = _dora_model(dropout)
    randomize_adapters(model, scale=0.3)
    with torch.no_grad():
        model.proj.lora_magnitude_vector["default"].mul_(0.7)
    inputs = mixed_inputs()
    unmerged = model(*inputs)
    before = {n: model.get_submodule(n).base_layer.weight.clone() for n in ("mlp.0", "proj")}
    lorafit.merge(model)
    torch.testing.assert_close(model(*inputs), unmerged, atol=1e-5, rtol=1e-5)
    lorafit.unmerge(model)
    for n, w in before.items():
        torch.testing.assert_close(model.get_submodule(n).base_layer.weight, w, atol=1e-6, rtol=1e-5)
    plain = lorafit.merge_and_unload(model)
    torch.testing.assert_close(plain(*inputs), unmerged, atol=1e-5, rtol=1e-5)


def test_dora_save_reload(tmp_path):
    model = _dora_model()
    randomize_adapters(model, scale=0.3)
    lorafit.save_adapter(model, tmp_path)
    from safetensors import safe_open

    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        assert "base_model.model.mlp.0.lora_magnitude_vector" in f.keys()
    torch.manual_seed(0)
    fresh = lorafit.load_adapter(Mixed().eval(), tmp_path)
    inputs = mixed_inputs()
    torch.testing.assert_close(fresh(*inputs), model(*inputs), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_dora_on_every_layer_kind_merges_to_the_same_output(dropout):
    """Embedding (a magnitude per dimension), Conv1d/Conv2d (per output channel, PEFT's (1, C, 1...) shape), GPT-2
    Conv1D and Linear: merged equals unmerged, unmerge restores the weights."""
    torch.manual_seed(0)
    model = lorafit.attach(Mixed().eval(), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, use_dora=True,
                                                      target_modules=ALL_KINDS))
    assert model.embed.lora_magnitude_vector["default"].shape == (12,)
    assert model.conv1.lora_magnitude_vector["default"].shape == (1, 12, 1)
    assert model.conv2.lora_magnitude_vector["default"].shape == (1, 12, 1, 1)
    inputs = mixed_inputs()
    torch.manual_seed(0)
    torch.testing.assert_close(model(*inputs), Mixed().eval()(*inputs), atol=1e-5, rtol=0)  # fresh: no change
    randomize_adapters(model, scale=0.3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.dim() != 2:  # magnitudes unlike the norms, so that merging rescales
                p.mul_(1 + 0.3 * torch.rand_like(p))
    unmerged = model(*inputs)
    before = {n: model.get_submodule(n).base_layer.weight.clone() for n in ALL_KINDS}
    lorafit.merge(model)
    torch.testing.assert_close(model(*inputs), unmerged, atol=1e-4, rtol=1e-4)
    lorafit.unmerge(model)
    for n, w in before.items():
        torch.testing.assert_close(model.get_submodule(n).base_layer.weight, w, atol=1e-5, rtol=1e-5)


def test_dora_matches_peft_on_every_layer_kind(tmp_path):
    """PEFT's DoRA for embeddings and convolutions: the same outputs both ways, and the same gradients."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = Mixed().eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=ALL_KINDS, use_dora=True, init_lora_weights=False))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.3 * torch.rand_like(p))
    theirs.save_pretrained(tmp_path / "peft")
    ours = lorafit.load_adapter(copy.deepcopy(base), tmp_path / "peft", trainable=True)
    inputs = mixed_inputs()
    outs = []
    for model in (theirs, ours):
        out = model(*inputs)
        out.square().sum().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    assert (outs[0] - base(*inputs)).abs().max() > 1e-2
    grads = {n.removeprefix("base_model.model.").replace(".weight", "").replace(".default", ""): p.grad
             for n, p in theirs.named_parameters() if p.requires_grad}
    mine = {n.replace(".default", ""): p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert grads.keys() == mine.keys() and len(mine) == 3 * len(ALL_KINDS)
    for name, grad in grads.items():
        torch.testing.assert_close(mine[name], grad, atol=1e-4, rtol=1e-4, msg=name)
    lorafit.save_adapter(ours, tmp_path / "lorafit")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lorafit").eval()
    torch.testing.assert_close(back(*inputs), outs[0], atol=1e-5, rtol=1e-5)


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, initializer_range=0.1)
    return BertForSequenceClassification(cfg).eval()


def test_dora_matches_peft_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    base = _tiny_bert()
    ids = torch.randint(0, 96, (3, 9), generator=torch.Generator().manual_seed(1))
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value", "dense"], use_dora=True, init_lora_weights=False))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.rand_like(p))
    peft_model.eval()
    expected = peft_model(input_ids=ids).logits
    with torch.no_grad():
        assert (expected - base(input_ids=ids).logits).abs().max() > 1e-3
    peft_model.save_pretrained(tmp_path / "from_peft")
    ours = lorafit.load_adapter(copy.deepcopy(base), tmp_path / "from_peft")
    torch.testing.assert_close(ours(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
    lorafit.save_adapter(ours, tmp_path / "from_lorafit")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "from_lorafit").eval()
    torch.testing.assert_close(back(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
