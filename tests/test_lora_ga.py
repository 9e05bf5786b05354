"""LoRA-GA (lorafit.attach_lora_ga): PEFT's factors and residual weights for every direction and scale; A spans the
gradient's top directions; an unchanged start; as_plain_lora; the refusals."""

from __future__ import annotations

import pytest
import torch

import lorafit
from tests.models import assert_plain_lora_reloads, tiny_llama
from lorafit.layers import LoraLayer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def llama():
    return tiny_llama()


def batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 50, (4, 12), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def config(**extra):
    return lorafit.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **extra})


def exact_svd_lowrank(a, q=6, niter=2, M=None):
    """torch.svd_lowrank's result made deterministic (an exact SVD, signs fixed): the randomized one's signs depend
    on its random draws, and A and B take different components, so they would not cancel in B A."""
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    sign = torch.sign(u[0:1, :q])
    sign[sign == 0] = 1
    return u[:, :q] * sign, s[:q], vh[:q].T * sign


@pytest.mark.parametrize("direction,scale", [("ArB2r", "stable"), ("A2rBr", "weight_svd"), ("ArBr", "gd_scale"),
                                             ("ArB2r", "unit")])
def test_same_factors_and_residuals_as_peft(monkeypatch, direction, scale):
    from peft.tuners.lora.config import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    monkeypatch.setattr(torch, "svd_lowrank", exact_svd_lowrank)
    data = batches()
    theirs = llama()
    theirs_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="lora_ga",
                                    lora_ga_config=LoraGAConfig(direction=direction, scale=scale))

    def train_step():
        for batch in data:
            theirs(**batch).loss.backward()

    preprocess_loraga(theirs, theirs_config, train_step)
    theirs = peft.get_peft_model(theirs, theirs_config)
    ours = lorafit.attach_lora_ga(llama(), config(lora_ga_config={"direction": direction, "scale": scale}), data)
    theirs_state = {k.replace("base_model.model.", "").replace(".default.weight", "").replace(".weight", ""): v
                    for k, v in theirs.state_dict().items()}
    ours_state = {k.replace(".default", "").replace(".weight", ""): v for k, v in ours.state_dict().items()}
    assert theirs_state.keys() == ours_state.keys()
    for key, value in theirs_state.items():
        torch.testing.assert_close(ours_state[key], value, rtol=1e-4, atol=1e-5, msg=key)
    ids = data[0]["input_ids"]
    torch.testing.assert_close(logits(ours, ids), logits(llama(), ids), rtol=0, atol=1e-4)
    saved = lorafit.adapter_configs(ours)["default"]
    assert saved.init_lora_weights == "lora_ga" and saved.lora_ga_config["direction"] == direction


def test_a_spans_the_gradients_top_directions():
    """With ArB2r, A's rows are the top r right singular vectors of the mean gradient: projecting the gradient onto
    them keeps the energy of its r largest singular values. The randomized SVD is used here, as users get it."""
    data = batches()
    reference = llama().train()
    for batch in data:
        reference(**batch).loss.backward()
    model = lorafit.attach_lora_ga(llama(), config(), data)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        grad = reference.get_submodule(name).weight.grad / len(data)
        a = model.get_submodule(name).lora_A["default"]
        top = torch.linalg.svdvals(grad)[:4]
        kept = torch.linalg.norm(grad @ a.T)
        torch.testing.assert_close(kept, torch.linalg.norm(top), rtol=2e-2, atol=0, msg=name)
    # the base model's own parameters are left as they were: frozen, no gradients kept
    assert all(p.grad is None for p in model.parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lorafit.adapter_parameters(model, "default"))


def test_gpt2_conv1d_start_unchanged():
    gpt2 = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=4, n_positions=32)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(gpt2).eval()
    model = transformers.GPT2LMHeadModel(gpt2).eval()
    model.load_state_dict(base.state_dict())
    lorafit.attach_lora_ga(model, lorafit.LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
                           batches())
    ids = batches()[0]["input_ids"]
    layer = model.transformer.h[0].attn.c_attn
    assert layer.lora_A["default"].shape == (4, 32) and layer.lora_B["default"].shape == (96, 4)
    assert not torch.equal(layer.base_layer.weight, base.transformer.h[0].attn.c_attn.weight)
    torch.testing.assert_close(logits(model, ids), logits(base, ids), rtol=0, atol=1e-4)


def test_as_plain_lora_and_the_refusals(tmp_path):
    data = batches()
    ids = data[0]["input_ids"]
    model = lorafit.attach_lora_ga(llama(), config(), data)
    assert_plain_lora_reloads(model, llama(), ids, tmp_path / "plain")

    lorafit.save_adapter(model, tmp_path / "ga")
    with pytest.raises(ValueError, match="a LoRA-GA adapter .* takes the data it ran on to make again; save it with "
                                         "as_plain_lora=True"):
        lorafit.load_adapter(llama(), tmp_path / "ga")
    with pytest.raises(ValueError, match="init_lora_weights='lora_ga' computes the factors from the weights' "
                                         "gradients"):
        lorafit.attach(llama(), config(init_lora_weights="lora_ga"))
    with pytest.raises(ValueError, match="direction'\\] must be one of"):
        lorafit.attach_lora_ga(llama(), config(lora_ga_config={"direction": "x"}), data)
    with pytest.raises(ValueError, match="unknown keys \\['gamma'\\]"):
        lorafit.attach_lora_ga(llama(), config(lora_ga_config={"gamma": 3}), data)
    with pytest.raises(ValueError, match="q_proj: LoRA-GA takes 2r components, so it needs 2r <= min\\(d_in, "
                                         "d_out\\) = 32, got r=17"):
        lorafit.attach_lora_ga(llama(), config(r=17), data)
    quantized = lorafit.quantize.quantize_base(llama(), 4)
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.q_proj' is a QuantizedLinear"):
        lorafit.attach_lora_ga(quantized, config(), data)
    with pytest.raises(ValueError, match="no .loss \\(do the batches have labels"):
        lorafit.attach_lora_ga(llama(), config(), [{"input_ids": ids}])
    with pytest.raises(ValueError, match="must be a scalar tensor .* got Tensor of shape \\[4, 12, 50\\]"):
        lorafit.attach_lora_ga(llama(), config(), data, loss=lambda m, b: m(input_ids=b["input_ids"]).logits)
    weights = {n: p.clone() for n, p in llama().named_parameters()}
    untouched = llama()
    grads = {n: p.requires_grad for n, p in untouched.named_parameters()}
    with pytest.raises(ValueError, match="no gradient reached"):
        lorafit.attach_lora_ga(untouched, config(), [])
    assert not any(isinstance(m, LoraLayer) for m in untouched.modules())
    assert all(torch.equal(weights[n], p) and p.requires_grad == grads[n] and p.grad is None
               for n, p in untouched.named_parameters())
    assert not untouched.training


def test_lorafit_train_starts_from_lora_ga_and_saves_a_plain_lora(tmp_path):
    from lorafit.train import evaluate, train
    from tests.test_train_support import instruction_setup

    config = instruction_setup(tmp_path, 32, 8, train="epochs = 1\nbatch_size = 8\nlr = 1e-2\nnum_threads = 1")
    summary = train(config, ["lora.init_lora_weights='lora_ga'", "lora.r=4", "task.generate_rows=0"],
                    progress=False)
    saved = lorafit.LoraConfig.load(tmp_path / "run" / "adapter" / "adapter_config.json")
    # a LoRA of the original weights (the trained factors and the initial ones, negated): it loads anywhere
    assert saved.init_lora_weights is True and saved.r == 8 and saved.lora_ga_config is None
    # evaluated on the original base with that file: what training measured on the residual base
    assert evaluate(tmp_path / "run", "validation")["eval_loss"] == pytest.approx(
        summary["validation"]["eval_loss"], abs=1e-4)
    with pytest.raises(ValueError, match="'lora_ga' leaves a residual in the full-precision weights"):
        train(config, ["lora.init_lora_weights='lora_ga'", "model.quantize=4"], progress=False, overwrite=True)


def test_a_resumed_lora_ga_classifier_run_ends_where_an_uninterrupted_one_does(tmp_path):
    """The resumed run computes LoRA-GA's start again on the same batches (the residual base it trained on), then
    takes the trained factors from its checkpoint."""
    from lorafit.train import train
    from tests.test_train_loop import RESUME, Crash, adapter_tensors, assert_same_tensors, crash_at
    from tests.test_train_support import classification_setup

    config = classification_setup(tmp_path)
    ga = RESUME + ["lora.init_lora_weights='lora_ga'", "lora.r=4"]
    full = train(config, ga + [f"output_dir={str(tmp_path / 'a')!r}"], progress=False)
    args = ga + [f"output_dir={str(tmp_path / 'b')!r}"]
    with pytest.raises(Crash):
        train(config, args, callbacks=(crash_at(17),), progress=False)
    resumed = train(config, args, resume=True, progress=False)
    assert_same_tensors(adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b"))
    assert resumed["validation"] == pytest.approx(full["validation"], abs=1e-6)
