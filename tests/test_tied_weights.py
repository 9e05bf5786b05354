"""Merging into a weight that another module shares (tied input embedding and output head): the other module
gets a copy first, so the merged model computes what the unmerged one did; unmerging ties them again."""

from __future__ import annotations

import pytest
import torch

import lorafit
from tests.models import tiny_llama

transformers = pytest.importorskip("transformers")


def tied_llama():
    model = tiny_llama(1, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


IDS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("targets", [["embed_tokens", "q_proj"], ["lm_head"], ["embed_tokens", "lm_head"]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_equals_unmerged_and_unmerge_ties_again(targets, dtype):
    model = lorafit.attach(tied_llama().to(dtype), lorafit.LoraConfig(r=4, target_modules=targets,
                                                                      init_lora_weights=False))
    base = logits(tied_llama().to(dtype))
    unmerged = logits(model)
    assert not torch.allclose(unmerged.float(), base.float(), atol=1e-3)
    with pytest.warns(UserWarning, match="shares \\(tied embeddings\\)"):
        lorafit.merge(model)
    tol = {} if dtype == torch.float32 else {"rtol": 0, "atol": 0.1}
    torch.testing.assert_close(logits(model).float(), unmerged.float(), **tol)
    assert not model.config.tie_word_embeddings
    with lorafit.disabled(model):  # unmerged and tied again inside, merged and untied after
        torch.testing.assert_close(logits(model), base, rtol=0, atol=0 if dtype == torch.bfloat16 else 1e-5)
    torch.testing.assert_close(logits(model).float(), unmerged.float(), **tol)
    lorafit.unmerge(model)
    head = model.lm_head.base_layer if "lm_head" in targets else model.lm_head
    embed = model.model.embed_tokens.base_layer if "embed_tokens" in targets else model.model.embed_tokens
    assert head.weight is embed.weight and model.config.tie_word_embeddings
    torch.testing.assert_close(logits(model), unmerged)
    unloaded = lorafit.unload(model)
    assert unloaded.lm_head.weight is unloaded.model.embed_tokens.weight


def test_merge_and_unload_saves_and_reloads_untied(tmp_path):
    model = lorafit.attach(tied_llama(), lorafit.LoraConfig(r=4, target_modules=["embed_tokens"],
                                                            init_lora_weights=False))
    unmerged = logits(model)
    with pytest.warns(UserWarning, match="'lm_head' got a copy of it first"):
        merged = lorafit.merge_and_unload(model)
    torch.testing.assert_close(logits(merged), unmerged, rtol=1e-5, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert again.lm_head.weight is not again.model.embed_tokens.weight
    torch.testing.assert_close(logits(again), unmerged, rtol=1e-5, atol=1e-5)


def test_detaching_a_merged_adapter_ties_again():
    model = lorafit.attach(tied_llama(), lorafit.LoraConfig(r=4, target_modules=["embed_tokens"],
                                                            init_lora_weights=False))
    with pytest.warns(UserWarning):
        lorafit.merge(model)
    lorafit.detach(model, "default")
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.tie_word_embeddings
    torch.testing.assert_close(logits(model), logits(tied_llama()), rtol=0, atol=1e-5)
