"""End-to-end training on tiny random models: learning, resume == uninterrupted, PEFT loads the result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from torch import nn
from safetensors.torch import load_file

from tests.test_train_support import (
    classification_setup,
    instruction_rows,
    instruction_setup,
    tiny_llama_dir,
    tiny_t5_dir,
    toml_config,
    write_jsonl,
)

transformers = pytest.importorskip("transformers")

import lorafit  # noqa: E402
from lorafit.train import evaluate, merge, train  # noqa: E402
from lorafit.train.data import epoch_batches  # noqa: E402
from lorafit.train.loop import adamw_kernel, lr_factor  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}


def train_losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["type"] == "train"]


def adapter_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


# -- classification ------------------------------------------------------------------


def test_lora_classification_learns_and_writes_a_complete_run(tmp_path):
    config = classification_setup(tmp_path, extra="")
    summary = train(config, progress=False)
    run = tmp_path / "run"
    losses = train_losses(run)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    assert summary["best"]["metric"] == "accuracy" and summary["best"]["value"] >= 0.75
    assert summary["validation"]["accuracy"] == summary["best"]["value"]  # keep-best: the final adapter is the best
    for name in ("config.toml", "metrics.jsonl", "curves.png", "summary.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (run / name).is_file(), name
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((run / "summary.json").read_text())
    assert saved["params"]["trainable"] < saved["params"]["total"] and saved["peak_memory_bytes"] > 0
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["modules_to_save"] == ["classifier"]
    assert adapter_config["task_type"] == "SEQ_CLS"
    # `lorafit eval` reproduces the validation metrics from the files alone
    again = evaluate(run, "validation")
    assert again["accuracy"] == pytest.approx(summary["validation"]["accuracy"])
    assert again["eval_loss"] == pytest.approx(summary["validation"]["eval_loss"], abs=1e-5)


def test_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    config = classification_setup(tmp_path)
    train(config, ["train.epochs=1", "train.eval_every=0"], progress=False)
    run = tmp_path / "run"
    model_dir = tmp_path / "tiny-bert"
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    batch = tok(["the film was great", "a very dull plot"], padding=True, return_tensors="pt")

    def base():
        torch.manual_seed(123)  # the head PEFT replaces is random: any seed will do
        return transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2).eval()

    ours = lorafit.load_adapter(base(), run / "adapter")
    theirs = peft.PeftModel.from_pretrained(base(), run / "adapter").eval()
    with torch.no_grad():
        a, b = ours(**batch).logits, theirs(**batch).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert not torch.allclose(a, base()(**batch).logits)  # the adapter (and head) changed something

    # `lorafit merge`: a plain model with the same logits
    merged_dir = merge(run, tmp_path / "merged")
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    assert not any(isinstance(m, lorafit.layers.LoraLayer) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, a, atol=1e-5, rtol=0)


def test_full_fine_tuning_trains_every_weight(tmp_path):
    config = classification_setup(tmp_path)
    summary = train(config, ["train.method=full", "train.epochs=1", "train.lr=1e-3"], progress=False)
    assert summary["params"]["trainable"] == summary["params"]["total"]
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    assert not (tmp_path / "run" / "adapter").exists()
    metrics = evaluate(tmp_path / "run", "validation")
    assert metrics["accuracy"] == pytest.approx(summary["validation"]["accuracy"])


# -- resume ---------------------------------------------------------------------------

RESUME = ["train.epochs=8", "train.save_every=3", "train.eval_every=6", "train.grad_accum=2", "train.batch_size=4",
          "lora.lora_dropout=0.2", "train.early_stopping_patience=0"]


class Crash(Exception):
    pass


def crash_at(step: int):
    def callback(state: dict) -> None:
        if state["step"] == step:
            raise Crash(f"simulated crash at step {step}")

    return callback


def test_resume_after_an_exception_equals_an_uninterrupted_run(tmp_path):
    config = classification_setup(tmp_path)
    full = train(config, RESUME + [f"output_dir={json.dumps(str(tmp_path / 'a'))}"], progress=False)
    args = RESUME + [f"output_dir={json.dumps(str(tmp_path / 'b'))}"]
    with pytest.raises(Crash):
        train(config, args, callbacks=(crash_at(17),), progress=False)  # last checkpoint: step 15
    assert not (tmp_path / "b" / "summary.json").exists()
    with pytest.raises(ValueError, match="already holds a run; pass resume=True"):
        train(config, args, progress=False)
    resumed = train(config, args, resume=True, progress=False)
    assert_same_tensors(adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b"))
    assert resumed["best"] == full["best"] and resumed["steps"] == full["steps"]
    assert resumed["validation"] == pytest.approx(full["validation"], abs=1e-6)
    # metrics.jsonl holds each step once, as if never interrupted
    logged = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    steps = [(r["type"], r["step"]) for r in map(json.loads, logged)]
    assert len(steps) == len(set(steps))


def test_resume_with_loraplus_rates_equals_an_uninterrupted_run(tmp_path):
    """LoRA+'s optimizer groups (B at its own rate, with and without weight decay) come back from a checkpoint
    in their order, with their moments: the resumed run ends where the uninterrupted one does."""
    config = classification_setup(tmp_path)
    plus = RESUME + ["train.loraplus_lr_ratio=4", "train.weight_decay=0.01", "train.epochs=4"]
    train(config, plus + [f"output_dir={json.dumps(str(tmp_path / 'a'))}"], progress=False)
    args = plus + [f"output_dir={json.dumps(str(tmp_path / 'b'))}"]
    with pytest.raises(Crash):
        train(config, args, callbacks=(crash_at(8),), progress=False)  # last checkpoint: step 6
    train(config, args, resume=True, progress=False)
    assert_same_tensors(adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b"))


def test_lorafa_keeps_a_and_resumes_to_the_uninterrupted_run(tmp_path, capsys):
    """train.lorafa: A stays as initialised through the run (the same in a shorter run), B trains, and a run
    resumed from a checkpoint ends where the uninterrupted one does (A comes back from the seed, B's projection
    from A)."""
    config = classification_setup(tmp_path)
    fa = RESUME + ["train.lorafa=true", "train.epochs=4"]
    summary = train(config, fa + [f"output_dir={json.dumps(str(tmp_path / 'a'))}"], progress=False)
    assert "LoRA-FA: the A factors stay as initialised" in capsys.readouterr().out
    args = fa + [f"output_dir={json.dumps(str(tmp_path / 'b'))}"]
    with pytest.raises(Crash):
        train(config, args, callbacks=(crash_at(8),), progress=False)  # last checkpoint: step 6
    train(config, args, resume=True, progress=False)
    a = adapter_tensors(tmp_path / "a")
    assert_same_tensors(a, adapter_tensors(tmp_path / "b"))
    short = train(config, fa + ["train.epochs=1", f"output_dir={json.dumps(str(tmp_path / 'c'))}"], progress=False)
    c = adapter_tensors(tmp_path / "c")
    assert short["steps"] < summary["steps"]
    assert all(torch.equal(a[k], c[k]) for k in a if ".lora_A." in k)
    assert all(not torch.equal(a[k], c[k]) for k in a if ".lora_B." in k)
    plain = train(config, RESUME + ["train.epochs=1", f"output_dir={json.dumps(str(tmp_path / 'd'))}"],
                  progress=False)
    assert short["params"]["trainable"] < plain["params"]["trainable"]  # the A factors no longer count
    with pytest.raises(ValueError, match="train.lorafa freezes A"):
        train(config, fa + ["train.loraplus_lr_ratio=16", f"output_dir={json.dumps(str(tmp_path / 'e'))}"],
              progress=False)


def test_resume_with_hashed_model_dropout_equals_an_uninterrupted_run(tmp_path):
    """train.model_dropout = "hashed" on a model whose own dropout is on: its masks come back on resume, and
    they are not torch's (the run ends elsewhere than one with torch's dropout)."""
    config = classification_setup(tmp_path)
    model_config = tmp_path / "tiny-bert" / "config.json"
    model_config.write_text(json.dumps({**json.loads(model_config.read_text()), "hidden_dropout_prob": 0.1}))
    hashed = RESUME + ["train.model_dropout=hashed"]
    train(config, hashed + [f"output_dir={json.dumps(str(tmp_path / 'a'))}"], progress=False)
    args = hashed + [f"output_dir={json.dumps(str(tmp_path / 'b'))}"]
    with pytest.raises(Crash):
        train(config, args, callbacks=(crash_at(17),), progress=False)
    train(config, args, resume=True, progress=False)
    assert_same_tensors(adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b"))
    train(config, RESUME + [f"output_dir={json.dumps(str(tmp_path / 'c'))}"], progress=False)
    a, c = adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "c")
    assert any(not torch.allclose(a[k], c[k], atol=1e-6, rtol=0) for k in a)


def test_a_non_finite_loss_stops_the_run_before_a_checkpoint_saves_it(tmp_path, monkeypatch):
    """The loss is read back from the device only at log lines, callbacks and checkpoints (no wait for the GPU
    every step); a NaN at step 7 is caught at step 8's checkpoint, before it is written, and the checkpoint of
    step 6 stays the latest, with finite weights."""
    from lorafit.train import tasks
    from lorafit.train.checkpoint import latest_checkpoint

    calls = []
    loss_sum = tasks.Classification.loss_sum

    def nan_at_step_7(self, model, batch):
        calls.append(1)
        loss = loss_sum(self, model, batch)
        return loss * float("nan") if len(calls) == 7 else loss

    monkeypatch.setattr(tasks.Classification, "loss_sum", nan_at_step_7)
    config = classification_setup(tmp_path)
    with pytest.raises(FloatingPointError, match="the loss became nan at one of steps 7 to 8"):
        train(config, ["train.save_every=2", "train.log_every=5", "train.eval_every=0"], progress=False)
    latest = latest_checkpoint(tmp_path / "run")
    assert latest is not None and latest.name == "step-0000006"
    weights = {k: v for f in latest.glob("*.safetensors") for k, v in load_file(f).items()}
    assert weights and all(torch.isfinite(v).all() for v in weights.values())


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path):
    config = classification_setup(tmp_path)
    # one thread each, so that the uninterrupted run can go beside the others on another core
    args = [a for o in RESUME + ["train.epochs=12", "train.num_threads=1"] for a in ("--set", o)]
    cli = [sys.executable, "-m", "lorafit.cli", "train", str(config), "--no-progress", *args]
    straight = tmp_path / "straight"
    uninterrupted = subprocess.Popen(cli + ["--output-dir", str(straight)], env=ENV, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
    try:
        killed = tmp_path / "killed"
        proc = subprocess.Popen(cli + ["--output-dir", str(killed)], env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        pointer = killed / "checkpoints" / "latest.json"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if pointer.is_file() and json.loads(pointer.read_text())["step"] >= 9:
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        assert not (killed / "summary.json").exists()
        killed_at = json.loads(pointer.read_text())["step"]

        result = subprocess.run(cli + ["--output-dir", str(killed), "--resume"], env=ENV, capture_output=True,
                                text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"resuming from {killed / 'checkpoints'}" in result.stdout
        _, stderr = uninterrupted.communicate(timeout=300)
        assert uninterrupted.returncode == 0, stderr[-3000:]
    finally:
        if uninterrupted.poll() is None:  # a failed assertion above
            uninterrupted.kill()
    assert_same_tensors(adapter_tensors(straight), adapter_tensors(killed))
    a, b = (json.loads((d / "summary.json").read_text()) for d in (straight, killed))
    assert a["steps"] == b["steps"] > killed_at and a["best"] == b["best"]


# -- generation tasks --------------------------------------------------------------------


def test_causal_lm_instruction_tuning_masks_the_prompt_and_learns(tmp_path, capsys):
    rows = instruction_rows(40)
    model_dir = tiny_llama_dir(tmp_path, rows)
    write_jsonl(tmp_path / "train.jsonl", rows[:32])
    write_jsonl(tmp_path / "val.jsonl", rows[32:])
    config = toml_config(tmp_path / "lm.toml", f"""
output_dir = "{tmp_path / 'run'}"
[model]
name = "{model_dir}"
[data]
train = "{tmp_path / 'train.jsonl'}"
validation = "{tmp_path / 'val.jsonl'}"
instruction_field = "instruction"
input_field = "input"
output_field = "output"
[task]
type = "causal_lm"
max_length = 48
max_new_tokens = 8
generate_rows = 4
[lora]
r = 8
lora_alpha = 16
target_modules = "all-linear"
[train]
epochs = 10
batch_size = 8
lr = 3e-2
eval_every = 8
num_threads = 1
""")
    from lorafit.train.run import prepare

    from lorafit.train.config import load_config

    prep = prepare(load_config(config))
    ids, labels = prep.task.encode_messages(prep.task.messages(rows[0]))
    text = prep.tokenizer.decode([t for t, y in zip(ids, labels) if y != -100])
    assert text.split() == rows[0]["output"].split() + ["<eos>"]  # the response and its end, nothing else
    assert prep.tokenizer.decode(ids).startswith("<|user|> repeat")

    summary = train(config, progress=False)
    losses = train_losses(tmp_path / "run")
    assert losses[-1] < losses[0] - 0.5, losses
    assert {"eval_loss", "perplexity", "rouge1", "rouge2", "rougeL"} <= set(summary["validation"])
    assert summary["best"]["metric"] == "eval_loss"

    # `lorafit eval --base`: the same metrics for the model without the adapter (= the run's adapter disabled)
    from lorafit.cli import main
    from lorafit.train.run import encode_split, load_run

    base = evaluate(tmp_path / "run", base=True)
    assert base.keys() == summary["validation"].keys() and base["eval_loss"] > summary["validation"]["eval_loss"] + 0.5
    prep = load_run(tmp_path / "run", None, None)
    with lorafit.disabled(prep.model):
        disabled = prep.task.evaluate(prep.model, encode_split(prep, "validation"), prep.device, 64, nullcontext)
    assert disabled == pytest.approx(base, rel=1e-5)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--base", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx(base, rel=1e-5)
    with pytest.raises(ValueError, match="not both"):
        evaluate(tmp_path / "run", base=True, adapter=tmp_path / "run" / "adapter")

    # samples: the generations the ROUGE scores were computed from, a line per generated example
    from lorafit.train.tasks import rouge

    metrics = evaluate(tmp_path / "run", samples=tmp_path / "generations.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert [r["example"] for r in lines] == [0, 1, 2, 3] and {r["split"] for r in lines} == {"validation"}
    assert all(r["prompt"].startswith("<|user|> repeat") and r["references"] for r in lines)
    assert rouge([r["references"] for r in lines], [r["generation"] for r in lines]) == pytest.approx(
        {k: metrics[k] for k in ("rouge1", "rouge2", "rougeL")})
    with pytest.raises(ValueError, match=r"samples: this run's evaluation generates nothing \(task.generate_rows = 0\)"
                                         r"; ask for generations with overrides=\['task.generate_rows=N'\]"):
        evaluate(tmp_path / "run", overrides=["task.generate_rows=0"], samples=tmp_path / "none.jsonl")


def test_seq2seq_t5_summarization_learns(tmp_path):
    rows = instruction_rows(40)
    model_dir = tiny_t5_dir(tmp_path, rows)
    write_jsonl(tmp_path / "train.jsonl", rows[:32])
    config = toml_config(tmp_path / "s2s.toml", f"""
output_dir = "{tmp_path / 'run'}"
[model]
name = "{model_dir}"
[data]
train = "{tmp_path / 'train.jsonl'}"
validation_fraction = 0.25
input_field = "input"
output_field = "output"
instruction = "repeat"
[task]
type = "seq2seq"
max_length = 24
max_target_length = 12
max_new_tokens = 8
generate_rows = 4
[lora]
r = 8
lora_alpha = 16
target_modules = ["q", "k", "v", "o", "wi", "wo"]
[train]
epochs = 6
batch_size = 8
lr = 1e-2
num_threads = 1
""")
    summary = train(config, progress=False)
    losses = train_losses(tmp_path / "run")
    assert losses[-1] < losses[0] - 0.3, losses
    assert summary["validation"]["rouge1"] >= 0 and "perplexity" in summary["validation"]
    adapter_config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_2_SEQ_LM"

    # several references per row (DialogSum's test split): rows without the output field are scored
    # against data.reference_fields, the best one per row, and take the first as their loss target
    held = rows[32:]
    write_jsonl(tmp_path / "test_out.jsonl", held)
    write_jsonl(tmp_path / "test_refs.jsonl", [{"input": r["input"], "ref_b": r["output"], "ref_a": "zq xv"}
                                               for r in held])

    def scores(test: str, refs: list[str] | None) -> dict[str, float]:
        sets = [f"data.test={tmp_path / test}"] + ([f"data.reference_fields={json.dumps(refs)}"] if refs else [])
        return evaluate(tmp_path / "run", "test", overrides=sets)

    plain, b_first = scores("test_out.jsonl", None), scores("test_refs.jsonl", ["ref_b", "ref_a"])
    assert b_first["eval_loss"] == pytest.approx(plain["eval_loss"])  # ref_b == output is the target
    assert b_first["rouge1"] == pytest.approx(plain["rouge1"])  # ref_a never beats the true output
    a_only = scores("test_refs.jsonl", ["ref_a"])
    both = scores("test_refs.jsonl", ["ref_a", "ref_b"])
    assert a_only["rouge1"] < both["rouge1"] == pytest.approx(plain["rouge1"])
    with pytest.raises(ValueError, match=r"row 1 has neither 'output' \(data.output_field\) nor every one of"):
        scores("test_refs.jsonl", ["ref_a", "ref_c"])


# -- pieces of the loop --------------------------------------------------------------------


def test_rouge_takes_the_best_reference_of_each_row():
    from lorafit.train.tasks import rouge

    one = rouge([["the cat sat on the mat"]], ["the cat sat on the mat"])
    assert one["rouge1"] == pytest.approx(100)
    best = rouge([["a dog ran home", "the cat sat on the mat"], ["a dog ran home"]],
                 ["the cat sat on the mat", "the cat sat on the mat"])
    assert best["rouge1"] == pytest.approx(50)  # row 1 scores its second reference (100), row 2 nothing (0)


def test_no_weight_decay_on_biases_and_norms():
    model = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                           intermediate_size=64, vocab_size=50))
    decay, no_decay = lorafit.optimizer_groups(model, lr=1e-3, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(not names[id(p)].endswith("bias") and "LayerNorm" not in names[id(p)] for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"embeddings.LayerNorm.weight", "pooler.dense.bias"}


def test_adamw_is_fused_on_cpus_and_gpus_and_steps_as_foreach_does():
    """The fused kernel where every trained tensor is on a CPU or CUDA device, foreach elsewhere; both take the
    same step."""
    assert adamw_kernel([torch.zeros(2, 2), torch.zeros(3)]) == {"fused": True}
    assert adamw_kernel([torch.zeros(2, 2, device="meta")]) == {"foreach": True}
    assert adamw_kernel([]) == {"foreach": True}
    torch.manual_seed(0)
    start = [torch.randn(16, 8), torch.randn(8)]
    params = {kind: [nn.Parameter(t.clone()) for t in start] for kind in ("fused", "foreach")}
    optimizers = {kind: torch.optim.AdamW([{"params": ps[:1], "weight_decay": 0.1},
                                           {"params": ps[1:], "weight_decay": 0.0}], lr=1e-2, **{kind: True})
                  for kind, ps in params.items()}
    for _ in range(5):
        grads = [torch.randn(16, 8), torch.randn(8)]
        for kind, ps in params.items():
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            optimizers[kind].step()
    for a, b in zip(params["fused"], params["foreach"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_schedule_warms_up_then_decays():
    linear = [lr_factor(s, 10, 2, "linear") for s in range(10)]
    assert linear[0] < linear[1] < linear[2] == 1.0 and linear[-1] < 0.2 and linear == sorted(linear[:3]) + linear[3:]
    cosine = [lr_factor(s, 10, 0, "cosine") for s in range(11)]
    assert cosine[0] == 1.0 and cosine[-1] == pytest.approx(0.0) and all(a >= b for a, b in zip(cosine, cosine[1:]))


def test_length_grouped_batches_are_deterministic_and_pad_little():
    lengths = [int(x) for x in torch.randint(1, 100, (1000,), generator=torch.Generator().manual_seed(0))]
    grouped = epoch_batches(lengths, 16, seed=3, epoch=1)
    assert grouped == epoch_batches(lengths, 16, seed=3, epoch=1) != epoch_batches(lengths, 16, seed=3, epoch=2)
    assert sorted(i for b in grouped for i in b) == list(range(1000))
    plain = epoch_batches(lengths, 16, seed=3, epoch=1, group_by_length=False)

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(grouped) < padding(plain) / 5


def test_bf16_autocast_gradient_checkpointing_and_early_stopping(tmp_path):
    config = classification_setup(tmp_path)
    summary = train(config, ["train.bf16=true", "train.gradient_checkpointing=true", "train.epochs=3",
                             "train.eval_every=2", "train.early_stopping_patience=1", "train.lr=1e-6"], progress=False)
    assert summary["early_stopped"] and summary["steps"] < 36
    assert any(getattr(m, "gradient_checkpointing", False) for m in summary.model.modules())
    evals = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if r["type"] == "eval"]
    assert all(torch.isfinite(torch.tensor(r["eval_loss"])) for r in evals)


def test_float16_weights_train_float32_adapters_with_loss_scaling_and_resume_exactly(tmp_path):
    """model.dtype = float16: AdamW on float16 adapters gives NaN at the first step (its moments underflow), so
    the adapters train in float32 under float16 autocast with loss scaling, which turns on by itself; the
    scaler's state is in the checkpoints, so a resumed run ends where an uninterrupted one does."""
    lora = 'r = 4\nlora_alpha = 8\nlora_dropout = 0.1\ntarget_modules = "all-linear"'
    config = instruction_setup(tmp_path, 24, lora=lora,
                               train="epochs = 4\nbatch_size = 8\nlr = 1e-2\nsave_every = 3\nlog_every = 1")
    args = ["model.dtype=float16", "train.num_threads=1"]
    full = train(config, args + [f"output_dir={json.dumps(str(tmp_path / 'a'))}"], progress=False)
    losses = train_losses(tmp_path / "a")
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    trained = [p for p in full.model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert {p.dtype for p in full.model.parameters() if not p.requires_grad} == {torch.float16}
    assert "fp16 = false" in (tmp_path / "a" / "config.toml").read_text()  # what was asked: resume compares it
    assert all(t.dtype == torch.float32 for t in adapter_tensors(tmp_path / "a").values())
    state = json.loads((tmp_path / "a" / "checkpoints" / "step-0000012" / "state.json").read_text())
    assert state["loss_scale"]["scale"] > 0

    resumed_args = args + [f"output_dir={json.dumps(str(tmp_path / 'b'))}"]
    with pytest.raises(Crash):
        train(config, resumed_args, callbacks=(crash_at(8),), progress=False)  # last checkpoint: step 6
    train(config, resumed_args, resume=True, progress=False)
    assert_same_tensors(adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b"))
    # the scaler went on from its saved state (a fresh one would count 6 good steps since the resume, not 12)
    resumed = json.loads((tmp_path / "b" / "checkpoints" / "step-0000012" / "state.json").read_text())
    assert resumed["loss_scale"] == state["loss_scale"] and state["loss_scale"]["_growth_tracker"] == 12


def test_bfloat16_weights_train_float32_adapters_under_bf16_autocast_only(tmp_path):
    """train.bf16 on bfloat16 weights is mixed precision: float32 adapters (their updates survive), bf16 compute;
    without it the adapters keep the weights' dtype."""
    config = instruction_setup(tmp_path, 16, train="epochs = 2\nbatch_size = 8\nnum_threads = 1")
    for name, extra, want in (("mixed", ["train.bf16=true"], torch.float32), ("plain", [], torch.bfloat16)):
        out = tmp_path / name
        summary = train(config, ["model.dtype=bfloat16", f"output_dir={json.dumps(str(out))}", *extra],
                        progress=False)
        assert {p.dtype for p in summary.model.parameters() if p.requires_grad} == {want}
        assert all(torch.isfinite(torch.tensor(train_losses(out))))


def test_float16_weights_refuse_full_fine_tuning(tmp_path):
    config = instruction_setup(tmp_path, 8)
    with pytest.raises(ValueError, match="full fine-tuning would update float16 weights"):
        train(config, ["model.dtype=float16", "train.method=full"], progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_compiled_blocks_train_as_the_eager_model_does(tmp_path):
    """train.compile: each transformer block runs under torch.compile (aot_eager here, which runs the traced
    graphs with eager kernels: the same numbers, and the same dropout masks from the same seed); the run ends
    with the adapter of an eager run, and the blocks are uncompiled again afterwards."""
    config = instruction_setup(tmp_path, 24, output_dir="unused",
                               lora='r = 4\nlora_alpha = 8\nlora_dropout = 0.1\ntarget_modules = "all-linear"',
                               train="epochs = 2\nbatch_size = 8\nlr = 1e-2\nnum_threads = 1")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = train(config, ["train.compile=true", "train.compile_backend=aot_eager",
                              f"output_dir={json.dumps(str(tmp_path / 'compiled'))}"], progress=False)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the blocks did run compiled
    assert all(m._compiled_call_impl is None for m in compiled.model.modules())
    train(config, [f"output_dir={json.dumps(str(tmp_path / 'eager'))}"], progress=False)
    assert train_losses(tmp_path / "compiled") == pytest.approx(train_losses(tmp_path / "eager"), rel=1e-4)
    assert_same_tensors(adapter_tensors(tmp_path / "compiled"), adapter_tensors(tmp_path / "eager"), atol=1e-4)
    with pytest.raises(ValueError, match="train.compile_backend = 'nope' is not a torch.compile backend"):
        train(config, ["train.compile=true", "train.compile_backend=nope",
                       f"output_dir={json.dumps(str(tmp_path / 'bad'))}"], progress=False)


def test_chat_messages_train_on_every_assistant_turn(tmp_path):
    rows = instruction_rows(24)
    model_dir = tiny_llama_dir(tmp_path, rows)
    chats = [{"messages": [{"role": "user", "content": r["input"]}, {"role": "assistant", "content": r["output"]},
                           {"role": "user", "content": "repeat"}, {"role": "assistant", "content": r["input"]}]}
             for r in rows]
    write_jsonl(tmp_path / "chat.jsonl", chats)
    config = toml_config(tmp_path / "chat.toml", f"""
output_dir = "{tmp_path / 'run'}"
[model]
name = "{model_dir}"
[data]
train = "{tmp_path / 'chat.jsonl'}"
messages_field = "messages"
[task]
type = "causal_lm"
max_length = 64
[lora]
target_modules = ["q_proj", "v_proj"]
[train]
epochs = 1
batch_size = 8
num_threads = 1
""")
    from lorafit.train.config import load_config
    from lorafit.train.run import prepare

    prep = prepare(load_config(config))
    ids, labels = prep.task.encode_messages(chats[0]["messages"])
    trained = prep.tokenizer.decode([t for t, y in zip(ids, labels) if y != -100]).split()
    assert trained == rows[0]["output"].split() + ["<eos>"] + rows[0]["input"].split() + ["<eos>"]
    summary = train(config, progress=False)
    assert summary["steps"] == 3 and summary["validation"] is None
