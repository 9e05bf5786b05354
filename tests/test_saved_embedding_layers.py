"""PEFT's save_embedding_layers: after new tokens were added in training, PEFT saves the whole input embedding and
output head beside the adapter (``<module>.weight``, not listed in modules_to_save). lorafit loads such a file as
the adapter with its own copies of those modules: PEFT's outputs, the base model's weights untouched, and saved
back as a file PEFT reads to the same outputs."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import lorafit

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

VOCAB, GROWN = 64, 70


def llama(tied: bool) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config).eval()


def grown(tied: bool) -> transformers.LlamaForCausalLM:
    """The base model with its vocabulary resized, as a user loading the adapter resizes it (new rows: whatever
    transformers' resizing draws, which are not the rows training ended with)."""
    model = llama(tied)
    model.resize_token_embeddings(GROWN, mean_resizing=False)
    return model


IDS = torch.randint(0, GROWN, (2, 8), generator=torch.Generator().manual_seed(1))


def _trained_with_new_tokens(tmp_path, tied: bool):
    model = grown(tied)
    with torch.no_grad():  # the new tokens' rows as training left them
        model.get_input_embeddings().weight[VOCAB:] = torch.randn(GROWN - VOCAB, 32)
        if not tied:
            model.get_output_embeddings().weight[VOCAB:] = torch.randn(GROWN - VOCAB, 32)
    theirs = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                        init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "peft", save_embedding_layers=True)
    with torch.no_grad():
        return theirs(IDS).logits


@pytest.mark.parametrize("tied", [False, True])
def test_the_adapter_brings_its_embedding_rows_and_leaves_the_base_alone(tied, tmp_path):
    expected = _trained_with_new_tokens(tmp_path, tied)
    base = grown(tied)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with torch.no_grad():
        base_logits = base(IDS).logits
    with pytest.warns(UserWarning, match=r"whole weights of \['model.embed_tokens'.*loaded as this adapter's own"):
        ours = lorafit.load_adapter(base, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, expected, rtol=1e-5, atol=1e-5)
        with lorafit.disabled(ours):
            torch.testing.assert_close(ours(IDS).logits, base_logits, rtol=0, atol=0)
    assert all(torch.equal(v, before[k]) for k, v in lorafit.unload(copy.deepcopy(ours)).state_dict().items())

    lorafit.save_adapter(ours, tmp_path / "lorafit")
    saved = json.loads((tmp_path / "lorafit" / "adapter_config.json").read_text())["modules_to_save"]
    assert "model.embed_tokens" in saved
    with torch.no_grad():
        back = peft.PeftModel.from_pretrained(grown(tied), tmp_path / "lorafit")
        torch.testing.assert_close(back(IDS).logits, expected, rtol=1e-5, atol=1e-5)
        again = lorafit.load_adapter(grown(tied), tmp_path / "lorafit")
        torch.testing.assert_close(again(IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_copies_equal_to_the_model_are_dropped(tmp_path):
    theirs = peft.get_peft_model(llama(False), peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "peft", save_embedding_layers=True)
    ids = IDS % VOCAB
    with torch.no_grad():
        expected = theirs(ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = lorafit.load_adapter(llama(False), tmp_path / "peft")
    assert lorafit.adapter_configs(ours)["default"].modules_to_save is None
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_a_model_without_the_new_tokens_is_told_to_resize(tmp_path):
    _trained_with_new_tokens(tmp_path, False)
    model = llama(False)
    before = str(model)
    with pytest.raises(ValueError, match=r"'base_model.model.model.embed_tokens.weight' holds the whole weight of "
                                         r"'model.embed_tokens' with shape \[70, 32\].*resize_token_embeddings\(70\)"):
        lorafit.load_adapter(model, tmp_path / "peft")
    assert str(model) == before and lorafit.adapter_configs(model) == {}


def test_a_targeted_embedding_with_new_rows_is_refused_naming_the_file_and_the_rows(tmp_path):
    """With the embedding adapted too, PEFT saves its base weight (``base_layer.weight``), which it overwrites the
    model's with; lorafit does not overwrite base weights and says where the file differs."""
    model = grown(False)
    with torch.no_grad():
        model.get_input_embeddings().weight[VOCAB:] = torch.randn(GROWN - VOCAB, 32)
    theirs = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    theirs.save_pretrained(tmp_path / "peft", save_embedding_layers=True)
    target = grown(False)
    with pytest.raises(ValueError, match=r"adapter_model.safetensors does not fit this model .*'base_model.model.model"
                                         r".embed_tokens.base_layer.weight'.* holds other values than the model \(in 6 "
                                         r"of its 70 rows\)"):
        lorafit.load_adapter(target, tmp_path / "peft")
    assert lorafit.adapter_configs(target) == {}


def test_a_model_without_token_embeddings_loads_adapters(tmp_path):
    """transformers' vision models raise NotImplementedError from get_input_embeddings: nothing to look for."""
    def resnet():
        torch.manual_seed(0)
        return transformers.ResNetForImageClassification(transformers.ResNetConfig(
            num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)).eval()

    pixels = torch.randn(2, 3, 32, 32)
    model = lorafit.attach(resnet(), lorafit.LoraConfig(r=2, target_modules=["convolution"], init_lora_weights=False))
    lorafit.save_adapter(model, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(lorafit.load_adapter(resnet(), tmp_path / "a")(pixel_values=pixels).logits,
                                   model(pixel_values=pixels).logits, rtol=1e-5, atol=1e-5)
