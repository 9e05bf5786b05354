"""EVA: A from the principal components of each layer's inputs on data, ranks where they explain most."""

from __future__ import annotations

import pytest
import torch

import lorafit
from lorafit.eva import IncrementalPCA, allocate_ranks

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "down_proj"]


def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config).eval()


def batches(count: int = 6):
    """Language-model batches with padding and positions left out of the loss, which EVA must leave out too."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        ids = torch.randint(0, 64, (3, 16), generator=generator)
        mask = torch.ones_like(ids)
        mask[0, 12:] = 0
        labels = ids.clone()
        labels[1, :4] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def unit(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(dim=1, keepdim=True)


def test_incremental_pca_equals_the_pca_of_all_rows():
    torch.manual_seed(0)
    scales = torch.tensor([9.0, 6.0, 4.0, 3.0] + [0.3] * 12)
    data = (torch.randn(600, 16) * scales) @ torch.linalg.qr(torch.randn(16, 16))[0] + 5.0
    pca = IncrementalPCA(4)
    for chunk in data.split(37):  # uneven batches, the first smaller than nothing: rows are held until k
        pca.update(chunk)
    centred = data - data.mean(0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    torch.testing.assert_close(pca.mean, data.mean(0), rtol=1e-5, atol=1e-4)
    cosines = (pca.components[:4] * vh[:4]).sum(1).abs()
    assert (cosines > 0.9999).all(), cosines
    torch.testing.assert_close(pca.singular[:4], s[:4], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pca.variance_ratio()[:4], s[:4].square() / s.square().sum(), rtol=1e-4, atol=1e-6)


def test_ranks_go_to_the_largest_shares_within_each_cap():
    ratios = {"a": torch.tensor([0.5, 0.3, 0.1, 0.05]), "b": torch.tensor([0.4, 0.35, 0.2, 0.01]),
              "c": torch.tensor([0.02, 0.01, 0.0, 0.0])}
    assert allocate_ranks(ratios, {"a": 4, "b": 4, "c": 4}, 6) == {"a": 3, "b": 3, "c": 0}
    assert allocate_ranks(ratios, {"a": 1, "b": 4, "c": 4}, 6) == {"a": 1, "b": 4, "c": 1}


def reference_components(data, target: str, index: int = 0):
    """The principal directions of the inputs ``target`` of layer ``index`` sees on the kept positions."""
    model = llama()
    rows = []
    layer = model.model.layers[index]
    module = layer.self_attn.q_proj if target in ("q_proj", "k_proj", "v_proj") else layer.mlp.down_proj
    state = {}
    module.register_forward_pre_hook(lambda m, args: rows.append(args[0][state["keep"]]))
    with torch.no_grad():
        for batch in data:
            state["keep"] = batch["attention_mask"].bool() & (batch["labels"] != -100)
            model(**batch)
    stacked = torch.cat(rows)
    _, s, vh = torch.linalg.svd(stacked - stacked.mean(0), full_matrices=False)
    return vh, s


def test_attach_eva_sets_a_to_the_inputs_principal_components_and_keeps_the_output(tmp_path):
    data = batches()
    config = lorafit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, eva_config={"tau": 1.0, "rho": 2.0})
    with pytest.warns(UserWarning, match="the batches ran out before the components"):  # tau 1: read them all
        model = lorafit.attach_eva(llama(), config, data)
    ids = data[0]["input_ids"]
    torch.testing.assert_close(model(ids).logits, llama()(ids).logits, rtol=0, atol=0)  # B = 0

    saved = lorafit.adapter_configs(model)["default"]
    assert saved.init_lora_weights == "eva" and saved.eva_config["rho"] == 2.0
    ranks = {name: layer.rank["default"] for name, layer in lorafit.model.lora_layers(model)}
    assert sum(ranks.values()) == 4 * 8  # the budget: r for each of the 8 targets
    assert all(1 <= r <= 8 for r in ranks.values())
    assert set(saved.target_modules) == set(ranks)
    for name, layer in lorafit.model.lora_layers(model):
        assert layer.scaling["default"] == pytest.approx(8 / 4), name  # adjust_scaling_factors: alpha follows r
        assert saved.rank_for(name) == layer.rank["default"]

    attention = model.model.layers[0].self_attn
    for target in ("q_proj", "down_proj"):
        vh, _ = reference_components(data, target)
        layer = attention.q_proj if target == "q_proj" else model.model.layers[0].mlp.down_proj
        a = layer.lora_A["default"]
        cosines = (unit(a) * vh[: a.shape[0]]).sum(1).abs()
        assert (cosines > 0.999).all(), (target, cosines)
    # q, k and v see one input: one PCA, each takes its first components
    shared = min(attention.q_proj.rank["default"], attention.k_proj.rank["default"])
    torch.testing.assert_close(attention.q_proj.lora_A["default"][:shared], attention.k_proj.lora_A["default"][:shared])

    lorafit.save_adapter(model, tmp_path)
    for layer in (attention.q_proj, attention.v_proj):
        with torch.no_grad():
            layer.lora_B["default"].normal_()
    lorafit.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(llama(), tmp_path)
    assert theirs.peft_config["default"].init_lora_weights == "eva"
    torch.testing.assert_close(theirs(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    again = lorafit.load_adapter(llama(), tmp_path)
    torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_settled_components_stop_early_and_whitening_divides_by_the_singular_values():
    data = batches(40)
    read = []

    def forward(model, batch):
        read.append(1)
        return model(**batch)

    config = lorafit.LoraConfig(r=2, target_modules=["q_proj"], eva_config={"tau": 0.9, "whiten": True})
    model = lorafit.attach_eva(llama(), config, data, forward=forward)
    assert len(read) < 41  # stopped before the end (the first batch runs twice: grouping, then reading)
    layer = model.model.layers[0].self_attn.q_proj
    norms = layer.lora_A["default"].norm(dim=1)
    assert not torch.allclose(norms, torch.ones_like(norms))


def test_bad_input_says_what_is_wrong():
    with pytest.raises(ValueError, match="batches is empty"):
        lorafit.attach_eva(llama(), lorafit.LoraConfig(r=2, target_modules=["q_proj"]), [])
    tiny = [{"input_ids": torch.tensor([[1, 2]])}]
    with pytest.raises(ValueError, match=r"saw fewer input rows than the 8 components it needs"):
        lorafit.attach_eva(llama(), lorafit.LoraConfig(r=4, target_modules=["q_proj"]), tiny)
    with pytest.raises(ValueError, match="eva_config: unknown keys \\['rh0'\\]"):
        lorafit.attach_eva(llama(), lorafit.LoraConfig(target_modules=["q_proj"], eva_config={"rh0": 2}), tiny)
    with pytest.raises(ValueError, match="DoRA and layer_replication are not supported with it"):
        lorafit.attach_eva(llama(), lorafit.LoraConfig(target_modules=["q_proj"], layer_replication=[[0, 2]]), tiny)
    with pytest.raises(ValueError, match="EVA initialises linear layers; 'model.embed_tokens' is a Embedding"):
        lorafit.attach_eva(llama(), lorafit.LoraConfig(target_modules=["q_proj", "embed_tokens"]), tiny)
    model = llama()
    lorafit.attach_eva(model, lorafit.LoraConfig(r=1, target_modules=["q_proj"]), batches(2))
    assert lorafit.active_adapters(model) == ["default"]


def test_lorafit_train_computes_eva_on_its_training_rows(tmp_path):
    from lorafit.train import train
    from tests.test_train_support import instruction_setup

    config = instruction_setup(tmp_path, 32, lora='r = 4\nlora_alpha = 8\ntarget_modules = ["q_proj", "v_proj"]\n'
                                                  'init_lora_weights = "eva"\neva_config = {tau = 0.95}',
                               train="epochs = 1\nbatch_size = 8\nlr = 1e-2")
    result = train(config, {"train.num_threads": 1}, progress=False)
    saved = lorafit.read_adapter(tmp_path / "run" / "adapter")[0]
    assert saved.init_lora_weights == "eva" and saved.eva_config["tau"] == 0.95
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-llama")
    fresh = lorafit.load_adapter(base.eval(), tmp_path / "run" / "adapter")
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    torch.testing.assert_close(fresh(ids).logits, result.model.eval()(ids).logits, rtol=1e-5, atol=1e-5)


def test_the_forward_stops_after_the_last_input_it_still_reads():
    """Only the grouping pass runs the whole model; the others stop at the last adapted layer's input (here layer
    1's q_proj: its MLP, the final norm and the head are left out)."""
    model = llama()
    calls = []
    model.lm_head.register_forward_hook(lambda *args: calls.append("head"))
    model.model.layers[1].mlp.register_forward_hook(lambda *args: calls.append("mlp"))
    with pytest.warns(UserWarning, match="the batches ran out"):
        lorafit.attach_eva(model, lorafit.LoraConfig(r=2, target_modules=["q_proj"], eva_config={"tau": 1.0}),
                           batches(3))
    assert calls == ["mlp", "head"]
