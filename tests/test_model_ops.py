import copy

import pytest
import torch
from torch import nn

import lorafit
from lorafit import LoraConfig
from lorafit.layers import LoraLayer, ModulesToSave
from tests.models import ALL_KINDS, Mixed, mixed_inputs, randomize_adapters

ATOL = 1e-5


def _mixed(seed: int = 0) -> Mixed:
    torch.manual_seed(seed)
    return Mixed().eval()


def _attach(model, name="default", **kw):
    kw.setdefault("target_modules", ALL_KINDS)
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    lorafit.attach(model, LoraConfig(**kw), name)
    return model


def test_fresh_adapter_leaves_output_unchanged():
    model = _mixed()
    inputs = mixed_inputs()
    before = model(*inputs)
    _attach(model, lora_dropout=0.2)
    assert torch.equal(model(*inputs), before)
    model.train()  # dropout only touches the LoRA input; with B = 0 nothing changes
    assert torch.allclose(model(*inputs), before, atol=ATOL)
    assert all(isinstance(model.get_submodule(n), LoraLayer) for n in ALL_KINDS)


def test_merged_equals_unmerged_and_unmerge_restores_weights():
    model = _attach(_mixed())
    randomize_adapters(model)
    base_weights = {n: model.get_submodule(n).base_layer.weight.clone() for n in ALL_KINDS}
    inputs = mixed_inputs()
    unmerged = model(*inputs)
    lorafit.merge(model)
    assert lorafit.merged_adapters(model) == ["default"]
    assert torch.allclose(model(*inputs), unmerged, atol=ATOL)
    for n in ALL_KINDS:
        assert not torch.equal(model.get_submodule(n).base_layer.weight, base_weights[n]), n
    lorafit.unmerge(model)
    for n in ALL_KINDS:
        torch.testing.assert_close(model.get_submodule(n).base_layer.weight, base_weights[n], atol=1e-6, rtol=0)
    assert torch.allclose(model(*inputs), unmerged, atol=ATOL)


def test_unload_returns_base_model_bitwise():
    model = _mixed()
    original = copy.deepcopy(model)
    types = {n: type(m) for n, m in model.named_modules()}
    _attach(model, modules_to_save=["classifier"])
    randomize_adapters(model)
    lorafit.unload(model)
    assert {n: type(m) for n, m in model.named_modules()} == types
    for (n, p), (_, q) in zip(model.named_parameters(), original.named_parameters()):
        assert torch.equal(p, q), n
        assert p.requires_grad == q.requires_grad, n
    assert lorafit.adapter_configs(model) == {}


def test_disabled_gives_base_output_even_when_merged():
    model = _mixed()
    inputs = mixed_inputs()
    base = model(*inputs)
    _attach(model, modules_to_save=["classifier"])
    randomize_adapters(model)
    with torch.no_grad():
        model.classifier.modules_to_save["default"].weight.add_(1.0)
    adapted = model(*inputs)
    assert not torch.allclose(adapted, base, atol=1e-3)
    with lorafit.disabled(model):
        assert torch.allclose(model(*inputs), base, atol=ATOL)
    assert torch.allclose(model(*inputs), adapted, atol=ATOL)
    lorafit.merge(model)
    with lorafit.disabled(model):
        assert torch.allclose(model(*inputs), base, atol=ATOL)
    assert lorafit.merged_adapters(model) == ["default"]
    assert torch.allclose(model(*inputs), adapted, atol=ATOL)


def test_two_active_adapters_add_their_deltas():
    inputs = mixed_inputs()
    model = _mixed()
    base = model(*inputs)
    _attach(model, "a")
    _attach(model, "b", r=2, lora_alpha=4)
    randomize_adapters(model)
    lorafit.set_active(model, "a")
    delta_a = model(*inputs) - base
    lorafit.set_active(model, "b")
    delta_b = model(*inputs) - base
    lorafit.set_active(model, ["a", "b"])
    both = model(*inputs)
    # the head is linear in its input, and every adapted layer before the nonlinearity adds linearly;
    # so compare at layer level where additivity is exact:
    layer = model.mlp[0]
    x = torch.randn(5, 12)
    lorafit.set_active(model, "a")
    ya = layer(x)
    lorafit.set_active(model, "b")
    yb = layer(x)
    lorafit.set_active(model, ["a", "b"])
    yab = layer(x)
    assert torch.allclose(yab - layer.base_layer(x), (ya - layer.base_layer(x)) + (yb - layer.base_layer(x)), atol=ATOL)
    assert not torch.allclose(both, base + delta_a, atol=1e-4)  # b really contributes
    assert not torch.allclose(delta_b, torch.zeros_like(delta_b), atol=1e-4)


def test_only_adapter_parameters_train():
    model = _attach(_mixed().train(), modules_to_save=["classifier"])
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(".lora_" in n or ".modules_to_save." in n for n in trainable)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids, image = mixed_inputs()

    def step():
        opt.zero_grad()
        model(ids, image).square().mean().backward()
        opt.step()
        return {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}

    changed = step()
    # The zero factor (B; A for embeddings) gates the other's gradient: the first step moves only it
    zero_factor = {n for n in start if ".lora_B." in n or ".lora_embedding_A." in n}
    assert changed == zero_factor | {"classifier.modules_to_save.default.weight",
                                     "classifier.modules_to_save.default.bias"}
    changed = step()
    assert any(".lora_A." in n for n in changed) and "embed.lora_embedding_B.default" in changed
    assert all(".lora_" in n or ".modules_to_save." in n for n in changed), changed


def test_bias_modes_choose_trainable_biases():
    model = _attach(_mixed(), bias="lora_only", target_modules=["mlp.0"])
    assert model.mlp[0].base_layer.bias.requires_grad and not model.mlp[2].bias.requires_grad
    model = _attach(_mixed(), bias="all", target_modules=["mlp.0"])
    assert model.mlp[2].bias.requires_grad and model.classifier.bias.requires_grad
    assert not model.mlp[2].weight.requires_grad


@pytest.mark.parametrize(
    "d_out, d_in, r, lora, full",
    [(512, 64, 8, 4_608, 32_768), (1000, 5000, 1, 6_000, 5_000_000)],
)
def test_parameter_arithmetic_of_the_lora_paper(d_out, d_in, r, lora, full):
    model = nn.Sequential(nn.Linear(d_in, d_out, bias=False))
    lorafit.attach(model, LoraConfig(r=r, target_modules=["0"]))
    report = lorafit.trainable_parameters(model)
    assert report.trainable == lora
    assert report.base == full
    assert report.total == full + lora
    if d_out == 512:
        assert round(100 * report.reduction_vs_full) == 86
    assert f"{lora:,}" in str(report)


def test_target_that_matches_nothing_lists_existing_names():
    with pytest.raises(ValueError) as info:
        _attach(_mixed(), target_modules=["q_proj"])
    msg = str(info.value)
    assert "target_modules ['q_proj'] matched no adaptable module" in msg
    for name in ("classifier", "conv1", "conv2", "embed", "proj", "0", "2"):
        assert name in msg


def test_unsupported_layer_type_is_named():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(ValueError,
                       match=r"matches '1', a LayerNorm; lorafit can adapt Linear \(also quantized\), Embedding"):
        lorafit.attach(model, LoraConfig(target_modules=["1"]))
    mha = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(ValueError, match="nn.MultiheadAttention"):
        lorafit.attach(mha, LoraConfig(target_modules=["out_proj"]))


def test_failed_attach_leaves_model_untouched():
    model = _mixed()
    before = copy.deepcopy(model)
    with pytest.raises(ValueError):
        _attach(model, target_modules=["mlp.0"], modules_to_save=["nope"])
    assert str(model) == str(before)
    assert all(p.requires_grad for p in model.parameters())


def test_modules_to_save_that_matches_nothing():
    with pytest.raises(ValueError, match=r"modules_to_save \['head'\] matched no module; top-level modules are: embed"):
        _attach(_mixed(), modules_to_save=["head"])


def test_modules_to_save_is_a_trainable_copy():
    model = _attach(_mixed(), modules_to_save=["classifier"])
    assert isinstance(model.classifier, ModulesToSave)
    copy_ = model.classifier.modules_to_save["default"]
    assert copy_.weight is not model.classifier.original_module.weight
    assert copy_.weight.requires_grad and not model.classifier.original_module.weight.requires_grad
    assert model.classifier.out_features == 3  # attribute access falls through to the module


def test_exclude_and_layer_selection():
    model = nn.Module()
    model.layers = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(4, 4), "v": nn.Linear(4, 4)}) for _ in range(3))
    lorafit.attach(model, LoraConfig(target_modules=["q", "v"], layers_to_transform=[0, 2],
                                     exclude_modules=["layers.2.v"]))
    adapted = sorted(n for n, m in model.named_modules() if isinstance(m, LoraLayer))
    assert adapted == ["layers.0.q", "layers.0.v", "layers.2.q"]
    model2 = nn.Module()
    model2.layers = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(4, 4)}) for _ in range(2))
    lorafit.attach(model2, LoraConfig(target_modules=r"layers\.1\.q"))
    assert [n for n, m in model2.named_modules() if isinstance(m, LoraLayer)] == ["layers.1.q"]


def test_all_linear_skips_the_output_head():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg)
    lorafit.attach(model, LoraConfig(target_modules="all-linear"))
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not isinstance(model.lm_head, LoraLayer)


def test_default_targets_from_model_type():
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32))
    lorafit.attach(model, LoraConfig())
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert adapted == {"query", "value"}
    with pytest.raises(ValueError, match="target_modules is not set and lorafit has no default"):
        lorafit.attach(_mixed(), LoraConfig())


def test_default_targets_are_peft_s_for_every_model_type_peft_knows():
    constants = pytest.importorskip("peft.utils.constants")
    from lorafit.targeting import DEFAULT_TARGETS

    theirs = constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    both = set(theirs) & set(DEFAULT_TARGETS)
    assert len(both) >= 40  # PEFT 0.21's every type; a later PEFT may know more
    assert {t: DEFAULT_TARGETS[t] for t in both} == {t: theirs[t] for t in both}


def test_rank_pattern_sets_per_module_rank():
    model = _attach(_mixed(), r=4, rank_pattern={"mlp.0": 2}, alpha_pattern={"conv2": 1})
    assert model.mlp[0].lora_A["default"].shape == (2, 12)
    assert model.mlp[2].lora_A["default"].shape == (4, 24)
    assert model.conv2.scaling["default"] == 0.25


def test_safe_merge_refuses_non_finite_weights():
    model = _attach(_mixed())
    randomize_adapters(model)
    with torch.no_grad():
        model.mlp[0].lora_B["default"][0, 0] = float("inf")
    before = model.mlp[0].base_layer.weight.clone()
    with pytest.raises(ValueError, match="merging adapter 'default' would put NaN or inf"):
        lorafit.merge(model, safe=True)
    assert torch.equal(model.mlp[0].base_layer.weight, before)
    assert "default" not in model.mlp[0].merged


def test_merge_and_unload_gives_a_plain_model():
    model = _attach(_mixed(), modules_to_save=["classifier"])
    randomize_adapters(model)
    with torch.no_grad():
        model.classifier.modules_to_save["default"].bias.add_(0.5)
    inputs = mixed_inputs()
    expected = model(*inputs)
    plain = lorafit.merge_and_unload(model)
    assert not any(isinstance(m, (LoraLayer, ModulesToSave)) for m in plain.modules())
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in _mixed().parameters())
    assert torch.allclose(plain(*inputs), expected, atol=ATOL)


def test_detach_and_names():
    model = _mixed()
    inputs = mixed_inputs()
    base = model(*inputs)
    _attach(model, "a")
    _attach(model, "b", target_modules=["mlp.0"])
    randomize_adapters(model)
    with pytest.raises(ValueError, match="already attached"):
        _attach(model, "a")
    with pytest.raises(ValueError, match=r"adapter name must match"):
        _attach(model, "../x")
    with pytest.raises(KeyError, match=r"no adapter named 'c' is attached; attached adapters: \['a', 'b'\]"):
        lorafit.set_active(model, "c")
    lorafit.detach(model, "a")
    assert isinstance(model.mlp[0], LoraLayer) and not isinstance(model.mlp[2], LoraLayer)
    lorafit.detach(model, "b")
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert torch.equal(model(*inputs), base)


def test_active_set_cannot_change_while_merged():
    model = _attach(_attach(_mixed(), "a"), "b")
    lorafit.set_active(model, "a")
    lorafit.merge(model)
    with pytest.raises(ValueError, match=r"adapters \['a'\] are merged into the weights; unmerge them"):
        lorafit.set_active(model, "b")
    with pytest.raises(ValueError, match=r"adapters \['b'\] are not active"):
        lorafit.merge(model, "b")


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "gaussian", "orthogonal", True])
def test_data_dependent_inits_keep_the_output(init):
    model = _mixed()
    inputs = mixed_inputs()
    base = model(*inputs)
    _attach(model, init_lora_weights=init, target_modules=["mlp.0", "mlp.2", "proj"])
    assert torch.allclose(model(*inputs), base, atol=1e-4)
    if init in ("pissa", "pissa_niter_4", "olora", "orthogonal"):
        assert model.mlp[0].lora_B["default"].abs().sum() > 0


def test_data_dependent_init_rejects_other_layers_and_big_ranks():
    with pytest.raises(ValueError, match="only supported for Linear layers"):
        _attach(_mixed(), init_lora_weights="pissa", target_modules=["conv1"])
    with pytest.raises(ValueError, match=r"needs r <= min\(d_in, d_out\) = 12, got r=16"):
        _attach(_mixed(), init_lora_weights="olora", target_modules=["mlp.0"], r=16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_any_float_dtype(dtype):
    model = _mixed().to(dtype)
    inputs = mixed_inputs(dtype=dtype)
    _attach(model)
    randomize_adapters(model)
    for name, p in model.named_parameters():
        assert p.dtype == dtype, name
    out = model(*inputs)
    assert out.dtype == dtype
    lorafit.merge(model)
    tol = {torch.bfloat16: 5e-2, torch.float16: 5e-3, torch.float64: 1e-10}[dtype]
    assert torch.allclose(model(*inputs).float(), out.float(), atol=tol, rtol=tol)


def test_float32_adapters_on_a_bfloat16_base():
    model = _mixed().to(torch.bfloat16)
    lorafit.attach(model, LoraConfig(target_modules=["mlp.0"]), dtype=torch.float32)
    assert model.mlp[0].lora_A["default"].dtype == torch.float32
    out = model(*mixed_inputs(dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert model.mlp[0].lora_B["default"].grad.dtype == torch.float32


def test_meta_device_is_respected():
    # no hard-coded device: factors are created where the base weight lives
    model = nn.Sequential(nn.Linear(4, 4, device="meta"))
    lorafit.attach(model, LoraConfig(target_modules=["0"], r=2))
    assert model[0].lora_A["default"].device.type == "meta"


def test_seq_cls_task_trains_the_classification_head():
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32))
    lorafit.attach(model, LoraConfig(target_modules=["query"], task_type="SEQ_CLS"))
    assert isinstance(model.classifier, ModulesToSave)
    assert model.classifier.modules_to_save["default"].weight.requires_grad
    assert lorafit.adapter_configs(model)["default"].modules_to_save == ["classifier"]


def test_seq_cls_trains_the_head_of_an_encoder_decoder_classifier_too():
    """BART and T5 keep their head in classification_head (PEFT's list has classifier and score only)."""
    from transformers import BartConfig, BartForSequenceClassification

    model = BartForSequenceClassification(BartConfig(vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1,
                                                     encoder_attention_heads=2, decoder_attention_heads=2,
                                                     encoder_ffn_dim=32, decoder_ffn_dim=32, num_labels=3))
    lorafit.attach(model, LoraConfig(target_modules=["q_proj"], task_type="SEQ_CLS"))
    assert isinstance(model.classification_head, ModulesToSave)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("classification_head.modules_to_save.default.out_proj.") for n in trainable)
    assert lorafit.adapter_configs(model)["default"].modules_to_save == ["classification_head"]


def test_wrappers_keep_the_training_mode_of_the_model():
    model = _attach(_mixed().eval(), lora_dropout=0.5, modules_to_save=["classifier"])
    assert not any(m.training for m in model.modules())
    inputs = mixed_inputs()
    randomize_adapters(model)
    assert torch.equal(model(*inputs), model(*inputs))  # no dropout in eval mode
    plain = lorafit.merge_and_unload(model.train())
    assert all(m.training for m in plain.modules())


def test_a_layer_refusing_the_adapter_leaves_no_half_attached_model():
    model = _mixed()
    model.conv2 = nn.Conv2d(2, 12, kernel_size=3, stride=2, padding=1, groups=2)
    before = str(model)
    # mlp.0 takes the adapter, then the grouped convolution after it refuses: nothing may stay wrapped
    with pytest.raises(ValueError, match="grouped convolution"):
        _attach(model, target_modules=["mlp.0", "conv2"], use_dora=True)
    assert str(model) == before and lorafit.adapter_configs(model) == {}
    _attach(model, "a", target_modules=["mlp.0"])
    with pytest.raises(ValueError, match="grouped convolution"):
        _attach(model, "b", target_modules=["mlp.0", "conv2"], use_dora=True)
    assert model.mlp[0].adapter_names == ["a"] and not isinstance(model.conv2, LoraLayer)


def test_a_transformers_model_without_token_embeddings_takes_adapters():
    """transformers' vision models such as ResNet raise NotImplementedError from get_input_embeddings."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.ResNetForImageClassification(transformers.ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        base = model(pixel_values=pixels).logits
    lorafit.attach(model, LoraConfig(r=2, target_modules=["convolution"], init_lora_weights=False,
                                     task_type="SEQ_CLS"))
    assert lorafit.adapter_configs(model)["default"].modules_to_save == ["classifier"]
    with torch.no_grad():
        adapted = model(pixel_values=pixels).logits
        assert (adapted - base).abs().max() > 1e-3
        lorafit.merge(model)
        torch.testing.assert_close(model(pixel_values=pixels).logits, adapted, rtol=1e-5, atol=1e-5)


def test_a_compiled_or_data_parallel_wrapper_is_refused_with_what_to_pass(tmp_path):
    model = _attach(_mixed())
    for wrapper, inner in ((torch.compile(model, backend="eager"), "_orig_mod"), (nn.DataParallel(model), "module")):
        for call in (lambda: lorafit.save_adapter(wrapper, tmp_path), lambda: lorafit.merge(wrapper),
                     lambda: lorafit.attach(wrapper, LoraConfig(r=2, target_modules=ALL_KINDS), "other")):
            with pytest.raises(TypeError, match=f"pass model.{inner}"):
                call()
    lorafit.save_adapter(model, tmp_path)  # the model itself, as before
