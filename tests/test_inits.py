"""The initialisations PEFT names beyond the default: orthogonal, randomized-SVD PiSSA, and EVA adapters loaded
(computing EVA: test_eva.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorafit
from tests.models import tiny_llama
from lorafit.layers import Linear

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

IDS = torch.tensor([[1, 3, 5, 7, 9, 9, 2], [7, 0, 3, 4, 8, 9, 6]])
TARGETS = ["q_proj", "v_proj", "down_proj"]


def llama():
    return tiny_llama()


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_orthogonal_starts_as_a_no_op_with_both_factors_random_and_trainable():
    torch.manual_seed(0)
    layer = Linear(nn.Linear(24, 40))
    layer.add_adapter("default", r=6, scale=2.0, init="orthogonal")
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    assert a.abs().min() > 0 and b.abs().min() > 0
    assert (b @ a).abs().max() < 1e-6
    layer.set_active(["default"])
    x = torch.randn(3, 24)
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=1e-6)
    layer(x).square().sum().backward()
    assert a.grad.abs().max() > 0 and b.grad.abs().max() > 0  # with B = 0, A would get no gradient
    with pytest.raises(ValueError, match="init_lora_weights='orthogonal' needs an even rank, got r=5"):
        Linear(nn.Linear(24, 40)).add_adapter("default", r=5, scale=1.0, init="orthogonal")


def test_pissa_from_a_randomized_svd_keeps_the_output_and_finds_the_principal_part():
    torch.manual_seed(0)
    u, v = torch.linalg.qr(torch.randn(48, 48))[0], torch.linalg.qr(torch.randn(32, 32))[0]
    spectrum = torch.cat([torch.tensor([20.0, 15.0, 10.0, 8.0]), torch.full((28,), 0.1)])
    weight = (u[:, :32] * spectrum) @ v.T  # a clear gap after 4 singular values
    base = nn.Linear(32, 48, bias=False)
    with torch.no_grad():
        base.weight.copy_(weight)
    layer = Linear(base)
    layer.add_adapter("default", r=4, scale=0.5, init="pissa_niter_4")
    layer.set_active(["default"])
    x = torch.randn(5, 32)
    torch.testing.assert_close(layer(x), x @ weight.T, rtol=1e-4, atol=1e-4)
    principal = (u[:, :4] * spectrum[:4]) @ v[:, :4].T
    torch.testing.assert_close(0.5 * layer.lora_B["default"] @ layer.lora_A["default"], principal, rtol=0,
                               atol=1e-3)
    assert layer.base_layer.weight.abs().max() < 0.5  # the residual: what is left beside the principal part


def test_a_peft_orthogonal_or_eva_adapter_loads_to_the_same_logits_and_round_trips_its_config(tmp_path):
    for init, extra in (("orthogonal", {}), ("eva", {"eva_config": peft.EvaConfig(rho=1.5)})):
        made = peft.get_peft_model(llama(), peft.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=init,
                                                             **extra))
        torch.manual_seed(1)
        with torch.no_grad():
            for name, p in made.named_parameters():
                if ".lora_" in name:
                    p.normal_(std=0.1)  # as if trained (EVA: A from data, B trained from 0)
        made.save_pretrained(tmp_path / init)
        ours = lorafit.load_adapter(llama(), tmp_path / init)
        torch.testing.assert_close(logits(ours), logits(made.eval()), rtol=1e-5, atol=1e-5)
        config = lorafit.adapter_configs(ours)["default"]
        assert config.init_lora_weights == init
        lorafit.save_adapter(ours, tmp_path / f"{init}-again")
        again = peft.PeftModel.from_pretrained(llama(), tmp_path / f"{init}-again")
        assert again.peft_config["default"].init_lora_weights == init
        if init == "eva":
            assert config.eva_config["rho"] == 1.5 and again.peft_config["default"].eva_config.rho == 1.5
        torch.testing.assert_close(logits(again), logits(ours), rtol=1e-5, atol=1e-5)


def test_eva_needs_data_and_says_where_to_give_it():
    model = llama()
    with pytest.raises(ValueError, match=r"init_lora_weights='eva' takes A from the layers' inputs on data: attach "
                                         r"it with lorafit.attach_eva\(model, config, batches\)"):
        lorafit.attach(model, lorafit.LoraConfig(target_modules=TARGETS, init_lora_weights="eva"))
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear  # nothing half-attached
    with pytest.raises(ValueError, match="eva_config must be a mapping"):
        lorafit.LoraConfig(init_lora_weights="eva", eva_config=[1])
    with pytest.raises(ValueError, match="init_lora_weights='orthogonal' is not supported with target_parameters"):
        lorafit.LoraConfig(init_lora_weights="orthogonal", target_parameters=["mlp.experts.gate_up_proj"])


PEFT_HAS_NORA = tuple(int(v) for v in peft.__version__.split(".")[:2]) >= (0, 22)


def test_nora_starts_as_a_no_op_with_each_column_of_a_a_unit_vector_per_expert():
    torch.manual_seed(0)
    layer = Linear(nn.Linear(24, 40))
    layer.add_adapter("default", r=6, scale=1.0, init="nora")
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    torch.testing.assert_close(a.norm(dim=0), torch.ones(24))
    assert torch.equal(b, torch.zeros_like(b)) and a.std() > 0.1  # random directions, not a fixed basis

    config = transformers.MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=3,
                                        num_experts_per_tok=2, vocab_size=64)
    moe = transformers.MixtralForCausalLM(config)
    lorafit.attach(moe, lorafit.LoraConfig(r=4, target_parameters=["mlp.experts.down_proj"], init_lora_weights="nora"))
    experts = moe.model.layers[0].mlp.experts
    a = experts.factors_a["default"]  # (experts * r, in): expert e's rows at e*r ... e*r + r - 1
    torch.testing.assert_close(a.view(3, 4, -1).norm(dim=1), torch.ones(3, a.shape[-1]))

    with pytest.raises(ValueError, match="init_lora_weights='nora' is only supported for Linear layers, not conv"):
        lorafit.attach(nn.Sequential(nn.Conv2d(3, 8, 3)), lorafit.LoraConfig(target_modules=["0"],
                                                                            init_lora_weights="nora"))
    with pytest.raises(ValueError, match="init_lora_weights='nora' is not supported for Embedding layers"):
        lorafit.attach(nn.Sequential(nn.Embedding(10, 8)), lorafit.LoraConfig(target_modules=["0"],
                                                                             init_lora_weights="nora"))


@pytest.mark.skipif(not PEFT_HAS_NORA, reason="NoRA came with PEFT 0.22")
def test_a_peft_nora_adapter_loads_to_the_same_logits_and_round_trips_its_config(tmp_path):
    made = peft.get_peft_model(llama(), peft.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="nora"))
    a = made.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    torch.testing.assert_close(a.norm(dim=0), torch.ones(a.shape[1]))  # the same rule as lorafit's
    with torch.no_grad():
        for name, p in made.named_parameters():
            if ".lora_B" in name:
                p.normal_(std=0.1)
    made.save_pretrained(tmp_path / "peft")
    ours = lorafit.load_adapter(llama(), tmp_path / "peft")
    torch.testing.assert_close(logits(ours), logits(made.eval()), rtol=1e-5, atol=1e-5)
    assert lorafit.adapter_configs(ours)["default"].init_lora_weights == "nora"
    lorafit.save_adapter(ours, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(llama(), tmp_path / "again")
    assert again.peft_config["default"].init_lora_weights == "nora"
    torch.testing.assert_close(logits(again), logits(ours), rtol=1e-5, atol=1e-5)
