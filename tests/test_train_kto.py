"""task.type = "kto": KTO from unpaired completions labelled desirable or not, the base model as reference."""

from __future__ import annotations

import contextlib
import copy
import json
import random
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lorafit  # noqa: E402
from lorafit.train import evaluate, train  # noqa: E402
from lorafit.train.config import RunConfig  # noqa: E402
from lorafit.train.kto import KTO  # noqa: E402
from lorafit.train.reference import with_reference  # noqa: E402
from tests.test_train_preference import (adapted_llama, assert_resume_matches, preference_rows,  # noqa: E402
                                        preference_setup, sequence_logp)
from tests.test_train_support import write_jsonl  # noqa: E402


def kto_rows(n: int, seed: int = 0) -> list[dict]:
    """Preference rows unpaired: each pair's prompt with its chosen (desirable) or its rejected completion."""
    rng = random.Random(seed + 100)
    return [{"prompt": r["prompt"], "completion": r["chosen"] if good else r["rejected"], "label": good}
            for r in preference_rows(n, seed) for good in [rng.random() < 0.5]]


def kto_setup(tmp_path: Path, n_train: int = 64, n_val: int = 32) -> Path:
    config = preference_setup(tmp_path, n_train, n_val, task='type = "kto"\ndpo_beta = 0.5')
    write_jsonl(tmp_path / "train.jsonl", kto_rows(n_train, 0))
    write_jsonl(tmp_path / "val.jsonl", kto_rows(n_val, 1))
    config.write_text(config.read_text().replace('instruction_field = "prompt"',
                                                 'instruction_field = "prompt"\noutput_field = "completion"'))
    return config


def test_the_loss_is_kto_s_with_the_kl_estimate_from_mismatched_rows(tmp_path):
    """Per row lambda_D (1 - sigmoid(beta (r - z))) if desirable, else lambda_U (1 - sigmoid(beta (z - r))), r the
    log-ratio of the row's completion against a separate copy of the base, z the mean log-ratio over each prompt
    with the next row's completion (clipped at 0); each sequence scored alone without padding. The gradient
    reaches the adapter only."""
    rows = kto_rows(4, seed=3)
    rows[0]["label"], rows[1]["label"] = True, False  # both kinds in the batch
    llama, base, tok = adapted_llama(tmp_path, preference_rows(4, seed=3), seed=4)
    config = RunConfig()
    config.task.type, config.task.max_length, config.task.dpo_beta = "kto", 64, 0.4
    config.task.kto_desirable_weight, config.task.kto_undesirable_weight = 1.0, 1.5
    config.data.instruction_field, config.data.output_field = "prompt", "completion"
    task = KTO(config, tok)
    task._plain_head = True
    features = task.encode(rows, "train").features
    assert len(features) == 4
    render = task.encode([{**rows[0], "completion": rows[1]["completion"]}], "train").features[0]
    assert features[0]["kl_ids"] == render["input_ids"]  # prompt 0 with completion 1
    loss = task.loss_sum(llama, task.collate(features))

    def ratio(ids, labels):
        with torch.no_grad():
            return sequence_logp(llama, ids, labels) - sequence_logp(base, ids, labels)

    z = torch.stack([ratio(f["kl_ids"], f["kl_labels"]) for f in features]).mean().clamp(min=0)
    want = torch.zeros(())
    for f in features:
        r = sequence_logp(llama, f["input_ids"], f["labels"]) - sequence_logp(base, f["input_ids"], f["labels"])
        want = want + (1.0 * (1 - torch.sigmoid(0.4 * (r - z))) if f["label"] else
                       1.5 * (1 - torch.sigmoid(0.4 * (z - r))))
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    loss.backward()
    grads = {n for n, p in llama.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all("lora_" in n for n in grads)
    # precomputed (task.precompute_reference), the reference log-probabilities of the rows and of the mismatched
    # rows give the same loss, and the step runs the model twice instead of four times
    known = with_reference(task, llama, features, torch.device("cpu"), 3, contextlib.nullcontext)
    forwards = []
    llama.model.layers[0].register_forward_hook(lambda *_: forwards.append(1))
    torch.testing.assert_close(task.loss_sum(llama, task.collate(known.rows(range(4)))), loss.detach(), rtol=1e-5,
                               atol=1e-5)
    assert len(forwards) == 2
    # a fresh adapter (B = 0) is the reference itself: r = z = 0, each row's loss half its weight
    fresh = copy.deepcopy(base)
    lorafit.attach(fresh, lorafit.LoraConfig(r=4, target_modules=["q_proj"]))
    with torch.no_grad():
        torch.testing.assert_close(task.loss_sum(fresh, task.collate(features)), torch.tensor(0.5 * (1 + 1.5 * 3)))


def test_kto_learns_which_completions_are_desirable(tmp_path):
    """Unpaired, each prompt with one completion, the tiny model memorises much of the training rows (the signal
    DPO's pairs give side by side comes from different rows here); on held-out rows it still ranks desirable
    completions above undesirable ones."""
    config = kto_setup(tmp_path, n_train=256, n_val=64)
    summary = train(config, ["train.lr=1e-2"], progress=False)
    run = tmp_path / "run"
    val = summary["validation"]
    assert summary["task"] == "kto" and summary["best"]["metric"] == "eval_loss"
    # held-out rows: desirable completions gain reward over the reference, undesirable ones lose it
    assert val["reward_accuracy"] >= 0.6 and val["reward_margin"] > 1 and val["eval_loss"] < 0.45, val
    base = evaluate(run, split="validation", base=True)  # the reference itself: every reward 0, the loss 1/2
    assert base["reward_margin"] == 0 and base["kl"] == 0 and base["eval_loss"] == pytest.approx(0.5)
    again = evaluate(run, split="validation")
    assert again == pytest.approx(val, abs=1e-5)
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "CAUSAL_LM"


def test_full_fine_tuning_trains_kto_from_precomputed_references(tmp_path):
    """The whole model fine-tuned, its reference the model as loaded (task.precompute_reference): desirable
    completions gain reward on held-out rows, and `lorafit eval` compares with the model the run started from."""
    config = kto_setup(tmp_path, n_train=128, n_val=64)
    summary = train(config, ["train.method='full'", "task.precompute_reference=true", "train.lr=1e-3"],
                    progress=False)
    val = summary["validation"]
    assert val["reward_margin"] > 0.25 and val["eval_loss"] < 0.49, val  # the starting model: 0 and 0.5
    assert evaluate(tmp_path / "run", split="validation") == pytest.approx(val, abs=1e-4)


def test_a_resumed_kto_run_ends_where_an_uninterrupted_one_does(tmp_path):
    config = kto_setup(tmp_path, n_train=32, n_val=8)
    assert_resume_matches(config, tmp_path)


@pytest.mark.parametrize("setting, message", [
    ("train.method='full'", "train.method = 'full' with task.type = 'kto', which compares with a reference model"),
    ("task.kto_undesirable_weight=0", "task.kto_undesirable_weight must be a finite number > 0"),
    ("task.dpo_beta=-1", "task.dpo_beta must be a finite number > 0"),
    ("data.label_field='thumbs'", "field 'thumbs' (data.label_field) not found"),
    ("data.output_field='answer'", "field 'answer' (data.output_field) not found"),
    ("task.type='causal_lm' task.dpo_beta=0.1 task.kto_desirable_weight=2",
     "task.kto_desirable_weight is for task.type = 'kto'"),
])
def test_what_kto_cannot_use_is_refused_naming_the_setting(tmp_path, setting, message):
    config = kto_setup(tmp_path, n_train=8, n_val=4)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train(config, setting.split(" "), progress=False)
    assert not (tmp_path / "run" / "adapter").exists()


def test_a_label_that_is_not_yes_or_no_names_the_field(tmp_path):
    config = kto_setup(tmp_path, n_train=8, n_val=4)
    rows = kto_rows(8)
    rows[5]["label"] = "maybe"
    write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(ValueError, match="field 'label' \\(data.label_field\\) must say whether the completion is "
                                         "desirable: true or false, 1 or 0; got 'maybe'"):
        train(config, progress=False)
