"""float32 masters of 16-bit trained parameters: AdamW steps as it would in float32, the model holds the
rounding, checkpoints keep the masters so a resumed run ends where an uninterrupted one does."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lorafit.train.master_weights import MasterWeights
from tests.test_train_support import instruction_setup

transformers = pytest.importorskip("transformers")

from lorafit.train import train  # noqa: E402
from tests.test_train_loop import Crash, adapter_tensors, assert_same_tensors, crash_at, train_losses  # noqa: E402


def _adamw(params, lr):
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01, foreach=True)


def test_masters_step_as_float32_adamw_and_the_model_holds_their_rounding():
    torch.manual_seed(0)
    model = nn.Linear(16, 8).to(torch.bfloat16)
    reference = [p.detach().float().clone() for p in model.parameters()]  # float32 AdamW on the same values
    masters = MasterWeights(model)
    optimizer = _adamw(masters.for_optimizer(model.parameters()), lr=1e-5)
    reference_optimizer = _adamw(reference, lr=1e-5)
    plain = nn.Linear(16, 8).to(torch.bfloat16)  # bfloat16 AdamW on bfloat16 weights, for contrast
    plain.load_state_dict(model.state_dict())
    plain_optimizer = _adamw(plain.parameters(), lr=1e-5)
    start = [p.detach().clone() for p in model.parameters()]
    direction = [torch.randn_like(p) for p in model.parameters()]
    for _ in range(100):  # gradients that keep their sign, in bfloat16 as backward gives them
        grads = [d + 0.3 * torch.randn_like(d) for d in direction]
        for p, q, r, g in zip(model.parameters(), plain.parameters(), reference, grads):
            p.grad, q.grad, r.grad = g.clone(), g.clone(), g.float()
        masters.take_grads()
        assert all(p.grad is None for p in model.parameters())  # the 16-bit gradients are dropped
        optimizer.step()
        masters.put_back()
        optimizer.zero_grad(set_to_none=False)
        reference_optimizer.step()
        plain_optimizer.step()
    for p, m, r in zip(model.parameters(), masters.masters, reference):
        assert torch.equal(m, r)  # the same float32 AdamW
        assert torch.equal(p, r.bfloat16())  # and the model holds its rounding
    moved = sum(int((p != s).sum()) for p, s in zip(model.parameters(), start))
    plain_moved = sum(int((p != s).sum()) for p, s in zip(plain.parameters(), start))
    # 100 updates of ~1e-5 move most weights by an ulp or more with masters; bfloat16 alone loses nearly all
    assert moved > 0.5 * sum(p.numel() for p in model.parameters()) > 10 * plain_moved


def test_a_parameter_without_a_gradient_is_skipped_as_without_masters():
    model = nn.Linear(4, 4).to(torch.bfloat16)
    masters = MasterWeights(model)
    optimizer = _adamw(masters.for_optimizer(model.parameters()), lr=1e-2)
    model.weight.grad = torch.ones_like(model.weight)
    weight, bias = model.weight.detach().clone(), model.bias.detach().clone()
    masters.take_grads()
    optimizer.step()
    masters.put_back()
    assert torch.equal(model.bias, bias) and masters.masters[1] not in optimizer.state
    assert not torch.equal(model.weight, weight) and int(optimizer.state[masters.masters[0]]["step"]) == 1


def test_only_16_bit_trained_parameters_get_masters():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4).to(torch.bfloat16), nn.Linear(4, 4).half())
    model[2].requires_grad_(False)
    masters = MasterWeights(model)
    assert masters.names == ["1.weight", "1.bias"]
    params = masters.for_optimizer(model.parameters())
    assert params[0] is model[0].weight and params[2].dtype == torch.float32 and params[4] is model[2].weight
    assert not MasterWeights(nn.Linear(4, 4))


LORA = 'r = 4\nlora_alpha = 8\nlora_dropout = 0.1\ntarget_modules = "all-linear"'


def test_bfloat16_lora_resumes_from_its_masters_to_the_uninterrupted_result(tmp_path, capsys):
    """LoRA on bfloat16 weights keeps float32 masters (train.master_weights = "auto"): checkpoints hold them,
    a resumed run ends with the uninterrupted run's adapter, and the run differs from one without masters."""
    config = instruction_setup(tmp_path, 24, lora=LORA,
                               train="epochs = 3\nbatch_size = 8\nlr = 1e-3\nsave_every = 4\nnum_threads = 1")
    args = ["model.dtype=bfloat16"]

    def out(name: str) -> list[str]:
        return args + [f"output_dir={json.dumps(str(tmp_path / name))}"]

    full = train(config, out("a"), progress=False)
    assert "bfloat16 trained weights: AdamW steps on float32 masters" in capsys.readouterr().out
    assert {p.dtype for p in full.model.parameters() if p.requires_grad} == {torch.bfloat16}
    saved = load_file(tmp_path / "a" / "checkpoints" / "step-0000009" / "trainable.safetensors")
    assert saved and all(t.dtype == torch.float32 for t in saved.values())
    params = dict(full.model.named_parameters())
    for name, value in saved.items():  # the model holds the masters' rounding
        assert torch.equal(params[name], value.bfloat16()), name
    adapter = adapter_tensors(tmp_path / "a")
    assert all(t.dtype == torch.bfloat16 for t in adapter.values())

    with pytest.raises(Crash):
        train(config, out("b"), callbacks=(crash_at(6),), progress=False)  # last checkpoint: step 4
    train(config, out("b"), resume=True, progress=False)
    assert_same_tensors(adapter, adapter_tensors(tmp_path / "b"), atol=0)

    capsys.readouterr()
    train(config, out("off") + ["train.master_weights=off"], progress=False)
    assert "float32 masters" not in capsys.readouterr().out
    off = load_file(tmp_path / "off" / "checkpoints" / "step-0000009" / "trainable.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in off.values())
    assert any(not torch.equal(adapter[k], v) for k, v in adapter_tensors(tmp_path / "off").items())
    assert all(torch.isfinite(torch.tensor(train_losses(tmp_path / "off"))))


def test_full_fine_tuning_keeps_masters_only_when_asked(tmp_path):
    config = instruction_setup(tmp_path, 8, train="epochs = 1\nbatch_size = 8\nnum_threads = 1")
    for setting, want in (("auto", torch.bfloat16), ("on", torch.float32)):
        out = tmp_path / setting
        train(config, ["model.dtype=bfloat16", "train.method=full", f"train.master_weights={setting}",
                       f"output_dir={json.dumps(str(out))}"], progress=False)
        saved = load_file(out / "checkpoints" / "step-0000001" / "trainable.safetensors")
        assert {t.dtype for t in saved.values()} == {want}


def test_master_weights_takes_auto_on_or_off(tmp_path):
    config = instruction_setup(tmp_path, 8)
    with pytest.raises(ValueError, match="train.master_weights"):
        train(config, ["train.master_weights=yes"], progress=False)
