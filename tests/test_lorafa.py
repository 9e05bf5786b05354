"""LoRA-FA: A frozen, B's gradient projected; backward keeps no layer input for A."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorafit
from lorafit.lorafa import LoraFAProjection
from tests.models import tiny_llama

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))


def loss_of(model) -> torch.Tensor:
    return model(IDS, labels=IDS).loss


def test_the_projected_gradient_is_the_least_squares_step_of_b_alone():
    torch.manual_seed(0)
    layer = nn.Linear(24, 16)
    model = lorafit.attach(nn.Sequential(layer), lorafit.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    wrapper = model[0]
    a, b, s = wrapper.lora_A["default"], wrapper.lora_B["default"], wrapper.scaling["default"]
    with torch.no_grad():
        b.normal_(std=0.1)
    optimizer = lorafit.lorafa_optimizer(model, lr=1e-3)
    assert not a.requires_grad and b.requires_grad
    assert [p for g in optimizer.param_groups for p in g["params"]] == [b]

    x = torch.randn(5, 24)
    model(x).square().sum().backward()
    # the adapted weight's own gradient G: the same loss through W + s B A as one weight
    w = (layer.weight + s * b @ a).detach().requires_grad_(True)
    torch.nn.functional.linear(x, w, layer.bias).square().sum().backward()
    g_w = w.grad
    torch.testing.assert_close(b.grad, s * g_w @ a.T)  # B's plain gradient, before the step
    LoraFAProjection(model, ["default"]).project()
    # the dB whose s dB A comes closest to G (least squares): what the optimizer steps along
    best = torch.linalg.lstsq((s * a).T, g_w.T).solution.T
    torch.testing.assert_close(b.grad, best, rtol=1e-4, atol=1e-6)


def test_steps_equal_peft_create_lorafa_optimizer(monkeypatch):
    peft = pytest.importorskip("peft")
    from peft.optimizers import lorafa as peft_lorafa

    # PEFT projects under bfloat16 autocast where bf16 is available; compared here in float32
    monkeypatch.setattr(peft_lorafa, "is_bf16_available", lambda: False)
    config = dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config))
    ours = lorafit.attach(tiny_llama(), lorafit.LoraConfig(**config))
    with torch.no_grad():  # the same A (random) and B (zero) in both
        ours_params = dict(ours.named_parameters())
        for name, p in theirs.named_parameters():
            if ".lora_" in name:
                ours_params[name.removeprefix("base_model.model.").replace(".weight", "")].copy_(p)
    peft_opt = peft_lorafa.create_lorafa_optimizer(theirs, r=4, lora_alpha=16, lr=1e-2)
    # PEFT's Adam adds eps before its bias correction, torch after it: with eps ~ 0 both are plain Adam
    peft_opt.param_groups[0]["eps"] = 1e-14
    our_opt = lorafit.lorafa_optimizer(ours, lr=1e-2, eps=1e-14)
    for model, opt in ((theirs, peft_opt), (ours, our_opt)):
        for _ in range(3):
            opt.zero_grad()
            loss_of(model).backward()
            opt.step()
    theirs_params = dict(theirs.named_parameters())
    compared = 0
    for name, p in ours.named_parameters():
        if ".lora_" in name:
            other = theirs_params["base_model.model." + name.replace(".default", ".default.weight")]
            torch.testing.assert_close(p, other, rtol=1e-4, atol=1e-6, msg=name)
            compared += 1
    assert compared == 12
    assert not any(p.requires_grad for n, p in ours.named_parameters() if ".lora_A" in n)
    assert all(p.abs().max() > 0 for n, p in ours.named_parameters() if ".lora_B" in n)  # B moved


def saved_bytes(model, ids: torch.Tensor = IDS) -> int:
    """Bytes of the distinct storages autograd keeps for backward in one forward of a causal LM's loss."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids)
    return sum(storages.values())


def test_backward_keeps_no_layer_input_for_a_frozen_a():
    config = lorafit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1)
    lora = lorafit.attach(tiny_llama(), config).train()
    fa = lorafit.attach(tiny_llama(), config).train()
    lorafit.lorafa_optimizer(fa, lr=1e-3)
    saved_lora, saved_fa = saved_bytes(lora), saved_bytes(fa)
    # per decoder layer the LoRA input nothing else keeps: the down-projection's (intermediate wide) at least
    cfg = lora.config
    inputs = cfg.num_hidden_layers * IDS.numel() * cfg.intermediate_size * 4
    assert saved_lora - saved_fa >= inputs, (saved_lora, saved_fa, inputs)

    # and the gradients that remain are the plain ones
    lora_b = {n: p for n, p in lora.named_parameters() if ".lora_B" in n}
    torch.manual_seed(3)
    loss_of(lora.eval()).backward()
    torch.manual_seed(3)
    loss_of(fa.eval()).backward()
    for name, p in fa.named_parameters():
        if ".lora_B" in name:
            torch.testing.assert_close(p.grad, lora_b[name].grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("config, message", [
    (dict(use_dora=True), "DoRA"),
    (dict(init_lora_weights="mica"), "does not train"),
])
def test_what_lorafa_cannot_project_is_refused(config, message):
    model = lorafit.attach(tiny_llama(), lorafit.LoraConfig(r=2, target_modules=["q_proj"], **config))
    with pytest.raises(ValueError, match=message):
        lorafit.lorafa_optimizer(model, lr=1e-3)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_A" in n)  # nothing was frozen


def test_a_changed_in_place_gets_a_new_inverse():
    model = lorafit.attach(nn.Sequential(nn.Linear(8, 8)), lorafit.LoraConfig(r=2, target_modules=["0"]))
    projection = LoraFAProjection(model, ["default"])
    layer = model[0]
    first = projection._inverse(layer, "default")
    assert projection._inverse(layer, "default") is first
    with torch.no_grad():
        layer.lora_A["default"].mul_(2)
    torch.testing.assert_close(projection._inverse(layer, "default"), first / 4, rtol=1e-4, atol=1e-6)
