"""transformers' scaled embeddings (Gemma's buffer, BART's number) multiply the rows they look up by embed_scale:
a LoRA adapter on one scales its rows too, so it gives PEFT's logits and merged equals unmerged."""

from __future__ import annotations

import warnings

import pytest
import torch

import lorafit

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

IDS = torch.randint(3, 50, (2, 7), generator=torch.Generator().manual_seed(1))


def gemma():
    torch.manual_seed(0)
    config = transformers.GemmaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      tie_word_embeddings=False)
    model = transformers.GemmaForCausalLM(config).eval()
    assert float(model.model.embed_tokens.embed_scale) > 5  # sqrt(hidden): a scale that matters
    return model


def bart():
    torch.manual_seed(0)
    config = transformers.BartConfig(vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                     decoder_ffn_dim=32, scale_embedding=True, max_position_embeddings=32)
    model = transformers.BartForConditionalGeneration(config).eval()
    assert model.model.encoder.embed_tokens.embed_scale == 4.0  # a number, not a tensor
    return model


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, **({"decoder_input_ids": IDS} if model.config.is_encoder_decoder else {})).logits


@pytest.mark.parametrize("make", [gemma, bart])
def test_peft_logits_both_ways(make, tmp_path):
    theirs = peft.get_peft_model(make(), peft.LoraConfig(r=4, target_modules=["embed_tokens"],
                                                         init_lora_weights=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's note that it saves the embedding layers
        theirs.save_pretrained(tmp_path / "peft")
    expected = logits(theirs)
    ours = lorafit.load_adapter(make(), tmp_path / "peft")
    torch.testing.assert_close(logits(ours), expected, rtol=1e-5, atol=1e-5)
    lorafit.save_adapter(ours, tmp_path / "lorafit")
    torch.testing.assert_close(logits(peft.PeftModel.from_pretrained(make(), tmp_path / "lorafit")), expected,
                               rtol=1e-5, atol=1e-5)


def test_merged_and_per_row_equal_unmerged():
    model = gemma()
    for name in ("a", "b"):
        lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=["embed_tokens"], init_lora_weights=False),
                       name)
    lorafit.set_active(model, "a")
    unmerged = logits(model)
    with lorafit.disabled(model):
        base = logits(model)
    assert not torch.allclose(unmerged, base, atol=1e-2)
    with lorafit.adapter_per_row(model, ["a", None]):
        mixed = logits(model)
    torch.testing.assert_close(mixed[0], unmerged[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], base[1], rtol=1e-5, atol=1e-5)
    lorafit.merge(model)
    torch.testing.assert_close(logits(model), unmerged, rtol=1e-5, atol=1e-4)
