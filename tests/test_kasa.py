"""KaSA (kasa_config, PEFT's): the base weights truncated on attach and on load, a trained diagonal between A and B,
PEFT's logits, gradients, regularizers and files both ways, merge, and the refusals that keep a model intact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorafit
from tests.models import randomize_adapters, tiny_llama

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]
KASA = {"beta": 0.01, "gamma": 0.1}
IDS = torch.tensor([[1, 5, 9, 13, 2, 40, 7, 3], [4, 4, 8, 30, 21, 11, 6, 49]])


def logits_loss_and_grads(model, regularizer, ids=IDS):
    out = model(input_ids=ids, labels=ids)
    (out.loss + regularizer(model)).backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:  # PEFT's names: base_model.model.<module>.lora_A.default.weight, ....lora_diag.default
            grads[name.removeprefix("base_model.model.").replace(".default.weight", "").replace(".default", "")] = \
                p.grad.clone()
    return out.logits.detach(), grads


def test_peft_logits_gradients_regularizers_and_files_both_ways(tmp_path):
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                               kasa_config=KASA))
    randomize_adapters(theirs, 0.3)  # B = 0 at the start would hide A's and the diagonal's part
    expected, expected_grads = logits_loss_and_grads(theirs, lambda m: m.base_model._get_kasa_loss())
    theirs.save_pretrained(tmp_path / "peft")

    original = tiny_llama()
    ours = lorafit.load_adapter(tiny_llama(), tmp_path / "peft", trainable=True)
    assert lorafit.adapter_configs(ours)["default"].kasa_config == KASA
    q_proj = ours.model.layers[0].self_attn.q_proj
    # loading truncated the weight as attaching did: its 4 smallest singular values are gone
    values = torch.linalg.svdvals(q_proj.base_layer.weight.detach())
    torch.testing.assert_close(values[:-4], torch.linalg.svdvals(original.model.layers[0].self_attn.q_proj.weight)
                               [:-4], rtol=1e-5, atol=1e-6)
    assert values[-4:].max() < 1e-5
    with torch.no_grad():
        torch.testing.assert_close(lorafit.kasa_loss(ours), theirs.base_model._get_kasa_loss())
    got, grads = logits_loss_and_grads(ours, lorafit.kasa_loss)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert grads.keys() == expected_grads.keys() and sum(".lora_diag" in k for k in grads) == 2 * len(TARGETS)
    for key, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[key], rtol=1e-4, atol=1e-6)

    lorafit.save_adapter(ours, tmp_path / "lorafit")
    again = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lorafit")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=IDS).logits, got, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_and_the_truncated_base_stays(dtype):
    model = tiny_llama().to(dtype)
    original = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=TARGETS, kasa_config={}))
    assert lorafit.adapter_configs(model)["default"].kasa_config == {"beta": 1e-4, "gamma": 1e-3}
    randomize_adapters(model, 0.3)
    with torch.no_grad():
        unmerged = model(input_ids=IDS).logits.float()
        with lorafit.disabled(model):
            truncated = model(input_ids=IDS).logits.float()
        lorafit.merge(model)
        tol = 1e-5 if dtype == torch.float32 else 0.05
        torch.testing.assert_close(model(input_ids=IDS).logits.float(), unmerged, rtol=tol, atol=tol)
        lorafit.unmerge(model)
        with lorafit.disabled(model):
            torch.testing.assert_close(model(input_ids=IDS).logits.float(), truncated, rtol=tol, atol=tol)
    model = lorafit.unload(model)  # the truncation is KaSA's, for good, as PEFT's is
    weight = model.model.layers[1].mlp.down_proj.weight
    assert not torch.equal(weight, original)
    assert torch.linalg.matrix_rank(weight.float(), atol=0.05).item() == min(weight.shape) - 4


def test_training_moves_the_diagonal_and_the_regularizers():
    model = tiny_llama()
    lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=TARGETS, kasa_config={"beta": 0.1, "gamma": 0.1}))
    diag = model.model.layers[0].self_attn.q_proj.lora_diag["default"]
    assert diag.requires_grad and "model.layers.0.self_attn.q_proj.lora_diag.default" in \
        lorafit.adapter_parameters(model, "default")
    start, reg = diag.detach().clone(), lorafit.kasa_loss(model).item()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        loss = model(input_ids=IDS, labels=IDS).loss + lorafit.kasa_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not torch.equal(diag.detach(), start)
    assert lorafit.kasa_loss(model).item() < reg
    assert lorafit.kasa_loss(model, []) == 0.0


def test_refusals_leave_the_model_as_it_was():
    model = tiny_llama()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}

    def unchanged():
        assert not any(isinstance(m, lorafit.layers.LoraLayer) for m in model.modules())
        assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())

    # v_proj's weight is 16 x 32: r = 16 would drop all of it, and the other layers come first
    with pytest.raises(ValueError, match=r"v_proj: KaSA .* needs r < 16 \(the smaller side of the weight\), got r=16"):
        lorafit.attach(model, lorafit.LoraConfig(r=16, target_modules=TARGETS, kasa_config={}))
    unchanged()
    with pytest.raises(ValueError, match="lm_head: its weight is shared"):
        tied = tiny_llama(tie_word_embeddings=True)
        lorafit.attach(tied, lorafit.LoraConfig(r=4, target_modules=["lm_head"], kasa_config={}))
    with pytest.raises(ValueError, match="embed_tokens: KaSA .* nn.Linear layers, not Embedding"):
        lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=["embed_tokens"], kasa_config={}))
    unchanged()
    for field in ({"use_dora": True}, {"lora_bias": True}, {"init_lora_weights": "pissa"}):
        with pytest.raises(ValueError, match="kasa_config \\(KaSA\\) is not supported with"):
            lorafit.LoraConfig(r=4, kasa_config={}, **field)
    with pytest.raises(ValueError, match="kasa_config: unknown keys \\['alpha'\\]"):
        lorafit.LoraConfig(kasa_config={"alpha": 1})
    with pytest.raises(ValueError, match="kasa_config.beta must be a number >= 0"):
        lorafit.LoraConfig(kasa_config={"beta": -1})

    lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=["q_proj"]), "plain")
    with pytest.raises(ValueError, match="adapter 'plain' is attached, and KaSA"):
        lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=TARGETS, kasa_config={}), "kasa")
    lorafit.detach(model, "plain")
    lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=TARGETS, kasa_config={}), "kasa")
    with pytest.raises(ValueError, match="adapter 'kasa' is attached, and KaSA"):
        lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=["q_proj"]), "plain")
    with pytest.raises(ValueError, match="'kasa' is a KaSA adapter .* adapter_per_row does not run it"):
        with lorafit.adapter_per_row(model, ["kasa", None]):
            pass
    with pytest.raises(ValueError, match=r"adapters \['kasa'\] are KaSA adapters .* combine_adapters does not"):
        lorafit.combine_adapters(model, {"kasa": 0.5}, "half")
    with pytest.raises(ValueError, match="Arrow mixes plain LoRA adapters .* KaSA adapters"):
        with lorafit.arrow_routing(model, ["kasa"]):
            pass
    assert list(lorafit.adapter_configs(model)) == ["kasa"]


def test_quantized_and_gpt2_layers_are_refused_by_name():
    from transformers.pytorch_utils import Conv1D

    from lorafit.quantize import quantize_base

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    quantize_base(model, bits=4, skip=("2",))
    with pytest.raises(ValueError, match=r"0: KaSA .* not QuantizedLinear"):
        lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=["0", "2"], kasa_config={}))
    model = nn.Sequential(Conv1D(16, 16))
    with pytest.raises(ValueError, match=r"0: KaSA .* not Conv1D"):
        lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=["0"], kasa_config={}))
