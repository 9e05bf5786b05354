"""lorafit.train.hf_trainer.AdapterTrainer: transformers' Trainer with checkpoints that hold the adapters (PEFT's
files), a resumed run that ends where an uninterrupted one does, and load_best_model_at_end."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lorafit  # noqa: E402
from lorafit.train.hf_trainer import AdapterTrainer  # noqa: E402
from tests.models import tiny_llama  # noqa: E402


class Rows(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 48

    def __getitem__(self, i: int) -> dict:
        ids = (torch.arange(12) * (i + 3) + i) % 50
        return {"input_ids": ids, "labels": ids}


def adapted(second: bool = False):
    model = tiny_llama()
    model.config.use_cache = False
    lorafit.attach(model, lorafit.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                                             modules_to_save=["lm_head"]))
    if second:  # a second adapter, trained too
        lorafit.attach(model, lorafit.LoraConfig(r=2, target_modules=["down_proj"]), "other", activate=False)
        lorafit.set_active(model, ["default", "other"])
        for p in lorafit.adapter_parameters(model, "default").values():
            p.requires_grad_(True)
    return model


def trainer(model, out, callbacks=(), loraplus_lr_ratio=1.0, lorafa=False, **args) -> AdapterTrainer:
    args = transformers.TrainingArguments(str(out), **{"per_device_train_batch_size": 4, "save_steps": 3,
                                                       "logging_steps": 100, "report_to": [], "use_cpu": True,
                                                       "seed": 0, "max_steps": 6, "learning_rate": 1e-2, **args})
    return AdapterTrainer(model=model, args=args, train_dataset=Rows(), eval_dataset=Rows(), callbacks=list(callbacks),
                          loraplus_lr_ratio=loraplus_lr_ratio, lorafa=lorafa)


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for name in lorafit.adapter_configs(model)
            for k, v in lorafit.adapter_parameters(model, name).items()}


class StopAt(transformers.TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"stopped at step {self.step}")


def test_checkpoints_are_adapter_files_and_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    full = adapted(second=True)
    trainer(full, tmp_path / "a").train()
    expected = adapter_state(full)

    checkpoint = tmp_path / "a" / "checkpoint-3"
    files = {p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file()}
    assert {"adapter_config.json", "adapter_model.safetensors", "other/adapter_config.json",
            "other/adapter_model.safetensors", "optimizer.pt", "scheduler.pt"} <= files
    assert not any(f.startswith("model") for f in files)  # no copy of the base model
    # the files are PEFT's: they load into a fresh base model
    reloaded = lorafit.load_adapter(tiny_llama(), tmp_path / "a" / "checkpoint-6")
    ids = torch.arange(10)[None] % 50
    lorafit.set_active(full, ["default"])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, full.eval()(input_ids=ids).logits)

    interrupted = adapted(second=True)
    with pytest.raises(KeyboardInterrupt):
        trainer(interrupted, tmp_path / "b", callbacks=[StopAt(4)]).train()
    resumed = adapted(second=True)  # a new process: fresh adapters, the checkpoint's weights loaded into them
    trainer(resumed, tmp_path / "b").train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    got = adapter_state(resumed)
    assert got.keys() == expected.keys()
    for key in got:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7, msg=key)


def test_load_best_model_at_end_loads_the_best_checkpoints_adapter(tmp_path):
    model = adapted()
    # "best" is the highest eval loss, so that the best checkpoint is not the last one (the loss falls)
    t = trainer(model, tmp_path, max_steps=9, eval_strategy="steps", eval_steps=3, load_best_model_at_end=True,
                metric_for_best_model="eval_loss", greater_is_better=True)
    t.train()
    best = t.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-9")
    files = lorafit.read_adapter(best)[1]
    state = {lorafit.io.peft_key(k, "default"): v for k, v in adapter_state(model).items()}
    assert files.keys() == state.keys()
    for key in files:
        torch.testing.assert_close(state[key], files[key], rtol=0, atol=0)


def test_a_model_without_adapters_is_refused_when_saving(tmp_path):
    t = trainer(tiny_llama(), tmp_path)
    with pytest.raises(ValueError, match="has no lorafit adapter"):
        t.save_model(str(tmp_path / "out"))


def test_a_model_loaded_in_4_bits_trains_with_lorafit_adapters(tmp_path):
    """QLoRA through the Trainer: the plain Trainer refuses a bitsandbytes model that is not a PEFT model."""
    pytest.importorskip("bitsandbytes")
    from tests.test_bitsandbytes import quantized, save_float_llama

    save_float_llama(tmp_path / "float")
    model = quantized(tmp_path / "float", 4)
    lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="purely quantized"):
        transformers.Trainer(model=model, args=transformers.TrainingArguments(str(tmp_path / "plain"), use_cpu=True))
    before = adapter_state(model)
    trainer(model, tmp_path / "out", max_steps=3).train()
    after = adapter_state(model)
    assert any(not torch.equal(before[k], after[k]) for k in after)
    assert not model._hf_peft_config_loaded  # the flag was set only while Trainer checked the model
    assert (tmp_path / "out" / "checkpoint-3" / "adapter_model.safetensors").is_file()


def test_loraplus_trains_b_at_its_own_rate(tmp_path):
    model = adapted()
    t = trainer(model, tmp_path, max_steps=2, learning_rate=1e-3, weight_decay=0.01, loraplus_lr_ratio=16)
    t.train()
    names = {id(p): n for n, p in model.named_parameters()}
    rates = {names[id(p)]: (g["initial_lr"], g["weight_decay"]) for g in t.optimizer.param_groups
             for p in g["params"]}
    assert rates and all(rate == ((16e-3 if ".lora_B." in n else 1e-3), 0.01) for n, rate in rates.items()), rates
    plain = trainer(adapted(), tmp_path / "plain", max_steps=1)
    plain.train()
    assert {g["initial_lr"] for g in plain.optimizer.param_groups} == {1e-2}


def test_lorafa_freezes_a_and_steps_along_the_projected_gradient(tmp_path):
    """lorafa=True: one SGD step of the Trainer moves B by the projected gradient of the batch (computed here by
    hand), A not at all."""
    model, reference = adapted(), adapted()
    for _, layer in [*lorafit.model.lora_layers(model), *lorafit.model.lora_layers(reference)]:
        layer.dropout["default"] = 0.0  # the same forward in both
    before = adapter_state(model)
    batch = {k: torch.stack([Rows()[i][k] for i in range(len(Rows()))]) for k in ("input_ids", "labels")}
    reference.train()
    reference(**batch).loss.backward()
    projected = {}  # g_B (A A^T)^-1 / s^2, per B
    for path, layer in lorafit.model.lora_layers(reference):
        a, b, s = layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"]
        projected[f"{path}.lora_B.default"] = b.grad @ torch.linalg.inv(a @ a.T) / s ** 2
    run = trainer(model, tmp_path / "fa", max_steps=1, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0,
                  learning_rate=0.5, per_device_train_batch_size=len(Rows()), lorafa=True)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".lora_A" in n)
    run.train()
    after = adapter_state(model)
    moved = 0
    for name, p in reference.named_parameters():
        if ".lora_A." in name:
            torch.testing.assert_close(after[name], before[name], rtol=0, atol=0)
        elif ".lora_B." in name:
            torch.testing.assert_close(after[name], before[name] - 0.5 * projected[name], rtol=1e-4, atol=1e-6)
            moved += 1
    assert moved == 4
    with pytest.raises(ValueError, match=r"LoRA\+"):
        trainer(adapted(), tmp_path / "both", lorafa=True, loraplus_lr_ratio=16)


def test_adapter_checkpoints_mix_into_a_trainer_subclass(tmp_path):
    """A Trainer subclass of one's own (as TRL's SFTTrainer is) gets the adapter checkpoints from the mixin."""
    from lorafit.train.hf_trainer import AdapterCheckpoints

    class Scaled(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
            return (2 * loss, outputs) if return_outputs else 2 * loss

    class ScaledAdapterTrainer(AdapterCheckpoints, Scaled):
        pass

    model = adapted()
    args = transformers.TrainingArguments(str(tmp_path), max_steps=3, save_steps=3, report_to=[], use_cpu=True)
    ScaledAdapterTrainer(model=model, args=args, train_dataset=Rows()).train()
    files = {p.name for p in (tmp_path / "checkpoint-3").iterdir()}
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
