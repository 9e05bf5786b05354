"""lorafit.optimizer_groups: weight decay on matrices only, and LoRA+ (B at lr * ratio) as PEFT steps it."""

from __future__ import annotations

import copy

import pytest
import torch

import lorafit
from lorafit import LoraConfig
from tests.models import randomize_adapters, tiny_llama

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]


def rates(model, groups) -> dict[str, tuple[float, float]]:
    """(lr, weight_decay) of each trained parameter, by its module path in either library's naming."""
    names = {id(p): n.removeprefix("base_model.model.").replace(".default", "").removesuffix(".weight")
             for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}


def test_loraplus_groups_are_peft_create_loraplus_optimizer_groups(tmp_path):
    from peft.optimizers import create_loraplus_optimizer

    torch.manual_seed(0)
    base = tiny_llama()
    ours = copy.deepcopy(base)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    randomize_adapters(theirs)
    theirs.save_pretrained(tmp_path)
    lorafit.load_adapter(ours, tmp_path, trainable=True)

    groups = lorafit.optimizer_groups(ours, lr=1e-3, weight_decay=0.01, loraplus_lr_ratio=16)
    optimizer = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
                                          loraplus_weight_decay=0.01)
    expected = rates(theirs, optimizer.param_groups)
    assert rates(ours, groups) == expected
    assert {v for k, v in expected.items() if ".lora_B" in k} == {(16e-3, 0.01)}
    assert {v for k, v in expected.items() if "lora_embedding" in k} == {(1e-6, 0.01)}

    # one AdamW step moves each weight by about its lr: B 16 times as far as A
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}
    ours(input_ids=torch.arange(24).view(2, 12) % 20).logits.pow(2).mean().backward()
    torch.optim.AdamW(groups).step()
    moved = {n: (p.detach() - before[n]).abs().mean().item() for n, p in ours.named_parameters() if n in before}
    assert min(v for n, v in moved.items() if "lora_B" in n) > 8 * max(v for n, v in moved.items() if "lora_A" in n)


def test_groups_split_decay_and_rates_and_leave_nothing_out():
    torch.manual_seed(0)
    model = tiny_llama()
    lorafit.attach(model, LoraConfig(r=4, target_modules=TARGETS[:3], lora_bias=True,
                                     modules_to_save=["lm_head"]))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = lorafit.optimizer_groups(model, lr=1e-3, weight_decay=0.1, loraplus_lr_ratio=4)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    for g in groups:
        for p in g["params"]:
            name = names[id(p)]
            assert g["lr"] == pytest.approx(4e-3 if "lora_B" in name else 1e-3), name  # lora_B and lora_B_bias
            assert g["weight_decay"] == (0.1 if p.ndim >= 2 and "norm" not in name else 0.0), name
    # ratio 1: the two plain groups, as before LoRA+
    plain = lorafit.optimizer_groups(model, lr=1e-3, weight_decay=0.1)
    assert [(g["lr"], g["weight_decay"]) for g in plain] == [(1e-3, 0.1), (1e-3, 0.0)]


def test_a_ratio_that_is_not_positive_is_refused():
    model = tiny_llama()
    with pytest.raises(ValueError, match="loraplus_lr_ratio must be > 0"):
        lorafit.optimizer_groups(model, lr=1e-3, loraplus_lr_ratio=0)
    with pytest.raises(ValueError, match="loraplus_lr_embedding must be > 0"):
        lorafit.optimizer_groups(model, lr=1e-3, loraplus_lr_ratio=16, loraplus_lr_embedding=-1.0)
