"""lorafit.hotswap_adapter: another adapter's weights into an attached one, in place, computing what loading
the new adapter on its own computes, without changing what a compiled model holds."""

from __future__ import annotations

import pytest
import torch

import lorafit
from lorafit import LoraConfig
from tests.models import randomize_adapters, tiny_llama

pytest.importorskip("transformers")

IDS = torch.tensor([[1, 5, 9, 13, 2, 40, 7, 3], [4, 4, 8, 30, 21, 11, 6, 49]])
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def saved(tmp_path, label: str, config: LoraConfig, seed: int) -> tuple:
    """An adapter with random factors saved under tmp_path/label, and the logits it gives loaded by itself."""
    model = tiny_llama()
    lorafit.attach(model, config)
    torch.manual_seed(seed)
    randomize_adapters(model, 0.2)
    with torch.no_grad():  # and the saved modules' copies (a head), which randomize_adapters leaves
        for key, p in lorafit.adapter_parameters(model, "default").items():
            if ".lora_" not in key:
                p.add_(torch.randn_like(p) * 0.05)
    lorafit.save_adapter(model, tmp_path / label)
    with torch.no_grad():
        return tmp_path / label, model(input_ids=IDS).logits


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("new", [
    LoraConfig(r=8, lora_alpha=16, target_modules=ALL),  # the slot's shape
    LoraConfig(r=4, lora_alpha=32, target_modules=ALL, rank_pattern={"down_proj": 2}),  # smaller, other scales
    LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_rslora=True),  # fewer layers
    LoraConfig(r=8, lora_alpha=16, target_modules=ALL + ["embed_tokens"], modules_to_save=["lm_head"]),
], ids=["same-shape", "smaller-ranks", "fewer-layers", "embedding-and-head"])
def test_a_swapped_adapter_computes_what_it_computes_loaded_alone_and_saves_so(tmp_path, new):
    slot_config = LoraConfig(r=8, lora_alpha=16, target_modules=new.target_modules if new.modules_to_save else ALL,
                             modules_to_save=new.modules_to_save)
    old_dir, old_logits = saved(tmp_path, "old", slot_config, seed=1)
    new_dir, new_logits = saved(tmp_path, "new", new, seed=2)
    model = lorafit.load_adapter(tiny_llama(), old_dir)
    torch.testing.assert_close(logits(model), old_logits)
    before = {n: p for n, p in model.named_parameters()}
    modules = [type(m) for m in model.modules()]

    lorafit.hotswap_adapter(model, new_dir)
    torch.testing.assert_close(logits(model), new_logits, rtol=1e-5, atol=1e-5)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in after)  # the same tensors
    assert [type(m) for m in model.modules()] == modules and lorafit.adapter_configs(model).keys() == {"default"}
    # saved at the slot's rank and scale: it loads to the same outputs
    lorafit.save_adapter(model, tmp_path / "swapped")
    torch.testing.assert_close(logits(lorafit.load_adapter(tiny_llama(), tmp_path / "swapped")), new_logits,
                               rtol=1e-5, atol=1e-5)
    lorafit.hotswap_adapter(model, old_dir)  # and back
    torch.testing.assert_close(logits(model), old_logits, rtol=1e-5, atol=1e-5)


def test_dora_magnitudes_swap_and_a_layer_left_out_computes_the_base(tmp_path):
    old_dir, _ = saved(tmp_path, "old", LoraConfig(r=4, target_modules=ALL, use_dora=True), seed=1)
    new_dir, new_logits = saved(tmp_path, "new", LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), seed=2)
    model = lorafit.load_adapter(tiny_llama(), old_dir)
    lorafit.hotswap_adapter(model, new_dir)
    torch.testing.assert_close(logits(model), new_logits, rtol=1e-5, atol=1e-5)


def test_training_state_and_other_adapters_are_left_as_they_were(tmp_path):
    old_dir, _ = saved(tmp_path, "old", LoraConfig(r=4, target_modules=ALL), seed=1)
    new_dir, _ = saved(tmp_path, "new", LoraConfig(r=4, target_modules=ALL), seed=2)
    model = tiny_llama()
    lorafit.load_adapter(model, old_dir, "other")
    lorafit.load_adapter(model, old_dir, trainable=True, activate=False)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    lorafit.hotswap_adapter(model, new_dir)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert lorafit.active_adapters(model) == ["other"]


@pytest.mark.parametrize("new, message", [
    (LoraConfig(r=16, target_modules=ALL), r"rank 16 > the slot's 8"),
    (LoraConfig(r=4, target_modules=ALL + ["lm_head"]), r"adapts modules that adapter 'default' does not"),
    (LoraConfig(r=4, target_modules=ALL, use_dora=True), r"use_dora is True there but False here"),
    (LoraConfig(r=4, target_modules=ALL, modules_to_save=["lm_head"]), r"adapts modules that adapter"),
])
def test_what_a_value_copy_cannot_do_is_refused_and_changes_nothing(tmp_path, new, message):
    old_dir, old_logits = saved(tmp_path, "old", LoraConfig(r=8, target_modules=ALL), seed=1)
    new_dir, _ = saved(tmp_path, "new", new, seed=2)
    model = lorafit.load_adapter(tiny_llama(), old_dir)
    modules = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=message):
        lorafit.hotswap_adapter(model, new_dir)
    assert [type(m) for m in model.modules()] == modules and lorafit.adapter_configs(model).keys() == {"default"}
    torch.testing.assert_close(logits(model), old_logits, rtol=0, atol=0)


def test_a_kasa_slot_is_refused(tmp_path):
    kasa = LoraConfig(r=4, target_modules=["q_proj"], kasa_config={"beta": 1e-4, "gamma": 1e-3})
    old_dir, old_logits = saved(tmp_path, "old", kasa, seed=1)
    model = lorafit.load_adapter(tiny_llama(), old_dir)
    with pytest.raises(ValueError, match="KaSA adapters cannot be swapped"):
        lorafit.hotswap_adapter(model, old_dir)
    torch.testing.assert_close(logits(model), old_logits)


def test_a_merged_slot_or_a_missing_one_is_refused(tmp_path):
    old_dir, _ = saved(tmp_path, "old", LoraConfig(r=4, target_modules=ALL), seed=1)
    model = lorafit.load_adapter(tiny_llama(), old_dir)
    with pytest.raises(ValueError, match="no adapter 'other' to swap into"):
        lorafit.hotswap_adapter(model, old_dir, "other")
    lorafit.merge(model)
    with pytest.raises(ValueError, match="is merged into the base weights"):
        lorafit.hotswap_adapter(model, old_dir)


def test_a_compiled_model_runs_the_swapped_adapter_without_recompiling(tmp_path):
    """The slot attached with the largest rank and B = 0 (the base model's output), compiled, then adapters of
    other ranks and scales swapped in: each computes what it computes alone, and nothing recompiles."""
    first_dir, first_logits = saved(tmp_path, "first", LoraConfig(r=4, lora_alpha=8, target_modules=ALL), seed=1)
    second_dir, second_logits = saved(tmp_path, "second", LoraConfig(r=2, lora_alpha=32, target_modules=["q_proj"]),
                                      seed=2)
    model = tiny_llama()
    base_logits = logits(model)
    lorafit.attach(model, LoraConfig(r=8, target_modules=ALL), trainable=False)
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # guards decide recompiling, not the backend
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=IDS).logits, base_logits)
        with torch.compiler.set_stance("fail_on_recompile"):
            for directory, expected in ((first_dir, first_logits), (second_dir, second_logits)):
                lorafit.hotswap_adapter(compiled if directory == second_dir else model, directory)  # either works
                torch.testing.assert_close(compiled(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)
