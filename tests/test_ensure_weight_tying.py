"""ensure_weight_tying (PEFT's): on a model whose output head shares the input embedding's weight, a LoRA adapter on
the embedding changes the head too (transposed), so the two stay one weight merged or not, and a modules_to_save
copy of either is one table for both. Checked against PEFT's logits, gradients and files."""

from __future__ import annotations

import warnings

import pytest
import torch

import lorafit
from lorafit.layers import TiedLoraHead
from tests.models import randomize_adapters, tiny_llama

peft = pytest.importorskip("peft")

IDS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))


def tied_llama(dtype=torch.float32):
    model = tiny_llama(1, tie_word_embeddings=True).to(dtype)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def peft_tied(tmp_path, dtype=torch.float32, **config):
    """A PEFT model with ensure_weight_tying and random factors (copies too), and the directory it saved."""
    config = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **config}
    model = peft.get_peft_model(tied_llama(dtype), peft.LoraConfig(ensure_weight_tying=True, **config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".modules_to_save." in name:
                p.add_(torch.randn_like(p) * 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's note that it saves the embedding layers
        model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("targets", [["embed_tokens", "q_proj"], ["lm_head", "q_proj"]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peft_files_load_with_peft_logits_and_save_back(tmp_path, targets, dtype):
    reference = peft_tied(tmp_path / "peft", dtype, target_modules=targets)
    expected = logits(reference)
    assert not torch.allclose(expected.float(), logits(tied_llama(dtype)).float(), atol=1e-2)
    model = lorafit.load_adapter(tied_llama(dtype), tmp_path / "peft")
    assert isinstance(model.lm_head, TiedLoraHead)
    assert not isinstance(model.model.embed_tokens, TiedLoraHead) and "lm_head" not in str(
        [n for n, _ in lorafit.model.lora_layers(model)])
    # bf16: the head adds its product in the GEMM, where PEFT rounds it, scales and adds
    tol = {"rtol": 0, "atol": 0} if dtype == torch.float32 else {"rtol": 0, "atol": 0.02 * expected.abs().max()}
    torch.testing.assert_close(logits(model), expected, **tol)

    lorafit.save_adapter(model, tmp_path / "lorafit")
    saved = lorafit.read_adapter(tmp_path / "lorafit")[1]
    embedding = "base_model.model.model.embed_tokens."
    torch.testing.assert_close(saved["base_model.model.lm_head.lora_A.weight"], saved[embedding + "lora_embedding_B"].T)
    torch.testing.assert_close(saved["base_model.model.lm_head.lora_B.weight"], saved[embedding + "lora_embedding_A"].T)
    back = peft.PeftModel.from_pretrained(tied_llama(dtype), tmp_path / "lorafit")
    torch.testing.assert_close(logits(back), expected, rtol=0, atol=0)  # the same tensors in PEFT


def test_gradients_are_the_sum_of_peft_s_two_views(tmp_path):
    """PEFT's head holds new Parameters on the embedding factors' storage, so each use gets its own gradient; in
    lorafit the embedding's factors are the head's too and get the sum."""
    reference = peft_tied(tmp_path, target_modules=["embed_tokens", "q_proj"])
    model = lorafit.load_adapter(tied_llama(), tmp_path, trainable=True)
    for m in (reference, model):
        m.train()
        (m(input_ids=IDS).logits.square().mean()).backward()
    emb = reference.base_model.model.model.embed_tokens
    head = reference.base_model.model.lm_head
    a_grad = emb.lora_embedding_A["default"].grad + head.lora_B["default"].weight.grad.T
    b_grad = emb.lora_embedding_B["default"].grad + head.lora_A["default"].weight.grad.T
    ours = model.model.embed_tokens
    torch.testing.assert_close(ours.lora_embedding_A["default"].grad, a_grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours.lora_embedding_B["default"].grad, b_grad, rtol=1e-5, atol=1e-7)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any("lm_head" in n for n in trainable)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merging_keeps_one_weight(dtype):
    model = lorafit.attach(tied_llama(dtype), lorafit.LoraConfig(
        r=4, target_modules=["embed_tokens", "q_proj"], ensure_weight_tying=True))
    randomize_adapters(model, 0.3)
    base, unmerged = logits(tied_llama(dtype)), logits(model)
    assert not torch.allclose(base.float(), unmerged.float(), atol=0.1)
    original = model.model.embed_tokens.base_layer.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is untied, so no warning about a copy
        lorafit.merge(model)
    head, embedding = model.lm_head.base_layer, model.model.embed_tokens.base_layer
    assert head.weight is embedding.weight and model.config.tie_word_embeddings
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0, "atol": 0.02 * unmerged.abs().max()}
    torch.testing.assert_close(logits(model).float(), unmerged.float(), **tol)
    with lorafit.disabled(model):
        torch.testing.assert_close(logits(model), base, rtol=0, atol=0 if dtype == torch.bfloat16 else 1e-5)
    lorafit.unmerge(model)
    if dtype == torch.bfloat16:
        assert torch.equal(embedding.weight, original)
    merged = lorafit.merge_and_unload(model)
    assert type(merged.lm_head) is torch.nn.Linear and merged.lm_head.weight is merged.model.embed_tokens.weight
    torch.testing.assert_close(logits(merged).float(), unmerged.float(), **tol)


def test_modules_to_save_is_one_table_for_both(tmp_path):
    reference = peft_tied(tmp_path / "peft", target_modules=["q_proj"], modules_to_save=["lm_head"])
    expected = logits(reference)
    model = lorafit.load_adapter(tied_llama(), tmp_path / "peft", trainable=True)
    table = model.model.embed_tokens.modules_to_save["default"].weight
    assert model.lm_head.modules_to_save["default"].weight is table
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=0)
    lorafit.save_adapter(model, tmp_path / "lorafit")
    torch.testing.assert_close(logits(peft.PeftModel.from_pretrained(tied_llama(), tmp_path / "lorafit")), expected,
                               rtol=0, atol=0)
    assert sum(p is table for p in model.parameters()) == 1  # one parameter for an optimizer
    merged = lorafit.merge_and_unload(model)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight is table


def test_adapter_per_row_applies_each_row_s_tied_head():
    model = tied_llama()
    for name in ("a", "b"):
        lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=["embed_tokens", "v_proj"],
                                                 init_lora_weights=False, ensure_weight_tying=True), name)
    alone = {}
    for name in ("a", "b"):
        lorafit.set_active(model, name)
        alone[name] = logits(model)
    with lorafit.disabled(model):
        alone[None] = logits(model)
    rows = ["b", None]
    with lorafit.adapter_per_row(model, rows):
        mixed = logits(model)
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], alone[name][i], rtol=1e-5, atol=1e-5)


def test_detach_unwraps_the_head_and_ties_stay():
    model = tied_llama()
    lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=["lm_head"], ensure_weight_tying=True), "a")
    lorafit.attach(model, lorafit.LoraConfig(r=2, target_modules=["embed_tokens"], ensure_weight_tying=True), "b")
    lorafit.detach(model, "a")
    assert isinstance(model.lm_head, TiedLoraHead) and model.lm_head.adapter_names == ["b"]
    lorafit.detach(model, "b")
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight


def test_tied_and_untied_adapters_on_one_embedding_are_refused():
    model = lorafit.attach(tied_llama(), lorafit.LoraConfig(r=4, target_modules=["embed_tokens"],
                                                            ensure_weight_tying=True), "tied")
    with pytest.raises(ValueError, match="attach it with ensure_weight_tying=True as well"):
        lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=["embed_tokens"]), "plain")
    with pytest.raises(ValueError, match="'lm_head', the output head that applies"):
        lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=["lm_head"]), "plain")
    assert list(lorafit.adapter_configs(model)) == ["tied"]
    model = lorafit.attach(tied_llama(), lorafit.LoraConfig(r=4, target_modules=["embed_tokens"]), "plain")
    with pytest.raises(ValueError, match="attached without ensure_weight_tying"):
        lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=["embed_tokens"], ensure_weight_tying=True), "t")
    assert type(model.lm_head) is torch.nn.Linear
    with pytest.raises(ValueError, match="ensure_weight_tying with use_dora=True"):
        lorafit.attach(tied_llama(), lorafit.LoraConfig(r=4, target_modules=["embed_tokens"], use_dora=True,
                                                        ensure_weight_tying=True))


def test_a_file_whose_head_factors_differ_is_refused_and_changes_nothing(tmp_path):
    peft_tied(tmp_path, target_modules=["embed_tokens"])
    config, tensors = lorafit.read_adapter(tmp_path)
    tensors["base_model.model.lm_head.lora_A.weight"] = tensors["base_model.model.lm_head.lora_A.weight"] + 1
    model = tied_llama()
    with pytest.raises(ValueError, match="ensure_weight_tying.*lm_head.lora_A.weight' is not the transpose"):
        lorafit.load_adapter_state(model, config, tensors)
    assert type(model.lm_head) is torch.nn.Linear and not lorafit.adapter_configs(model)


def test_nothing_to_tie():
    """An untied model warns (as PEFT does); a tied one whose adapter adapts neither the embedding nor the head
    is a plain adapter (PEFT writes the flag into such files too)."""
    untied = tiny_llama(1, tie_word_embeddings=False)
    with pytest.warns(UserWarning, match="nothing to tie"):
        lorafit.attach(untied, lorafit.LoraConfig(r=4, target_modules=["embed_tokens"], ensure_weight_tying=True))
    assert type(untied.lm_head) is torch.nn.Linear
    model = lorafit.attach(tied_llama(), lorafit.LoraConfig(r=4, target_modules=["q_proj"], ensure_weight_tying=True))
    assert type(model.lm_head) is torch.nn.Linear


def test_combined_tied_adapters_stay_tied():
    """combine_adapters of tied adapters is tied too: its head applies the combined embedding change; and a tied
    modules_to_save table taken with heads= stays one table."""
    model = tied_llama()
    for name in ("a", "b"):
        lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=["embed_tokens", "v_proj"],
                                                 ensure_weight_tying=True), name)
    randomize_adapters(model, 0.3)
    lorafit.set_active(model, ["a", "b"])
    both = logits(model)
    lorafit.combine_adapters(model, {"a": 1.0, "b": 1.0}, "ab")
    lorafit.set_active(model, "ab")
    torch.testing.assert_close(logits(model), both, rtol=1e-5, atol=1e-5)

    model = tied_llama()
    for name in ("a", "b"):
        lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=["v_proj"], modules_to_save=["lm_head"],
                                                 ensure_weight_tying=True), name)
    lorafit.combine_adapters(model, {"a": 0.5, "b": 0.5}, "ab", heads="a")
    table = model.model.embed_tokens.modules_to_save["ab"].weight
    assert model.lm_head.modules_to_save["ab"].weight is table
    assert table is not model.model.embed_tokens.modules_to_save["a"].weight
