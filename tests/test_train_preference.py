"""task.type = "preference": DPO with the base model (the adapter switched off) as the reference model."""

from __future__ import annotations

import contextlib
import copy
import json
import random
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import lorafit  # noqa: E402
from lorafit.train import evaluate, train  # noqa: E402
from lorafit.train import tasks  # noqa: E402
from lorafit.train.config import RunConfig  # noqa: E402
from lorafit.train.preference import Preference  # noqa: E402
from tests.test_train_loop import Crash, adapter_tensors, assert_same_tensors, crash_at  # noqa: E402
from tests.test_train_support import FILLER, NEGATIVE, POSITIVE, tiny_llama_dir, toml_config, write_jsonl  # noqa: E402


TARGETS = '"q_proj", "v_proj", "down_proj"'
DPO_TASK = 'type = "preference"\ndpo_beta = 0.5'


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """A prompt about a film; the chosen review says a positive word, the rejected one a negative word, in the
    same filler (DPO's sentiment-steering task, in miniature)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = "review " + " ".join(rng.choice(FILLER) for _ in range(rng.randint(1, 4)))
        filler = [rng.choice(FILLER) for _ in range(rng.randint(2, 5))]
        at = rng.randrange(len(filler) + 1)
        chosen, rejected = (" ".join(filler[:at] + [rng.choice(words)] + filler[at:]) for words in (POSITIVE, NEGATIVE))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def preference_setup(tmp_path: Path, n_train: int = 64, n_val: int = 32, extra: str = "", task: str = DPO_TASK,
                     model_dir: Path | None = None, targets: str = TARGETS) -> Path:
    """Preference rows, a tiny Llama (or ``model_dir``) and a run config with ``task`` in its [task] section."""
    rows = preference_rows(n_train + n_val)
    model_dir = model_dir or tiny_llama_dir(tmp_path, [{"instruction": r["prompt"], "input": r["chosen"],
                                                        "output": r["rejected"]} for r in rows])
    write_jsonl(tmp_path / "train.jsonl", rows[:n_train])
    write_jsonl(tmp_path / "val.jsonl", rows[n_train:])
    return toml_config(tmp_path / "dpo.toml", f"""
output_dir = "{tmp_path / 'run'}"
[model]
name = "{model_dir}"
[data]
train = "{tmp_path / 'train.jsonl'}"
validation = "{tmp_path / 'val.jsonl'}"
instruction_field = "prompt"
[task]
{task}
max_length = 32
[lora]
r = 4
lora_alpha = 8
target_modules = [{targets}]
[train]
epochs = 6
batch_size = 8
lr = 2e-2
eval_every = 8
log_every = 2
num_threads = 1
{extra}
""")


def adapted_llama(tmp_path: Path, rows: list[dict], seed: int) -> tuple[nn.Module, nn.Module, object]:
    """A tiny Llama (its vocabulary from ``rows``) with a random adapter (B != 0), a copy of the base without
    one, and the tokenizer."""
    llama = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir(tmp_path, [
        {"instruction": r["prompt"], "input": r["chosen"], "output": r["rejected"]} for r in rows]))
    base = copy.deepcopy(llama)
    lorafit.attach(llama, lorafit.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(seed)
    for name, p in llama.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.2)
    return llama, base, transformers.AutoTokenizer.from_pretrained(tmp_path / "tiny-llama")


def sequence_logp(model: nn.Module, ids: list[int], labels: list[int]) -> torch.Tensor:
    """The summed log-probability of the labelled tokens of one unpadded sequence, from full logits."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    targets = torch.tensor(labels[1:])
    keep = targets != tasks.IGNORE
    return logits.log_softmax(-1)[keep].gather(-1, targets[keep][:, None]).sum()


@pytest.mark.parametrize("plain_head", [True, False], ids=["chunked-head", "model-logits"])
def test_the_loss_is_dpo_s_with_the_base_model_as_reference(tmp_path, plain_head, monkeypatch):
    """The batch's loss is the sum over pairs of -log sigmoid(beta * ((pc - rc) - (pr - rr))), the reference
    model a separate copy of the base (no adapter), each response scored alone without padding; its gradient
    reaches the adapter, and the reference forward leaves the adapter on afterwards."""
    rows = preference_rows(3, seed=5)
    llama, base, tok = adapted_llama(tmp_path, rows, seed=1)
    config = RunConfig()
    config.task.type, config.task.dpo_beta, config.task.max_length = "preference", 0.3, 64
    config.data.instruction_field = "prompt"
    task = Preference(config, tok)
    monkeypatch.setattr(tasks, "LOSS_CHUNK_LOGITS", 5 * len(tok))  # several chunks
    task._plain_head = plain_head
    features = task.encode(rows, "train").features
    assert len(features) == 3
    batch = task.collate(features)
    assert batch["input_ids"].shape[0] == 6 and int(batch["units"]) == 3
    loss = task.loss_sum(llama, batch)
    want = torch.zeros(())
    for f in features:
        sides = (("input_ids", "labels"), ("rejected_ids", "rejected_labels"))
        pc, pr = (sequence_logp(llama, f[ids], f[labels]) for ids, labels in sides)
        with torch.no_grad():
            rc, rr = (sequence_logp(base, f[ids], f[labels]) for ids, labels in sides)
        want = want - nn.functional.logsigmoid(0.3 * ((pc - rc) - (pr - rr)))
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    loss.backward()
    grads = {n: p.grad for n, p in llama.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads) and all(g.abs().sum() > 0 for g in grads.values())
    assert not any(getattr(m, "disabled", False) for m in llama.modules())  # the adapter is on again
    # a fresh adapter (B = 0) is the reference model itself: every reward is 0, the loss log 2 a pair
    fresh = copy.deepcopy(base)
    lorafit.attach(fresh, lorafit.LoraConfig(r=4, target_modules=["q_proj"]))
    with torch.no_grad():
        torch.testing.assert_close(task.loss_sum(fresh, batch), torch.tensor(3 * 0.6931472), rtol=1e-5, atol=1e-5)


def _pair_loss(kind: str, beta: float, gamma: float, sft: float, policy, reference, tokens,
               smoothing: float = 0.0) -> torch.Tensor:
    """One pair's loss from its papers' formulas, in float64: ``policy``/``reference`` the summed log-probabilities
    (chosen, rejected), ``tokens`` the responses' token counts; ``smoothing``: conservative DPO's share of pairs
    taken to be swapped."""
    (pc, pr), (rc, rr), (nc, nr) = [[torch.as_tensor(x, dtype=torch.float64) for x in xs]
                                    for xs in (policy, reference, tokens)]
    logsigmoid = nn.functional.logsigmoid
    if kind in ("dpo", "simpo"):
        x = beta * ((pc - rc) - (pr - rr)) if kind == "dpo" else beta * (pc / nc - pr / nr) - gamma
        loss = -(1 - smoothing) * logsigmoid(x) - smoothing * logsigmoid(-x)
    elif kind == "ipo":
        loss = ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2
    elif kind == "hinge":
        loss = torch.relu(1 - beta * ((pc - rc) - (pr - rr)))
    else:  # orpo: odds of the per-token probability
        odds_c, odds_r = ((p / n).exp() / (1 - (p / n).exp()) for p, n in ((pc, nc), (pr, nr)))
        loss = -pc / nc - beta * logsigmoid(odds_c.log() - odds_r.log())
    return loss + sft * -pc / nc


@pytest.mark.parametrize("kind, gamma, sft, smoothing", [
    ("dpo", 0.5, 0.7, 0.0), ("dpo", 0.5, 0.0, 0.2), ("ipo", 0.5, 0.0, 0.0), ("hinge", 0.5, 0.3, 0.0),
    ("simpo", 1.3, 0.0, 0.0), ("simpo", 1.3, 0.0, 0.1), ("orpo", 0.5, 0.0, 0.0)])
def test_each_preference_loss_is_its_paper_s_formula(tmp_path, kind, gamma, sft, smoothing):
    """task.preference_loss: each loss, the RPO term (task.sft_weight) and conservative DPO's label smoothing
    (task.label_smoothing) equal their formulas computed from each response scored alone; the reference-free
    losses (simpo, orpo) run the model once per batch, the others twice; the evaluation's rewards are the ones
    the loss compares."""
    rows = preference_rows(3, seed=6)
    llama, base, tok = adapted_llama(tmp_path, rows, seed=2)
    config = RunConfig()
    config.task.type, config.task.max_length, config.data.instruction_field = "preference", 64, "prompt"
    config.task.preference_loss, config.task.dpo_beta, config.task.simpo_gamma = kind, 0.4, gamma
    config.task.sft_weight, config.task.label_smoothing = sft, smoothing
    task = Preference(config, tok)
    task._plain_head = True  # no probing forward of the model's head
    features = task.encode(rows, "train").features
    batch = task.collate(features)
    forwards = []
    llama.model.layers[0].register_forward_hook(lambda *_: forwards.append(1))
    loss = task.loss_sum(llama, batch)
    assert len(forwards) == (1 if kind in ("simpo", "orpo") else 2)
    want = torch.zeros((), dtype=torch.float64)
    sides = (("input_ids", "labels"), ("rejected_ids", "rejected_labels"))
    for f in features:
        with torch.no_grad():
            policy = [sequence_logp(llama, f[ids], f[labels]) for ids, labels in sides]
            reference = [sequence_logp(base, f[ids], f[labels]) for ids, labels in sides]
        tokens = [sum(x != tasks.IGNORE for x in f[labels][1:]) for _, labels in sides]
        want = want + _pair_loss(kind, 0.4, gamma, sft, policy, reference, tokens, smoothing)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in llama.named_parameters() if "lora_" in n)
    evals = task.evaluate(llama, features, torch.device("cpu"), 8, contextlib.nullcontext)
    assert evals["eval_loss"] == pytest.approx(float(want) / 3, abs=1e-5)
    scores = task.pair_scores(llama, batch)
    assert evals["reward_margin"] == pytest.approx(float((scores.chosen - scores.rejected).mean()), abs=1e-5)


def test_later_evaluations_reuse_the_reference_log_probabilities(tmp_path):
    """The reference model (the base) scores an evaluation split alike every time: after the first evaluation
    only the adapted model runs, and the metrics equal a fresh evaluation's after the adapter changed."""
    rows = preference_rows(10, seed=7)
    llama = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir(tmp_path, [
        {"instruction": r["prompt"], "input": r["chosen"], "output": r["rejected"]} for r in rows]))
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "tiny-llama")
    lorafit.attach(llama, lorafit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    config = RunConfig()
    config.task.type, config.task.max_length, config.data.instruction_field = "preference", 64, "prompt"

    def task():
        made = Preference(config, tok)
        made._plain_head = True
        return made

    cached = task()
    features = cached.encode(rows, "train").features
    forwards = []
    llama.model.layers[0].register_forward_hook(lambda *_: forwards.append(1))

    def evaluate(t, feats=features):
        forwards.clear()
        return t.evaluate(llama, feats, torch.device("cpu"), 4, contextlib.nullcontext), len(forwards)

    _, first = evaluate(cached)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in llama.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    again, later = evaluate(cached)
    fresh, _ = evaluate(task())
    assert later * 2 == first and again == pytest.approx(fresh, abs=1e-6) and again["reward_margin"] != 0
    _, other = evaluate(cached, features[:6])  # another split: its reference is computed
    assert other == 2 * len(range(0, 6, 4))


def test_conversational_pairs_encode_as_the_text_pairs_they_are(tmp_path):
    """TRL's conversational preference rows (a prompt of messages, responses of messages) and whole
    conversations without a prompt field give the tokens and labels of the text form; anything else is refused
    naming the field."""
    rows = preference_rows(4, seed=2)
    tiny_llama_dir(tmp_path, [{"instruction": r["prompt"], "input": r["chosen"], "output": r["rejected"]}
                              for r in rows])
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "tiny-llama")

    def encoded(rows, **data):
        config = RunConfig()
        config.task.type = "preference"
        for key, value in data.items():
            setattr(config.data, key, value)
        return Preference(config, tok).encode(rows, "train").features

    text = encoded(rows, instruction_field="prompt")
    user = [{"role": "user", "content": r["prompt"]} for r in rows]
    conversational = [{"prompt": [u], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                       "rejected": [{"role": "assistant", "content": r["rejected"]}]} for u, r in zip(user, rows)]
    whole = [{"chosen": [u, {"role": "assistant", "content": r["chosen"]}],
              "rejected": [u, {"role": "assistant", "content": r["rejected"]}]} for u, r in zip(user, rows)]
    assert len(text) == 4
    assert encoded(conversational, instruction_field="prompt") == text == encoded(whole)
    with pytest.raises(ValueError, match="field 'rejected' must hold a text or a list of"):
        encoded([{"chosen": "fine", "rejected": 3}])


def test_dpo_learns_the_preferred_responses_and_writes_a_causal_lm_adapter(tmp_path):
    config = preference_setup(tmp_path)
    summary = train(config, progress=False)
    run = tmp_path / "run"
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == "eval"]
    assert summary["task"] == "preference"
    # held-out pairs: the chosen review gets the larger reward far more often than chance, by a margin
    assert evals[-1]["reward_accuracy"] >= 0.75 and evals[-1]["reward_margin"] > 0.8, evals[-1]
    assert summary["validation"]["eval_loss"] < 0.45 and summary["best"]["metric"] == "eval_loss"
    # the base model is the reference itself: every reward 0, the loss log 2
    base = evaluate(run, split="validation", base=True)
    assert base["reward_margin"] == 0 and base["eval_loss"] == pytest.approx(0.6931472, abs=1e-6)
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "CAUSAL_LM" and adapter_config["r"] == 4
    # the saved adapter, reloaded by `lorafit eval`, gives the run's validation numbers
    again = evaluate(run, split="validation")
    assert again["reward_accuracy"] == pytest.approx(summary["validation"]["reward_accuracy"])
    assert again["eval_loss"] == pytest.approx(summary["validation"]["eval_loss"], abs=1e-5)
    with pytest.raises(ValueError, match="samples: a 'preference' run's evaluation has no output per example to "
                                         "write; it is for classification, causal_lm, seq2seq, reward, grpo runs"):
        evaluate(run, samples=tmp_path / "pairs.jsonl")
    # PEFT loads the adapter to the logits lorafit gives with it
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-llama")
    ours = copy.deepcopy(base)
    lorafit.load_adapter(ours, run / "adapter")
    theirs = peft.PeftModel.from_pretrained(base, run / "adapter")
    ids = torch.tensor([[3, 5, 7, 9, 11]])
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-llama")
        assert not torch.allclose(ours(input_ids=ids).logits, plain(input_ids=ids).logits)  # the adapter counts


@pytest.mark.parametrize("kind, method", [("ipo", "lora"), ("simpo", "full"), ("orpo", "lora")])
def test_the_other_losses_learn_the_preferred_responses(tmp_path, kind, method):
    """IPO with the adapter, SimPO fine-tuning the whole model (no reference needed), ORPO with the adapter: each
    ranks held-out chosen responses above rejected ones after training; the untrained model (the adapter off) does
    at most by chance."""
    beta = {"ipo": 0.5, "simpo": 2.0, "orpo": 0.5}[kind]
    lr = "2e-3" if method == "full" else "2e-2"
    config = preference_setup(tmp_path)
    args = [f"task.preference_loss='{kind}'", f"task.dpo_beta={beta}", f"train.method='{method}'", f"train.lr={lr}"]
    summary = train(config, args, progress=False)
    assert summary["validation"]["reward_accuracy"] >= 0.75, summary["validation"]
    assert summary["validation"]["reward_margin"] > 0
    if method == "lora":
        base = evaluate(tmp_path / "run", split="validation", base=True)
        assert base["reward_accuracy"] <= 0.5 and summary["validation"]["eval_loss"] < base["eval_loss"]


def assert_resume_matches(config: Path, tmp_path: Path, *extra: str) -> None:
    """A run crashed after its last checkpoint (step 6) and resumed ends with the uninterrupted run's adapter and
    validation numbers (dropout 0.2, gradient accumulation 2)."""
    args = ["train.epochs=3", "train.save_every=3", "train.eval_every=6", "train.grad_accum=2",
            "train.batch_size=4", "lora.lora_dropout=0.2", *extra]
    full = train(config, args + [f"output_dir={json.dumps(str(tmp_path / 'a'))}"], progress=False)
    resumed_args = args + [f"output_dir={json.dumps(str(tmp_path / 'b'))}"]
    with pytest.raises(Crash):
        train(config, resumed_args, callbacks=(crash_at(8),), progress=False)  # last checkpoint: step 6
    resumed = train(config, resumed_args, resume=True, progress=False)
    assert_same_tensors(adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b"))
    assert resumed["validation"] == pytest.approx(full["validation"], abs=1e-6)


def test_a_resumed_dpo_run_ends_where_an_uninterrupted_one_does(tmp_path):
    config = preference_setup(tmp_path, n_train=32, n_val=8)
    assert_resume_matches(config, tmp_path)


def test_a_long_prompt_keeps_its_end_within_max_prompt_length(tmp_path):
    """task.max_prompt_length: a prompt over that many tokens keeps its last ones, so the responses still fit into
    max_length (without it such a pair is left out); the responses' tokens are kept whole, and KTO's rows alike."""
    from lorafit.train.kto import KTO

    rows = preference_rows(2, seed=5)
    rows[0]["prompt"] = " ".join(["the film was"] * 30)  # 90 words: past max_length on its own
    _, _, tok = adapted_llama(tmp_path, rows, seed=1)
    config = RunConfig()
    config.task.type, config.task.max_length, config.data.instruction_field = "preference", 48, "prompt"
    whole = Preference(config, tok).encode(rows, "train")
    assert len(whole.features) == 1 and whole.skipped == 1
    config.task.max_prompt_length = 16
    cut = Preference(config, tok).encode(rows, "train").features
    assert len(cut) == 2
    config.task.max_length = 512
    full = Preference(config, tok).encode(rows, "train").features
    for side, labels in (("input_ids", "labels"), ("rejected_ids", "rejected_labels")):
        first = next(i for i, x in enumerate(cut[0][labels]) if x != tasks.IGNORE)
        assert first == 16 and cut[0][side] == full[0][side][-len(cut[0][side]):]  # the end of the long prompt
        assert cut[1][side] == full[1][side]  # a short prompt as it was
    config.task.type, config.data.output_field, config.data.label_field = "kto", "completion", "label"
    config.task.max_length = 48
    kto_rows = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in rows]
    kto = KTO(config, tok).encode(kto_rows, "train").features
    assert len(kto) == 2 and next(i for i, x in enumerate(kto[0]["labels"]) if x != tasks.IGNORE) == 16


def test_a_precomputed_reference_gives_the_step_s_loss_with_one_forward(tmp_path):
    """task.precompute_reference: each example's reference log-probabilities computed once (in evaluation batches,
    its rows in another company); a training batch made of them gives the loss the step computes with the reference
    forward, and the step runs the model once."""
    from lorafit.train.reference import REFERENCE, with_reference

    rows = preference_rows(10, seed=2)
    llama, _, tok = adapted_llama(tmp_path, rows, seed=5)
    config = RunConfig()
    config.task.type, config.task.max_length, config.data.instruction_field = "preference", 64, "prompt"
    task = Preference(config, tok)
    features = task.encode(rows, "train").features
    known = with_reference(task, llama, features, torch.device("cpu"), 3, contextlib.nullcontext)
    assert len(known) == len(features) and all(len(f[REFERENCE]) == 2 for f in known)
    forwards = []
    llama.model.layers[0].register_forward_hook(lambda *_: forwards.append(1))
    picked = [7, 0, 4, 9]
    inline = task.loss_sum(llama, task.collate([features[i] for i in picked]))
    assert len(forwards) == 2
    forwards.clear()
    batch = task.collate(known.rows(picked))
    loss = task.loss_sum(llama, batch)
    assert len(forwards) == 1 and batch[REFERENCE].shape == (8,)
    torch.testing.assert_close(loss, inline, rtol=1e-5, atol=1e-5)


def test_precomputed_references_train_dpo_as_the_inline_reference_does(tmp_path):
    """With LoRA the precomputed reference is the inline one (the base, the adapter off): the runs end with the
    same adapter. A resumed run computes them again before its checkpoint loads and ends where an uninterrupted one
    does."""
    config = preference_setup(tmp_path, n_train=32, n_val=8)
    args = ["train.epochs=2"]
    train(config, [*args, f"output_dir={json.dumps(str(tmp_path / 'inline'))}"], progress=False)
    summary = train(config, [*args, "task.precompute_reference=true",
                             f"output_dir={json.dumps(str(tmp_path / 'pre'))}"], progress=False)
    inline, pre = adapter_tensors(tmp_path / "inline"), adapter_tensors(tmp_path / "pre")
    for name in inline:
        torch.testing.assert_close(pre[name], inline[name], rtol=1e-3, atol=1e-4)
    assert summary["validation"]["reward_margin"] > 0
    assert_resume_matches(config, tmp_path, "task.precompute_reference=true")


def test_full_fine_tuning_trains_dpo_from_precomputed_references(tmp_path, monkeypatch):
    """Full fine-tuning has no base to switch back to: with task.precompute_reference the model as loaded is the
    reference, for training and evaluation alike, and `lorafit eval` compares the fine-tuned model with the model
    the run started from (the run's own numbers again; the starting model's rewards are 0), loading the
    fine-tuned model only once the starting one is gone."""
    import weakref

    import lorafit.train.run as run_module

    config = preference_setup(tmp_path)
    summary = train(config, ["train.method='full'", "task.precompute_reference=true", "train.lr=2e-3",
                             "train.epochs=3"], progress=False)
    assert summary["validation"]["reward_accuracy"] >= 0.75 and summary["validation"]["reward_margin"] > 0.5, \
        summary["validation"]
    loaded, load_run = [], run_module.load_run

    def one_at_a_time(*args, **kwargs):
        assert all(model() is None for model in loaded), "an earlier load_run's model is still in memory"
        prep = load_run(*args, **kwargs)
        loaded.append(weakref.ref(prep.model))
        return prep

    monkeypatch.setattr(run_module, "load_run", one_at_a_time)
    again = evaluate(tmp_path / "run", split="validation")
    assert again == pytest.approx(summary["validation"], abs=1e-4) and len(loaded) == 2
    monkeypatch.undo()
    start = evaluate(tmp_path / "run", split="validation", base=True)
    assert start["reward_margin"] == 0 and start["eval_loss"] == pytest.approx(0.6931, abs=1e-4)


def test_a_resumed_full_fine_tuning_run_computes_the_same_references_again(tmp_path):
    """Fully fine-tuned, a crashed run's resume computes the references again from the model as loaded, before
    its checkpoint loads: it ends with the uninterrupted run's weights and numbers."""
    from safetensors.torch import load_file

    config = preference_setup(tmp_path, n_train=16, n_val=8)
    args = ["train.method='full'", "task.precompute_reference=true", "train.lr=2e-3", "train.epochs=3",
            "train.batch_size=4", "train.save_every=3", "train.eval_every=6"]
    full = train(config, args + [f"output_dir={json.dumps(str(tmp_path / 'a'))}"], progress=False)
    resumed_args = args + [f"output_dir={json.dumps(str(tmp_path / 'b'))}"]
    with pytest.raises(Crash):
        train(config, resumed_args, callbacks=(crash_at(8),), progress=False)  # last checkpoint: step 6
    resumed = train(config, resumed_args, resume=True, progress=False)
    assert_same_tensors(*(load_file(tmp_path / run / "model" / "model.safetensors") for run in ("a", "b")))
    assert resumed["validation"] == pytest.approx(full["validation"], abs=1e-6)
    assert full["validation"]["reward_margin"] != 0


@pytest.mark.parametrize("setting, message", [
    ("train.method='full'", "train.method = 'full' with task.preference_loss = 'dpo', which compares with a "
                            "reference model, needs task.precompute_reference = true"),
    ("task.preference_loss='simpo' task.dpo_beta=2 task.precompute_reference=true",
     "task.precompute_reference task.preference_loss = 'simpo' uses no reference model"),
    ("task.type='causal_lm' data.output_field='chosen' task.dpo_beta=0.1 task.precompute_reference=true",
     "task.precompute_reference is for task.type = 'preference' or 'kto'"),
    ("data.streaming=true task.precompute_reference=true", "task.precompute_reference needs every example"),
    ("task.label_smoothing=0.5", "task.label_smoothing must be a number in "),
    ("task.preference_loss='ipo' task.label_smoothing=0.1", "task.label_smoothing is for the sigmoid losses"),
    ("task.max_prompt_length=32", "task.max_prompt_length must be a whole number of tokens between 1 and "
                                  "task.max_length - 1 (31), got 32"),
    ("task.dpo_beta=0", "task.dpo_beta must be a finite number > 0"),
    ("task.preference_loss='kto'", "task.preference_loss must be one of dpo, ipo, hinge, simpo, orpo, got 'kto'"),
    ("task.simpo_gamma=1.0", "task.simpo_gamma is SimPO's margin; task.preference_loss is 'dpo'"),
    ("task.sft_weight=-1", "task.sft_weight must be a finite number >= 0"),
    ("task.preference_loss='orpo' task.sft_weight=1", "task.sft_weight adds an NLL term"),
    ("task.type='causal_lm' data.output_field='chosen'", "task.dpo_beta is for task.type = 'preference'"),
    ("data.rejected_field='chosen'", "data.rejected_field is data.chosen_field too"),
    ("data.messages_field='messages'", "data.messages_field is not used by task.type = 'preference'"),
    ("task.generate_rows=4", "task.generate_rows is for causal_lm and seq2seq"),
    ("task.packing=true", "task.packing is for causal_lm"),
    ("data.chosen_field='better'", "field 'better' (data.chosen_field) not found"),
])
def test_what_preference_training_cannot_use_is_refused_naming_the_setting(tmp_path, setting, message):
    config = preference_setup(tmp_path, n_train=8, n_val=4)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train(config, setting.split(" "), progress=False)
    assert not (tmp_path / "run" / "adapter").exists()
