"""MiCA (init_lora_weights="mica"): PEFT's factors on Linear, GPT-2 Conv1D and Embedding layers; B frozen, A
trained; files in both directions; the refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorafit
from tests.models import Mixed, tiny_llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["embed_tokens", "q_proj", "v_proj", "up_proj", "down_proj"]


def llama():
    return tiny_llama()


def ids(seed=0):
    return torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(seed))


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch).logits


def config(**extra):
    return lorafit.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": "mica",
                                 **extra})


def test_same_factors_and_trainable_parameters_as_peft():
    theirs = peft.get_peft_model(llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                          init_lora_weights="mica"))
    ours = lorafit.attach(llama(), config())
    theirs_state = {k.replace("base_model.model.", "").replace(".default.weight", ".default")
                    .replace(".default", ""): v for k, v in theirs.state_dict().items()}
    ours_state = {k.replace(".default", ""): v for k, v in ours.state_dict().items()}
    assert theirs_state.keys() == ours_state.keys()
    for key, value in theirs_state.items():
        torch.testing.assert_close(ours_state[key], value, rtol=1e-5, atol=1e-6, msg=key)
    # B A = 0: the output is the base model's
    torch.testing.assert_close(logits(ours, ids()), logits(llama(), ids()))
    trainable = {n.replace(".default", "") for n, p in ours.named_parameters() if p.requires_grad}
    theirs_trainable = {n.replace("base_model.model.", "").replace(".default.weight", "").replace(".default", "")
                        for n, p in theirs.named_parameters() if p.requires_grad}
    assert trainable == theirs_trainable
    assert trainable and all(n.endswith((".lora_A", ".lora_embedding_A")) for n in trainable)
    # B spans the weight's least used output directions: W^T B is as small as the weight's r smallest singular values
    layer = ours.model.layers[0].mlp.down_proj
    smallest = torch.linalg.svdvals(layer.base_layer.weight.float())[-4:]
    torch.testing.assert_close(torch.linalg.norm(layer.base_layer.weight.T @ layer.lora_B["default"], dim=0),
                               smallest, rtol=1e-4, atol=1e-5)
    report = lorafit.trainable_parameters(ours)
    assert report.trainable == sum(p.numel() for n, p in ours.named_parameters() if ".lora_A." in n
                                   or ".lora_embedding_A." in n)


def test_training_moves_a_only_and_skips_b_gradients():
    model = lorafit.attach(llama(), config(lora_dropout=0.1)).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        batch = ids(step)
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    for name, p in model.named_parameters():
        if ".lora_" not in name:
            continue
        if "_B." in name:
            assert p.grad is None and torch.equal(p, before[name]), name
        else:
            assert not torch.equal(p, before[name]), name


def test_files_in_both_directions(tmp_path):
    ours = lorafit.attach(llama(), config())
    with torch.no_grad():  # trained-looking A
        for name, p in ours.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.1)
    expected = logits(ours, ids())
    assert not torch.allclose(expected, logits(llama(), ids()))
    lorafit.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(llama(), tmp_path / "ours", is_trainable=True)
    torch.testing.assert_close(logits(theirs, ids()), expected, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for n, p in theirs.named_parameters() if "lora_B" in n or "lora_embedding_B" in n)
    theirs.save_pretrained(tmp_path / "theirs")
    again = lorafit.load_adapter(llama(), tmp_path / "theirs", trainable=True)
    torch.testing.assert_close(logits(again, ids()), expected, rtol=1e-5, atol=1e-5)
    frozen = {n for n, p in again.named_parameters() if ".lora_" in n and not p.requires_grad}
    assert frozen and all("_B." in n for n in frozen)
    assert all(p.requires_grad for n, p in again.named_parameters() if "_A." in n)


def test_gpt2_conv1d_layout_matches_peft():
    gpt2 = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=4, n_positions=32)

    def model():
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(gpt2).eval()

    theirs = peft.get_peft_model(model(), peft.LoraConfig(r=4, target_modules=["c_attn", "c_fc"],
                                                          init_lora_weights="mica", fan_in_fan_out=True))
    ours = lorafit.attach(model(), lorafit.LoraConfig(r=4, target_modules=["c_attn", "c_fc"],
                                                      init_lora_weights="mica", fan_in_fan_out=True))
    for name in ("attn.c_attn", "mlp.c_fc"):
        mine = ours.get_submodule(f"transformer.h.0.{name}")
        peft_layer = theirs.base_model.model.get_submodule(f"transformer.h.0.{name}")
        torch.testing.assert_close(mine.lora_B["default"], peft_layer.lora_B["default"].weight, rtol=1e-5, atol=1e-6)
        assert not mine.lora_A["default"].any()


def test_refusals():
    with pytest.raises(ValueError, match="layers.0.self_attn.q_proj: init_lora_weights='mica' needs r <= 32"):
        lorafit.attach(llama(), config(r=40, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="conv1: init_lora_weights='mica' is supported for Linear and Embedding"):
        lorafit.attach(Mixed(), lorafit.LoraConfig(r=2, target_modules=["conv1", "mlp.0"], init_lora_weights="mica"))
    for extra, what in (({"use_dora": True}, "use_dora"), ({"alora_invocation_tokens": [3]}, "mica"),
                        ({"target_parameters": ["weight"], "target_modules": None}, "target_parameters"),
                        ({"lora_bias": True}, "lora_bias")):
        with pytest.raises(ValueError, match=what):
            config(**extra)
    model = Mixed()
    lorafit.attach(model, lorafit.LoraConfig(r=2, target_modules=["mlp.0"], init_lora_weights="mica"))
    assert isinstance(model.mlp[0].base_layer, nn.Linear)  # a refused attach above left nothing behind


def test_lorafit_train_trains_a_only(tmp_path):
    from lorafit.train import evaluate, train
    from tests.test_train_support import instruction_setup

    config = instruction_setup(tmp_path, 32, 8, train="epochs = 1\nbatch_size = 8\nlr = 1e-2\nnum_threads = 1")
    summary = train(config, ["lora.init_lora_weights='mica'", "task.generate_rows=0"], progress=False)
    saved, tensors = lorafit.read_adapter(tmp_path / "run" / "adapter")
    assert saved.init_lora_weights == "mica"
    fresh = lorafit.attach(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-llama"), saved)
    initial = {lorafit.io.peft_key(k, "default"): p for k, p in lorafit.adapter_parameters(fresh, "default").items()}
    for key, value in tensors.items():
        if "lora_B" in key:  # B as MiCA made it, A trained
            torch.testing.assert_close(value, initial[key].to(value.dtype), msg=key)
        else:
            assert value.abs().max() > 0, key
    assert evaluate(tmp_path / "run", "validation")["eval_loss"] == pytest.approx(
        summary["validation"]["eval_loss"], abs=1e-5)
