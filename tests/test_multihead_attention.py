"""LoRA on torch's nn.MultiheadAttention: its packed in-projection and its out-projection, in PEFT's layout."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lorafit
from lorafit.layers import MultiheadAttentionLora, ParameterLora
from lorafit.model import lora_layers

peft = pytest.importorskip("peft")

TARGETS = ["attn", "self_attn", "linear1"]


class Block(nn.Module):
    """An attention called directly, sequence first (as open_clip's residual blocks do)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4)
        self.mlp = nn.Linear(16, 16)

    def forward(self, x, padding=None):
        h, _ = self.attn(x, x, x, key_padding_mask=padding, need_weights=False)
        return self.mlp(x + h)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.block = Block()
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x, padding=None):
        h = self.block(self.inp(x).transpose(0, 1), padding).transpose(0, 1)
        return self.head(self.encoder(h, src_key_padding_mask=padding))


def net(dtype=torch.float32) -> Net:
    torch.manual_seed(0)
    return Net().to(dtype)


X = torch.randn(3, 6, 8, generator=torch.Generator().manual_seed(1))
PADDING = torch.zeros(3, 6, dtype=torch.bool)
PADDING[1, 4:] = True  # row 1 has 4 tokens: torch's fused encoder path then runs on a nested tensor
KEPT = ~PADDING  # positions the fused and the unfused paths both define


def randomize(model, seed: int = 2, std: float = 0.2) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.normal_(std=std)


def adapted_weights(model) -> dict[str, torch.Tensor]:
    """W + s B A for every adapted weight, by its name in the plain model, formed from the adapter's own factors
    (gradients flow into them)."""
    weights = {}
    for path, layer in lora_layers(model):
        plain = path.replace(".base_layer", "")
        key = f"{plain}.{layer.parameter_name if isinstance(layer, ParameterLora) else 'weight'}"
        weight = layer.target_weight()
        for name in layer.active:
            weight = weight + layer.scaling[name] * layer.factors_b[name] @ layer.factors_a[name]
        weights[key] = weight
    return weights


def formula(model, *args):
    """The plain model with every adapted weight replaced by W + s B A."""
    base = net(next(model.parameters()).dtype).train(model.training)
    return torch.func.functional_call(base, adapted_weights(model), args)


def test_the_attention_computes_with_both_projections_changed_forward_and_backward():
    model = lorafit.attach(net(), lorafit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    randomize(model)
    attn = model.block.attn
    assert isinstance(attn, MultiheadAttentionLora) and isinstance(attn.base_layer.out_proj, ParameterLora)
    assert isinstance(model.block.attn.base_layer, nn.MultiheadAttention)
    assert attn.embed_dim == 16 and attn.num_heads == 4  # the attention's attributes still read through

    model.train()
    ours, theirs = model(X), formula(model, X)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (ours - net().train()(X)).abs().max() > 1e-2
    factors = [p for n, p in model.named_parameters() if p.requires_grad]
    assert len(factors) == 2 * (2 + 2 * 2 + 2)  # A and B of: attn's two projections, two layers' two, two linear1
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    ours_grads = torch.autograd.grad(ours.square().mean(), factors)
    their_grads = torch.autograd.grad(theirs.square().mean(), factors)
    for mine, other in zip(ours_grads, their_grads):
        assert mine.abs().max() > 0
        torch.testing.assert_close(mine, other, rtol=1e-4, atol=1e-6)

    # Inference: the encoder layers' fused path (which reads the weights directly) and the attention's own
    model.eval()
    with torch.no_grad():
        ours, theirs = model(X, PADDING), formula(model, X, PADDING)
        base = net().eval()(X, PADDING)
    torch.testing.assert_close(ours[KEPT], theirs[KEPT], rtol=1e-5, atol=1e-5)
    assert (ours[KEPT] - base[KEPT]).abs().max() > 1e-2


# PEFT before 0.22 adds the out-projection's change twice (W + 2 s B A; huggingface/peft#3774); from 0.22 on once,
# and it doubles lora_B when it reads an older file. lorafit reads PEFT's files the same way.
PEFT_ADDS_OUT_PROJ_TWICE = tuple(int(v) for v in peft.__version__.split(".")[:2]) < (0, 22)


def test_peft_and_lorafit_read_each_others_files(tmp_path):
    config = dict(r=4, lora_alpha=8, target_modules=TARGETS)
    theirs = peft.get_peft_model(net(), peft.LoraConfig(init_lora_weights=False, **config))  # every B non-zero
    theirs.save_pretrained(tmp_path / "peft")
    if PEFT_ADDS_OUT_PROJ_TWICE:
        with pytest.warns(UserWarning, match=r"applied nn.MultiheadAttention's out_proj change twice; .*layers.1"):
            ours = lorafit.load_adapter(net(), tmp_path / "peft")
    else:
        ours = lorafit.load_adapter(net(), tmp_path / "peft")
    theirs.train(), ours.train()  # PEFT's adapters are skipped by the encoder's fused path in eval mode
    torch.testing.assert_close(ours(X), theirs(X), rtol=1e-5, atol=1e-5)
    assert (ours(X) - net().train()(X)).abs().max() > 1e-2
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(X), theirs(X), rtol=1e-5, atol=1e-5)

    randomize(ours)
    lorafit.save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(net(), tmp_path / "ours")
    ours_state = lorafit.adapter_state_dict(ours)  # PEFT's keys, as in the file
    theirs_state = {k.replace(".default", ""): v for k, v in back.state_dict().items() if ".lora_" in k}
    assert ours_state.keys() == theirs_state.keys() and len(ours_state) == 16
    assert "base_model.model.block.attn.base_layer.out_proj.lora_B.weight" in ours_state
    for key, tensor in ours_state.items():
        torch.testing.assert_close(theirs_state[key], tensor, rtol=0, atol=0)
    if not PEFT_ADDS_OUT_PROJ_TWICE:
        torch.testing.assert_close(back.train()(X), ours.train()(X), rtol=1e-5, atol=1e-5)
    reloaded = lorafit.load_adapter(net(), tmp_path / "ours").train()
    torch.testing.assert_close(reloaded(X), ours.train()(X), rtol=0, atol=0)


@pytest.mark.parametrize("version, doubled", [
    ("0.21.2", True), ("0.17.1", True), ("0.21.0.dev0@abc123", True),  # released before the fix
    ("0.21.1.dev0@abc123", False), ("0.22.0", False), ("0.22.0rc1", False), ("1.0.0", False),
    (None, False),  # lorafit before it wrote a version: it has ensure_weight_tying, which PEFT < 0.18 never wrote
    ("no version", "refused"),
])
def test_a_file_s_version_says_whether_its_out_proj_change_counts_twice(tmp_path, version, doubled):
    model = lorafit.attach(net(), lorafit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    randomize(model)
    lorafit.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    assert data["peft_version"] == "0.22.0"
    if version is None:
        del data["peft_version"]
    else:
        data["peft_version"] = version
    path.write_text(json.dumps(data))
    saved = lorafit.adapter_state_dict(model)
    if doubled == "refused":
        with pytest.raises(ValueError, match="adapter_config.json: peft_version 'no version' is not a version"):
            lorafit.read_adapter(tmp_path)
        return
    if doubled:
        with pytest.warns(UserWarning, match=f"written by PEFT {version}, which applied"):
            _, tensors = lorafit.read_adapter(tmp_path)
    else:
        _, tensors = lorafit.read_adapter(tmp_path)
    for key, t in saved.items():
        factor = 2 if doubled and key.endswith(".base_layer.out_proj.lora_B.weight") else 1
        torch.testing.assert_close(tensors[key], factor * t, rtol=0, atol=0)


def test_a_file_from_peft_before_it_wrote_its_version_counts_the_out_proj_change_twice(tmp_path):
    model = lorafit.attach(net(), lorafit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    randomize(model)
    lorafit.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    del data["peft_version"], data["ensure_weight_tying"]
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="written by PEFT before 0.18"):
        loaded = lorafit.load_adapter(net(), tmp_path)
    key = "base_model.model.block.attn.base_layer.out_proj.lora_B.weight"
    assert torch.equal(lorafit.adapter_state_dict(loaded)[key], 2 * lorafit.adapter_state_dict(model)[key])


def test_all_linear_adapts_each_attention_whole_and_the_file_names_what_it_adapted(tmp_path):
    model = lorafit.attach(net(), lorafit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    attentions = [model.block.attn, *(layer.self_attn for layer in model.encoder.layers)]
    assert all(isinstance(a, MultiheadAttentionLora) for a in attentions)  # not out_proj alone, which they bypass
    adapted = ["inp", "block.attn", "block.mlp", *(f"encoder.layers.{i}.{m}" for i in (0, 1)
                                                   for m in ("self_attn", "linear1", "linear2")), "head"]
    config = lorafit.adapter_configs(model)["default"]
    assert config.target_modules == adapted
    randomize(model)
    model.train()
    torch.testing.assert_close(model(X), formula(model, X), rtol=1e-5, atol=1e-5)

    # PEFT's "all-linear" would adapt each out_proj as a linear layer and no in-projection; the file's list of
    # names gives PEFT the attentions lorafit adapted
    lorafit.save_adapter(model, tmp_path)
    back = peft.PeftModel.from_pretrained(net(), tmp_path)
    assert sum(type(m).__name__ == "MultiheadAttention" and hasattr(m, "lora_A") for m in back.modules()) == 3
    ours_state = lorafit.adapter_state_dict(model)
    theirs_state = {k.replace(".default", ""): v for k, v in back.state_dict().items() if ".lora_" in k}
    assert ours_state.keys() == theirs_state.keys()
    for key, tensor in ours_state.items():
        torch.testing.assert_close(theirs_state[key], tensor, rtol=0, atol=0)
    reloaded = lorafit.load_adapter(net(), tmp_path).train()
    torch.testing.assert_close(reloaded(X), model(X), rtol=1e-5, atol=1e-6)


def test_a_peft_all_linear_file_that_adapts_out_proj_alone_loads_as_peft_runs_it(tmp_path):
    theirs = peft.get_peft_model(net(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                        init_lora_weights=False))  # every B non-zero
    assert isinstance(theirs.base_model.model.block.attn.out_proj, peft.tuners.lora.Linear)  # never called
    theirs.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="never applied in PEFT"):
        ours = lorafit.load_adapter(net(), tmp_path)
    assert not any(isinstance(m, (MultiheadAttentionLora, ParameterLora)) for m in ours.modules())
    assert isinstance(ours.encoder.layers[1].linear2, lorafit.layers.Linear)
    theirs.train(), ours.train()
    torch.testing.assert_close(ours(X), theirs(X), rtol=1e-5, atol=1e-5)
    assert (ours(X) - net().train()(X)).abs().max() > 1e-2


def test_all_linear_names_modules_by_regex_where_a_list_would_match_more():
    model = nn.Sequential(nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 2),
                          nn.Linear(16, 3))
    lorafit.attach(model, lorafit.LoraConfig(r=2, target_modules="all-linear"))
    spec = lorafit.adapter_configs(model)["default"].target_modules
    assert isinstance(spec, str)  # a list entry "1" (the head) would match "0.layers.1" too
    plain = nn.Sequential(nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 2),
                          nn.Linear(16, 3))
    again = lorafit.attach(plain, lorafit.LoraConfig(r=2, target_modules=spec))
    assert sorted(n for n, _ in lora_layers(again)) == sorted(n for n, _ in lora_layers(model))


def test_all_linear_leaves_an_attention_alone_whose_out_proj_is_excluded():
    model = lorafit.attach(net(), lorafit.LoraConfig(r=2, target_modules="all-linear", exclude_modules=["out_proj"]))
    assert not any(isinstance(m, (MultiheadAttentionLora, ParameterLora)) for m in model.modules())
    assert isinstance(model.encoder.layers[0].linear1, lorafit.layers.Linear)
    assert lorafit.adapter_configs(model)["default"].target_modules == [
        "inp", "block.mlp", *(f"encoder.layers.{i}.{m}" for i in (0, 1) for m in ("linear1", "linear2")), "head"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_and_merge_and_unload(dtype):
    model = lorafit.attach(net(dtype), lorafit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)).eval()
    randomize(model)
    attn = model.block.attn
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        unmerged = model(X.to(dtype))
        lorafit.merge(model)
        merged = model(X.to(dtype))
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(merged, unmerged, rtol=tol, atol=tol)
        with lorafit.disabled(model):
            exact = 0 if dtype == torch.bfloat16 else 1e-5  # float32 weights are unmerged by subtracting
            torch.testing.assert_close(model(X.to(dtype)), net(dtype).eval()(X.to(dtype)), rtol=exact, atol=exact)
        lorafit.unmerge(model)
    for key, value in model.state_dict().items():  # bf16: the premerge copies restore the weights exactly
        torch.testing.assert_close(value, before[key], rtol=0, atol=0 if dtype == torch.bfloat16 else 1e-6)
    assert attn.merged == [] and attn.out_proj_lora.merged == []

    with torch.no_grad():
        plain = lorafit.merge_and_unload(model)
        torch.testing.assert_close(plain(X.to(dtype)), unmerged, rtol=tol, atol=tol)
    assert type(plain.block.attn) is nn.MultiheadAttention
    assert isinstance(plain.block.attn.out_proj, nn.Linear) and not isinstance(plain.block.attn.out_proj, ParameterLora)
    assert plain.state_dict().keys() == net().state_dict().keys()


def test_two_adapters_switch_and_detach_restores_the_model():
    model = net()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    layer = model.encoder.layers[0]
    assert layer.activation_relu_or_gelu == 1 and model.encoder.use_nested_tensor
    lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=["attn", "self_attn"]), "a")
    lorafit.attach(model, lorafit.LoraConfig(r=2, lora_alpha=8, target_modules=["attn", "self_attn"]), "b")
    assert layer.activation_relu_or_gelu == 0 and not model.encoder.use_nested_tensor  # its fused path is off
    randomize(model)
    model.train()
    assert model.block.attn.out_proj_lora.rank == {"a": 4, "b": 2}
    for active in (["a"], ["b"], ["a", "b"]):
        lorafit.set_active(model, active)
        assert model.block.attn.out_proj_lora.active == active
        torch.testing.assert_close(model(X), formula(model, X), rtol=1e-5, atol=1e-5)
    lorafit.detach(model, "a")
    assert model.block.attn.adapter_names == ["b"] and model.block.attn.out_proj_lora.adapter_names == ["b"]
    lorafit.detach(model, "b")
    assert type(model.block.attn) is nn.MultiheadAttention
    assert not any(isinstance(m, ParameterLora) for m in model.modules())
    assert layer.activation_relu_or_gelu == 1 and model.encoder.use_nested_tensor
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_combined_adapters_name_the_attention_not_its_insides(tmp_path):
    model = net()
    for name in ("a", "b"):
        lorafit.attach(model, lorafit.LoraConfig(r=2, lora_alpha=2, target_modules=["attn"]), name)
    randomize(model)
    lorafit.combine_adapters(model, {"a": 1.0, "b": 0.5}, "ab", method="exact")
    lorafit.set_active(model, "ab")
    combined = model.train()(X)
    lorafit.set_active(model, ["a", "b"])
    with torch.no_grad():
        for layer in (model.block.attn, model.block.attn.out_proj_lora):
            layer.factors_b["b"].mul_(0.5)
    torch.testing.assert_close(combined, model(X), rtol=1e-5, atol=1e-5)
    lorafit.save_adapter(model, tmp_path, "ab")
    config, _ = lorafit.read_adapter(tmp_path)
    assert config.target_modules == ["block.attn"]
    lorafit.set_active(model, "ab")
    torch.testing.assert_close(lorafit.load_adapter(net(), tmp_path).train()(X), combined, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("config, message", [
    (dict(target_modules=["out_proj"]), "target the attention 'block.attn' itself"),
    (dict(target_modules=["attn"], use_dora=True), "DoRA"),
    (dict(target_modules=["attn"], lora_bias=True), "lora_bias"),
    (dict(target_modules=["attn"], alora_invocation_tokens=[1]), "aLoRA"),
    (dict(target_modules=["attn"], init_lora_weights="pissa"), "pissa"),
    (dict(target_parameters=["block.attn.out_proj.weight"]), "out-projection of an nn.MultiheadAttention"),
])
def test_what_the_attention_cannot_take_is_refused_and_leaves_the_model_as_it_was(config, message):
    model = net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        lorafit.attach(model, lorafit.LoraConfig(r=2, **config))
    assert type(model.block.attn) is nn.MultiheadAttention and type(model.block.attn.out_proj) is not ParameterLora
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.encoder.layers[0].activation_relu_or_gelu == 1


def test_attention_with_its_own_key_and_value_sizes_is_refused():
    model = nn.Sequential(nn.MultiheadAttention(16, 4, kdim=8, vdim=8))
    with pytest.raises(ValueError, match="kdim=8 / vdim=8"):
        lorafit.attach(model, lorafit.LoraConfig(r=2, target_modules=["0"]))
    assert type(model[0]) is nn.MultiheadAttention


def test_target_parameters_and_target_modules_on_one_attention_are_refused():
    model = lorafit.attach(net(), lorafit.LoraConfig(r=2, target_modules=["attn"]))
    with pytest.raises(ValueError, match="adapted through target_modules already"):
        lorafit.attach(model, lorafit.LoraConfig(r=2, target_parameters=["block.attn.in_proj_weight"]), "other")
    model = lorafit.attach(net(), lorafit.LoraConfig(r=2, target_parameters=["block.attn.in_proj_weight"]))
    with pytest.raises(ValueError, match="target_parameters"):
        lorafit.attach(model, lorafit.LoraConfig(r=2, target_modules=["attn"]), "other")


def test_batches_with_an_adapter_per_row_and_hotswap_refuse_it(tmp_path):
    model = lorafit.attach(net(), lorafit.LoraConfig(r=2, target_modules=["attn"]))
    with pytest.raises(ValueError, match="nn.MultiheadAttention"):
        with lorafit.adapter_per_row(model, ["default"] * 3):
            model(X)
    lorafit.save_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="nn.MultiheadAttention"):
        lorafit.hotswap_adapter(model, tmp_path)
