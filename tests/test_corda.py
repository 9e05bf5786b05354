"""CorDA (lorafit.attach_corda): the factors and residual weights PEFT computes on the same data, in both modes;
an unchanged output at the start; padding left out; as_plain_lora; the refusals."""

from __future__ import annotations

import copy

import pytest
import torch

import lorafit
from tests.models import assert_plain_lora_reloads, tiny_llama
from lorafit.layers import LoraLayer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"]


def llama():
    return tiny_llama()


def rows(n=12, length=16, seed=0):
    return torch.randint(0, 50, (n, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def config(method="ipm", **extra):
    return lorafit.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS,
                                 "corda_config": {"corda_method": method}, **extra})


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_same_factors_and_residuals_as_peft(method):
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    ids = rows()
    theirs_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="corda",
                                    corda_config=CordaConfig(corda_method=method))
    theirs = llama()
    # PEFT's covariance hook takes one sequence per forward
    preprocess_corda(theirs, theirs_config, run_model=lambda: [theirs(input_ids=r[None]) for r in ids])
    theirs = peft.get_peft_model(theirs, theirs_config)
    # lorafit reads batches of several sequences; each is scaled on its own as PEFT does
    ours = lorafit.attach_corda(llama(), config(method), [{"input_ids": ids[i:i + 4]} for i in range(0, 12, 4)])
    theirs_state = {k.replace("base_model.model.", "").replace(".default.weight", "").replace(".weight", ""): v
                    for k, v in theirs.state_dict().items()}
    ours_state = {k.replace(".default", "").replace(".weight", ""): v for k, v in ours.state_dict().items()}
    assert theirs_state.keys() == ours_state.keys()
    for key, value in theirs_state.items():
        torch.testing.assert_close(ours_state[key], value, rtol=1e-3, atol=1e-4, msg=key)
    # the start is the model itself: the residual plus the adapter
    torch.testing.assert_close(logits(ours, ids), logits(llama(), ids), rtol=0, atol=1e-4)
    assert lorafit.adapter_configs(ours)["default"].init_lora_weights == "corda"


def test_ipm_takes_what_the_inputs_use_and_kpm_leaves_it():
    """On inputs confined to a few directions, the instruction-previewed adapter takes W's part along them and the
    knowledge-preserved one leaves it in the base."""
    torch.manual_seed(1)
    layer = torch.nn.Linear(32, 24, bias=False)
    basis = torch.linalg.qr(torch.randn(32, 32))[0]
    x = torch.randn(8, 20, 4) @ basis[:, :4].T * 3 + torch.randn(8, 20, 32) * 0.01  # 4 directions used
    parts = {}
    for method in ("ipm", "kpm"):
        model = torch.nn.Sequential(copy.deepcopy(layer))
        lorafit.attach_corda(model, lorafit.LoraConfig(r=4, target_modules=["0"], corda_config={
            "corda_method": method}), [x])
        wrapped = model[0]
        delta = wrapped.scaling["default"] * wrapped.lora_B["default"] @ wrapped.lora_A["default"]
        parts[method] = (x.reshape(-1, 32) @ delta.T).norm() / (x.reshape(-1, 32) @ layer.weight.T).norm()
    assert parts["ipm"] > 0.99 and parts["kpm"] < 0.01, parts


def test_padding_is_left_out():
    ids = rows(4)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    padded = ids.clone()
    padded[1, 10:] = 0
    with_padding = lorafit.attach_corda(llama(), config(), [{"input_ids": padded, "attention_mask": mask}])
    # the same sequences without the padding, one at a time
    alone = lorafit.attach_corda(llama(), config(), [{"input_ids": ids[i:i + 1]} for i in (0, 2, 3)] + [
        {"input_ids": ids[1:2, :10]}])
    for (name, a), (_, b) in zip(lorafit.model.lora_layers(with_padding), lorafit.model.lora_layers(alone)):
        torch.testing.assert_close(a.lora_A["default"], b.lora_A["default"], rtol=1e-3, atol=1e-4, msg=name)


def test_as_plain_lora_and_the_refusals(tmp_path):
    ids = rows()
    model = lorafit.attach_corda(llama(), config(), [{"input_ids": ids}])
    assert_plain_lora_reloads(model, llama(), ids, tmp_path / "plain")

    lorafit.save_adapter(model, tmp_path / "corda")
    with pytest.raises(ValueError, match="a CorDA adapter .* takes the data it ran on to make again; save it with "
                                         "as_plain_lora=True"):
        lorafit.load_adapter(llama(), tmp_path / "corda")
    with pytest.raises(ValueError, match="init_lora_weights='corda' computes the factors from the layers' inputs"):
        lorafit.attach(llama(), config(init_lora_weights="corda"))
    with pytest.raises(ValueError, match="corda_method'\\] must be 'ipm' or 'kpm', got 'x'"):
        lorafit.attach_corda(llama(), config("x"), [{"input_ids": ids}])
    with pytest.raises(ValueError, match="reads no cache files"):
        lorafit.attach_corda(llama(), config(corda_config={"cache_file": "c.pt"}), [{"input_ids": ids}])
    quantized = lorafit.quantize.quantize_base(llama(), 4)
    with pytest.raises(ValueError, match="CorDA initialises the weights of nn.Linear layers; 'model.layers.0.self_attn"
                                         ".q_proj' is a QuantizedLinear"):
        lorafit.attach_corda(quantized, config(), [{"input_ids": ids}])
    weights = {n: p.clone() for n, p in llama().named_parameters()}
    untouched = llama()
    with pytest.raises(ValueError, match="no input reached"):
        lorafit.attach_corda(untouched, config(), [])
    assert not any(isinstance(m, LoraLayer) for m in untouched.modules())
    assert all(torch.equal(weights[n], p) for n, p in untouched.named_parameters())


def test_lorafit_train_starts_from_corda_and_saves_a_plain_lora(tmp_path):
    from lorafit.train import evaluate, train
    from tests.test_train_support import instruction_setup

    config = instruction_setup(tmp_path, 32, 8, train="epochs = 1\nbatch_size = 8\nlr = 1e-2\nnum_threads = 1")
    summary = train(config, ["lora.init_lora_weights='corda'", "lora.r=4", "lora.corda_config={corda_method='kpm'}",
                             "task.generate_rows=0"], progress=False)
    saved = lorafit.LoraConfig.load(tmp_path / "run" / "adapter" / "adapter_config.json")
    assert saved.init_lora_weights is True and saved.r == 8 and saved.corda_config is None
    # on the original base, the plain LoRA gives what training measured on the residual base
    assert evaluate(tmp_path / "run", "validation")["eval_loss"] == pytest.approx(
        summary["validation"]["eval_loss"], abs=1e-4)
    with pytest.raises(ValueError, match="'corda' leaves a residual in the full-precision weights"):
        train(config, ["lora.init_lora_weights='corda'", "model.quantize=4"], progress=False, overwrite=True)
