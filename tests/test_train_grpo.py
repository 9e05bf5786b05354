"""task.type = "grpo": online RL from a reward function or a lorafit run's model, on a tiny Llama."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lorafit  # noqa: E402
from lorafit.train import evaluate, train  # noqa: E402
from lorafit.train.config import load_config  # noqa: E402
from lorafit.train.rewards import run_scorer  # noqa: E402
from lorafit.train.run import load_run, prepare  # noqa: E402
from tests.test_train_loop import Crash, adapter_tensors, assert_same_tensors, crash_at  # noqa: E402
from tests.test_train_support import classification_setup, instruction_setup  # noqa: E402

REWARDS = '''
def great(prompts, completions, references):
    """The share of a completion's words that are 'great'."""
    return [sum(w == "great" for w in c.split()) / max(len(c.split()), 1) for c in completions]


def echo(prompts, completions, references):
    """1 for a completion that starts with the row's reference (data.output_field), else 0."""
    return [float(c.startswith(r)) for c, r in zip(completions, references)]


def short(prompts, completions, references):
    return [0.0]


def great_logged(completions, trainer_state, log_metric, log_extra, **kwargs):
    """great's reward, TRL-style; logs a metric in process 0 only, one in every process, a column."""
    if trainer_state.is_world_process_zero:
        log_metric("main_only", 1.0)
    log_metric("everywhere", 2.0)
    log_extra("chars", [len(c) for c in completions])
    return great(None, completions, None)


def aligned(prompts, completions, references, input, weight=2.0):
    """Each row's input column, which its prompt must hold; 1 for a completion that repeats a word of it."""
    assert len(input) == len(prompts) and all(x in p for p, x in zip(prompts, input)), (prompts, input)
    return [float(any(w in c.split() for w in x.split())) for c, x in zip(completions, input)]
'''
LORA = 'r = 8\nlora_alpha = 16\ntarget_modules = "all-linear"'
TRAIN = "epochs = 4\nbatch_size = 4\nlr = 3e-2\nlog_every = 2\nnum_threads = 1"


def grpo_setup(tmp_path: Path, reward: str = "great", extra: list[str] | None = None) -> tuple[Path, list[str]]:
    """The tiny Llama's instruction rows, as prompts, and the settings of a GRPO run rewarded by ``reward``."""
    (tmp_path / "rewards.py").write_text(REWARDS)
    config = instruction_setup(tmp_path, 32, 8, lora=LORA, train=TRAIN)
    return config, ["task.type=grpo", f"task.reward_function='{tmp_path / 'rewards.py'}:{reward}'",
                    "task.max_new_tokens=8", *(extra or [])]


def test_grpo_raises_a_function_s_reward_and_evaluates_it_reproducibly(tmp_path):
    config, settings = grpo_setup(tmp_path)
    summary = train(config, settings, progress=False)
    base = evaluate(tmp_path / "run", base=True)
    assert set(base) == {"reward", "completion_length"}
    assert summary["validation"]["reward"] > base["reward"] + 0.3, (summary["validation"], base)
    # the saved adapter samples the evaluation's completions again: evaluation has its own seeded stream
    assert evaluate(tmp_path / "run") == pytest.approx(summary["validation"], rel=1e-6)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    sampled = [r["reward"] for r in logged if r["type"] == "train"]
    assert len(sampled) == 16 and sum(sampled[-4:]) > sum(sampled[:4]) + 0.8, sampled
    assert all(0 < r["completion_length"] <= 8 for r in logged if r["type"] == "train")
    assert (tmp_path / "run" / "curves.png").is_file()
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"


def test_weighted_rewards_are_logged_each_and_two_steps_per_batch_of_samples_learn(tmp_path):
    """Two reward functions, weighted; two clipped steps on each batch of samples, DAPO's token sum and
    clip-higher: the reward rises, and the log and the evaluation report each reward, whose weighted sum is the
    reward, and the share of clipped tokens."""
    config, settings = grpo_setup(tmp_path, extra=[
        f"task.reward_function=['{tmp_path / 'rewards.py'}:great', '{tmp_path / 'rewards.py'}:echo']",
        "task.reward_weights=[1.0, 0.5]", "task.num_iterations=2", "task.grpo_loss=dapo",
        "task.grpo_epsilon_high=0.28"])
    summary = train(config, settings, progress=False)
    base = evaluate(tmp_path / "run", base=True)
    assert summary["validation"]["reward"] > base["reward"] + 0.3, (summary["validation"], base)
    assert {"reward_std", "flat_groups", "clip_ratio"} <= set(json.loads(
        (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0]))
    for metrics in (summary["validation"], base):
        assert set(metrics) == {"reward", "reward/great", "reward/echo", "completion_length"}
        assert metrics["reward"] == pytest.approx(metrics["reward/great"] + 0.5 * metrics["reward/echo"])
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in logged if r["type"] == "train"]
    assert [r["step"] for r in trained] == list(range(2, 65, 2))  # 8 batches of samples x 2 steps x 4 epochs
    for r in trained:
        assert r["reward"] == pytest.approx(r["reward/great"] + 0.5 * r["reward/echo"])
        assert 0 <= r["clip_ratio"] <= 0.5  # a log line covers both steps on a batch; the first clips nothing
    assert any(r["clip_ratio"] > 0 for r in trained)


@pytest.mark.parametrize("form", ["cispo", "sapo", "luspo"])
def test_trl_s_other_objectives_raise_the_reward_too(tmp_path, form):
    """cispo, sapo and luspo, two steps on each batch of samples (where they part from the clipped objective)."""
    config, settings = grpo_setup(tmp_path, extra=[f"task.grpo_loss={form}", "task.num_iterations=2",
                                                   "train.epochs=2"])
    summary = train(config, settings, progress=False)
    base = evaluate(tmp_path / "run", base=True)
    assert summary["validation"]["reward"] > base["reward"] + 0.3, (summary["validation"], base)


@pytest.mark.parametrize("cap, calls_made", [(0, [8]), (4, [4, 4])])
def test_a_step_samples_all_its_micro_batches_at_once_and_cuts_each_to_its_own_width(tmp_path, monkeypatch, cap,
                                                                                      calls_made):
    """One generation for the prompts of every micro-batch of a step (or generations of at most
    task.generation_batch_size completions, joined); each micro-batch then keeps its own rows, cut to its prompt
    width and its longest completion: the prompts are its own, the cut-off columns were padding, and the
    completions' log-probabilities are those of the uncut sequences."""
    config, settings = grpo_setup(tmp_path, extra=[f"task.generation_batch_size={cap}", "task.max_new_tokens=12"])
    prep = prepare(load_config(config, settings))
    task = prep.task
    rows = [{"instruction": "repeat", "input": "a great movie with a great cast and a great plot", "output": "x"},
            {"instruction": "say", "input": "hi", "output": "y"}]
    micro = [(task.collate(task.encode([row], "train").features), True) for row in rows]
    calls, joins, sample, sample_in_calls = [], [], task.sample, task._sample_in_calls

    def counted(model, batch, n):
        seqs, mask, texts = sample(model, batch, n)
        if calls:  # as if all of the second generation's completions had ended 3 tokens early
            seqs, mask = seqs[:, :-3], mask[:, :-3]
        calls.append((seqs, mask, texts))
        return calls[-1]

    def joined_(model, batch, n):
        joins.append(sample_in_calls(model, batch, n))
        return joins[-1]

    monkeypatch.setattr(task, "sample", counted)
    monkeypatch.setattr(task, "_sample_in_calls", joined_)
    torch.manual_seed(0)
    task.prepare_window(prep.model, micro)
    assert [c[0].shape[0] for c in calls] == calls_made  # 2 prompts x 4 completions
    joined, joined_mask, texts = joins[0]
    assert len(texts) == 8 and joined.shape[1] == max(c[0].shape[1] for c in calls)
    if cap:  # the joined calls: each one's rows, padded on the right with masked columns
        for k, (seqs, mask, _) in enumerate(calls):
            assert torch.equal(joined[4 * k:4 * k + 4, :seqs.shape[1]], seqs)
            assert torch.equal(joined_mask[4 * k:4 * k + 4, :mask.shape[1]], mask)
            assert not joined_mask[4 * k:4 * k + 4, mask.shape[1]:].any()
        assert calls[1][0].shape[1] == joined.shape[1] - 3
        assert (joined[4:, -3:] == task.pad_id).all()
    width = max(b["input_ids"].shape[1] for b, _ in micro)
    assert micro[0][0]["input_ids"].shape[1] > micro[1][0]["input_ids"].shape[1]  # two prompt widths
    for k, (batch, _) in enumerate(micro):
        own, longest = batch["input_ids"].shape[1], batch["completion_mask"].shape[1]
        assert torch.equal(batch["seqs"][:, :own], batch["input_ids"].repeat_interleave(4, dim=0))
        assert batch["completion_mask"][:, -1].any() and longest <= joined_mask.shape[1]
        assert not joined_mask[4 * k:4 * k + 4, longest:].any()  # what was cut off carried no completion token
        rows_joined = joined[4 * k:4 * k + 4]
        with torch.no_grad():
            alone = task.completion_logps(prep.model, batch["seqs"], batch["prompt_mask"], longest)
            padded_mask = torch.nn.functional.pad(batch["prompt_mask"], (width - own, 0))
            uncut = task.completion_logps(prep.model, rows_joined, padded_mask, joined.shape[1] - width)
        real = batch["completion_mask"] > 0
        torch.testing.assert_close(alone[real], uncut[:, :longest][real], atol=1e-5, rtol=1e-5)


def test_reward_functions_get_the_row_columns_they_name(tmp_path):
    """A function's parameters after the first three are row columns, a list each aligned with the completions
    (all of them with **kwargs; none for a function without); one with a parameter named completions gets the
    lists by name, as TRL calls reward functions; a column the rows lack is named; a GRPO run hands every
    completion its own row's columns."""
    from lorafit.train.rewards import function_scorer

    (tmp_path / "cols.py").write_text(
        "def named(prompts, completions, references, label, *, extra=None, absent=None):\n"
        "    assert absent is None\n"
        "    return [float(l) + (e or 0) for l, e in zip(label, extra)]\n"
        "def every(prompts, completions, references, **columns):\n"
        "    return [len(columns) + float(columns['label'][i]) for i in range(len(completions))]\n"
        "def plain(p, c, r):\n"
        "    return [1.0] * len(c)\n"
        "def trl(completions, label, **kwargs):\n"  # as TRL calls it: by name, the rest among **kwargs
        "    assert kwargs['prompts'] == ['a', 'b'] and kwargs['references'] == [None, None], kwargs\n"
        "    return [float(l) + len(c) for c, l in zip(completions, label)]\n"
        "def completions_only(completions):\n"
        "    return [len(c) + 1.0 for c in completions]\n")
    rows = [{"text": "a", "label": 1, "extra": 10}, {"text": "b", "label": 0}]
    args = ([[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]], ["x", "y"], [None, None], rows)
    assert function_scorer(f"{tmp_path / 'cols.py'}:named")(*args) == [11.0, 0.0]  # extra: None in row 2
    # called by name (it has a completions parameter): the three columns and TRL's log_metric and log_extra
    assert function_scorer(f"{tmp_path / 'cols.py'}:every")(*args) == [6.0, 5.0]
    assert function_scorer(f"{tmp_path / 'cols.py'}:plain")(*args) == [1.0, 1.0]
    assert function_scorer(f"{tmp_path / 'cols.py'}:trl")(*args) == [2.0, 1.0]
    assert function_scorer(f"{tmp_path / 'cols.py'}:completions_only")(*args) == [2.0, 2.0]
    with pytest.raises(ValueError, match=r"cols.py:named: asks for the column 'label', which the rows do not have "
                                         r"\(their columns: text\)"):
        function_scorer(f"{tmp_path / 'cols.py'}:named")(*args[:3], [{"text": "a"}, {"text": "b"}])

    config, settings = grpo_setup(tmp_path, reward="aligned", extra=["train.epochs=1"])
    summary = train(config, settings, progress=False)
    assert 0 <= summary["validation"]["reward"] <= 1


def test_trl_style_functions_get_chat_data_as_messages_token_ids_and_may_pass_on_a_completion():
    """TRL's forms: with chat data a function called by name gets each prompt as its messages and each completion
    as an assistant message (a positional function still gets texts); completion_ids reach a function that names
    them or takes them among **kwargs; None (not judged) is NaN, and numbers of other types are read."""
    import numpy as np

    from lorafit.train.rewards import function_scorer

    prompts = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "a"}],
               [{"role": "user", "content": "b"}]]
    seen = {}

    def trl(prompts, completions, completion_ids, **kwargs):
        seen.update(prompts=prompts, completions=completions, ids=completion_ids, kwargs=kwargs)
        return [np.float32(0.5), None]

    def positional(p, c, r, completion_ids):
        seen.update(positional=(p, c, completion_ids))
        return torch.tensor([1.0, 2.0])

    module = type(sys)("chat_rewards")
    module.trl, module.positional = trl, positional
    sys.modules["chat_rewards"] = module
    try:
        args = (prompts, ["x y", "z"], [None, "ref"], [{"label": 1}, {"label": 0}], [[5, 6, 2], [7]])
        got = function_scorer("chat_rewards:trl", conversational=True)(*args)
        assert got[0] == 0.5 and math.isnan(got[1])
        assert seen["prompts"] == prompts
        assert seen["completions"] == [[{"role": "assistant", "content": c}] for c in ("x y", "z")]
        assert seen["ids"] == [[5, 6, 2], [7]]
        assert {k: v for k, v in seen["kwargs"].items() if not callable(v)} == {"references": [None, "ref"],
                                                                                 "label": [1, 0]}
        assert set(seen["kwargs"]) == {"references", "label", "log_metric", "log_extra"}  # no trainer_state here
        assert function_scorer("chat_rewards:trl")(*args)[0] == 0.5  # not chat data: texts
        assert seen["prompts"] == ["be brief\na", "b"] and seen["completions"] == ["x y", "z"]
        assert function_scorer("chat_rewards:positional", conversational=True)(*args) == [1.0, 2.0]
        assert seen["positional"] == (["be brief\na", "b"], ["x y", "z"], [[5, 6, 2], [7]])
        with pytest.raises(ValueError, match="chat_rewards:positional: asks for completion_ids"):
            function_scorer("chat_rewards:positional")(*args[:4])
        module.trl = lambda completions, **kwargs: ["1", float("inf")]
        with pytest.raises(ValueError, match=r"chat_rewards:trl: returned '1'; a reward is a finite number, or None"):
            function_scorer("chat_rewards:trl")(*args)
    finally:
        del sys.modules["chat_rewards"]


def test_reward_functions_get_the_trainer_state_and_log_metrics_and_columns():
    """TRL's trainer_state, log_metric and log_extra: a function called by name with **kwargs gets all three, a
    positional one those it names; metrics add up into (sum, count), columns are one value per completion, and
    misuse is refused naming the function."""
    from lorafit.train.rewards import RewardCall, function_scorer

    def trl(completions, trainer_state, **kwargs):
        kwargs["log_metric"]("progress", trainer_state.global_step / trainer_state.max_steps)
        kwargs["log_metric"]("progress", torch.tensor(1.0))
        kwargs["log_extra"]("words", [len(c.split()) for c in completions])
        return [1.0] * len(completions)

    def positional(p, c, r, log_metric):
        log_metric("mean_length", sum(map(len, c)) / len(c))
        return [0.0] * len(c)

    module = type(sys)("logging_rewards")
    module.trl, module.positional = trl, positional
    sys.modules["logging_rewards"] = module
    try:
        state = transformers.TrainerState(global_step=3, max_steps=12)
        call = RewardCall(state, reserved=frozenset({"reward"}))
        args = ([[{"role": "user", "content": "a"}]] * 2, ["x y", "zzzz"], [None, None])
        assert function_scorer("logging_rewards:trl")(*args, call=call) == [1.0, 1.0]
        assert function_scorer("logging_rewards:positional")(*args, call=call) == [0.0, 0.0]
        assert call.metrics == {"progress": [1.25, 2], "mean_length": [3.5, 1]} and call.extra == {"words": [2, 1]}
        for bad, message in ((lambda **k: k["log_metric"]("reward", 1.0), r"log_metric\('reward'\) names one of"),
                             (lambda **k: k["log_metric"]("reward/x", 1.0), r"log_metric\('reward/x'\) names one"),
                             (lambda **k: k["log_metric"]("m", float("nan")), r"log_metric\('m', nan\): a metric is"),
                             (lambda **k: k["log_extra"]("w", [1]), r"log_extra\('w'\) got 1 values for 2")):
            module.trl = lambda completions, **kwargs: bad(**kwargs) or [1.0, 1.0]
            with pytest.raises(ValueError, match="task.reward_function logging_rewards:trl: " + message):
                function_scorer("logging_rewards:trl")(*args, call=call)
    finally:
        del sys.modules["logging_rewards"]


def test_async_reward_functions_run_concurrently_also_under_a_running_event_loop():
    """Two async functions that each wait for the other's start finish only when they run at once; score_all
    awaits them on its own loop, so a caller inside an event loop (a notebook) may call it; what an async
    function returns is checked as a plain one's return is."""
    import asyncio

    from lorafit.train.rewards import function_scorer, score_all

    started = {}

    def waiting_for(me: str, other: str):
        async def reward(completions, **kwargs):
            started.setdefault(me, asyncio.Event()).set()
            await asyncio.wait_for(started.setdefault(other, asyncio.Event()).wait(), timeout=10)
            return [float(len(c)) for c in completions]
        return reward

    module = type(sys)("async_rewards")
    module.first, module.second = waiting_for("first", "second"), waiting_for("second", "first")
    module.wrong = waiting_for("wrong", "wrong")
    sys.modules["async_rewards"] = module
    try:
        rewards = [(name, function_scorer(f"async_rewards:{name}")) for name in ("first", "second")]
        args = ([[{"role": "user", "content": "p"}]] * 2, ["ab", "c"], [None, None], None, None)

        async def in_a_notebook():
            return score_all(rewards, *args)

        assert asyncio.run(in_a_notebook()) == [[2.0, 1.0], [2.0, 1.0]]
        started.clear()
        assert score_all(rewards, *args) == [[2.0, 1.0], [2.0, 1.0]]
        module.wrong = lambda completions: asyncio.sleep(0, result=[1.0])  # an awaitable, of one reward
        with pytest.raises(ValueError, match="async_rewards:wrong: returned 1 rewards for 2 completions"):
            score_all([("wrong", function_scorer("async_rewards:wrong"))], *args)
    finally:
        del sys.modules["async_rewards"]


LOGGING_REWARDS = '''
import asyncio


def counted(completions, trainer_state, log_metric, log_extra, **kwargs):
    """The share of "great" words; logs the step it scores for and each completion's word count."""
    log_metric("scored_at_step", trainer_state.global_step)
    log_metric("of_steps", trainer_state.max_steps)
    log_extra("words", [len(c.split()) for c in completions])
    return [sum(w == "great" for w in c.split()) / max(len(c.split()), 1) for c in completions]


async def later(completions, **kwargs):
    await asyncio.sleep(0)
    return [0.5] * len(completions)
'''


def test_a_grpo_run_logs_its_completions_and_what_reward_functions_log(tmp_path):
    """task.log_completions: every training completion is a line of completions.jsonl, with the step it trains,
    its rewards, its advantage (its group's, centred and scaled) and the columns functions logged, and so is
    every completion the evaluation sampled; log_metric's
    values are averaged into metrics.jsonl's train lines and the evaluation; trainer_state says where training
    stands; an async function is awaited."""
    (tmp_path / "logging.py").write_text(LOGGING_REWARDS)
    config, settings = grpo_setup(tmp_path, extra=[
        f"task.reward_function=['{tmp_path / 'logging.py'}:counted', '{tmp_path / 'logging.py'}:later']",
        "task.log_completions=true", "train.epochs=1"])
    summary = train(config, settings, progress=False)
    assert summary["validation"]["scored_at_step"] == 8 and summary["validation"]["of_steps"] == 8
    assert summary["validation"]["reward/later"] == 0.5
    assert evaluate(tmp_path / "run")["scored_at_step"] == 8 and evaluate(tmp_path / "run", base=True)["of_steps"] == 0
    metrics = evaluate(tmp_path / "run", samples=tmp_path / "samples.jsonl")  # `lorafit eval --samples`
    again = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["example"] for r in again] == list(range(8)) and "advantage" not in again[0]
    assert sum(r["reward"] for r in again) / 8 == pytest.approx(metrics["reward"])
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in logged if r["type"] == "train"]
    # log_every = 2: each line averages the two steps' calls, made with 0 and 1, 2 and 3, ... steps done
    assert [r["scored_at_step"] for r in trained] == [0.5, 2.5, 4.5, 6.5] and all(r["of_steps"] == 8
                                                                                   for r in trained)
    lines = [json.loads(line) for line in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    samples = [r for r in lines if r["split"] == "train"]
    assert [r["step"] for r in samples] == [step for step in range(1, 9) for _ in range(16)]  # 4 prompts x 4
    evaluated = [r for r in lines if r["split"] == "validation"]  # after the last step: one per prompt, in order
    assert [r["step"] for r in evaluated] == [8] * 8 and lines[-8:] == evaluated
    assert [r["example"] for r in evaluated] == list(range(8))
    assert all("advantage" not in r and r["words"] == len(r["completion"].split()) for r in evaluated)
    assert sum(r["reward"] for r in evaluated) / 8 == pytest.approx(summary["validation"]["reward"])
    for r in samples:
        assert r["words"] == len(r["completion"].split()) and 0 < r["length"] <= 8
        assert r["reward"] == pytest.approx(r["rewards"]["counted"] + 0.5) and r["rewards"]["later"] == 0.5
    for start in range(0, len(samples), 4):  # a group: one prompt's completions, in a row
        group = samples[start:start + 4]
        assert len({r["prompt"] for r in group}) == 1 and isinstance(group[0]["prompt"], str)
        rewards = torch.tensor([r["reward"] for r in group])
        expected = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
        assert [r["advantage"] for r in group] == pytest.approx(expected.tolist(), abs=1e-5)
    step_rewards = [sum(r["reward"] for r in samples if r["step"] in (s, s + 1)) / 32 for s in (1, 3, 5, 7)]
    assert [r["reward"] for r in trained] == pytest.approx(step_rewards, abs=1e-5)


CHAT_REWARDS = '''
def judged(completions, prompts, kind, completion_ids, **kwargs):
    """TRL's conversational form; the share of max_new_tokens a completion took, for prompts of kind "a" only."""
    assert all(p[-1]["role"] == "user" and c[0]["role"] == "assistant" for p, c in zip(prompts, completions))
    assert all(0 < len(ids) <= 8 for ids in completion_ids) and len(kind) == len(completions)
    return [len(ids) / 8 if k == "a" else None for ids, k in zip(completion_ids, kind)]


def one(prompts, completions, references):
    return [1.0] * len(completions)


def unjudged(completions, **kwargs):
    return [None] * len(completions)
'''


def test_a_grpo_run_on_chat_data_adds_only_the_rewards_that_judged_a_completion(tmp_path):
    """Chat rows (data.messages_field) with a TRL-style function that judges half the prompts: a completion's
    reward is the sum of the rewards that judged it, each reward's mean is over its own judged completions, and a
    completion that no reward judges is warned of and gets 0."""
    from tests.test_train_support import instruction_rows, write_jsonl

    rows = [{"messages": [{"role": "user", "content": f"{r['instruction']} {r['input']}"}],
             "kind": "ab"[i % 2]} for i, r in enumerate(instruction_rows(24))]
    config = instruction_setup(tmp_path, 16, 8, lora=LORA, train=TRAIN)  # the model; its rows' words, as messages
    write_jsonl(tmp_path / "train.jsonl", rows[:16])
    write_jsonl(tmp_path / "val.jsonl", rows[16:])
    (tmp_path / "chat.py").write_text(CHAT_REWARDS)
    settings = ["task.type=grpo", "data.messages_field='messages'", "data.instruction_field=''",
                "data.input_field=''", "data.output_field=''", "task.max_new_tokens=8", "train.epochs=1",
                f"task.reward_function=['{tmp_path / 'chat.py'}:judged', '{tmp_path / 'chat.py'}:one']"]
    validation = train(config, settings, progress=False)["validation"]
    assert 0 < validation["reward/judged"] <= 1 and validation["reward/one"] == 1
    # half the validation prompts are of kind "a": only their completions carry judged's reward
    assert validation["reward"] == pytest.approx(1 + validation["reward/judged"] / 2)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["reward/judged"] <= 1 and r["reward/one"] == 1 for r in logged if r["type"] == "train")

    task = prepare(load_config(config, [*settings[:-1], f"task.reward_function='{tmp_path / 'chat.py'}:unjudged'",
                                        f"output_dir='{tmp_path / 'unjudged'}'"])).task
    parts = torch.full((4, 1), math.nan)
    with pytest.warns(UserWarning, match="every reward returned None for 4 of a step's 4 completions"):
        task._add_log(task._weighted(parts), parts, torch.ones(4, 2))
    assert task._weighted(parts).tolist() == [0.0] * 4


def test_compiled_blocks_train_and_sampling_runs_them_eagerly(tmp_path, monkeypatch):
    """train.compile with grpo: the training forwards run the compiled blocks, sampling runs them eagerly (each
    new cache length would compile them again, until torch's recompile limit turned them eager for training
    too), and the reward rises as in eager mode."""
    from torch._dynamo.utils import counters

    from lorafit.train.grpo import GRPO

    torch._dynamo.reset()
    counters.clear()
    compiled_while_sampling = []
    sample = GRPO.sample

    def watched(self, *args, **kwargs):
        before = counters["frames"]["total"]
        out = sample(self, *args, **kwargs)
        compiled_while_sampling.append(counters["frames"]["total"] - before)
        return out

    monkeypatch.setattr(GRPO, "sample", watched)
    config, settings = grpo_setup(tmp_path, extra=["train.compile=true", "train.compile_backend=aot_eager"])
    summary = train(config, settings, progress=False)
    assert counters["stats"]["unique_graphs"] > 0  # training ran the compiled blocks
    assert len(compiled_while_sampling) > 16 and not any(compiled_while_sampling)
    monkeypatch.undo()
    base = evaluate(tmp_path / "run", base=True)
    assert summary["validation"]["reward"] > base["reward"] + 0.3, (summary["validation"], base)


def test_samples_follow_top_k_and_the_loss_reads_the_tempered_distribution(tmp_path, monkeypatch):
    """task.top_k = 1 samples the greedy completion every time; the log-probabilities the loss uses, and their
    gradients, are those of the logits over task.temperature, the distribution the completions were drawn from
    (as TRL's), whether the head runs in chunks of rows or the model gives its logits."""
    config, settings = grpo_setup(tmp_path, extra=["task.top_k=1", "task.temperature=0.5", "task.top_p=0.9"])
    prep = prepare(load_config(config, settings))
    task = prep.task
    batch = task.collate(task.encode([{"instruction": "repeat", "input": "a great movie", "output": "x"},
                                      {"instruction": "say", "input": "the plot", "output": "y"}], "train").features)
    seqs, mask, _ = task.sample(prep.model, batch, 3)
    greedy = prep.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 do_sample=False, max_new_tokens=8, pad_token_id=task.pad_id,
                                 eos_token_id=task.tok.eos_token_id)
    width = batch["input_ids"].shape[1]
    for i in range(6):
        n = int(mask[i].sum())
        assert torch.equal(seqs[i, width:width + n], greedy[i // 3, width:width + n])
    prompt_mask = batch["attention_mask"].repeat_interleave(3, dim=0)
    lorafit.attach(prep.model, lorafit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    params = [p for p in prep.model.parameters() if p.requires_grad]
    attention = torch.cat([prompt_mask, torch.ones_like(seqs[:, width:])], 1)
    logits = prep.model(input_ids=seqs, attention_mask=attention,
                        position_ids=(attention.cumsum(1) - 1).clamp(min=0)).logits.float()
    tempered = (logits[:, width - 1:-1] / 0.5).log_softmax(-1)
    want = tempered.gather(-1, seqs[:, width:, None])[..., 0]
    want_entropy = -(tempered.exp() * tempered).sum(-1)
    weights = torch.randn(want.shape)
    want_grads = torch.autograd.grad((want * weights).sum(), params, retain_graph=True)
    want_entropy_grads = torch.autograd.grad((want_entropy * weights).sum(), params)
    # the head's chunks (a few rows each here) or, for a model whose logits are not its head's, its own logits
    monkeypatch.setattr("lorafit.train.grpo.LOSS_CHUNK_LOGITS", 5 * len(task.tok))
    for plain in (None, False):
        task._plain_head = plain
        got, entropy = task.completion_logps(prep.model, seqs, prompt_mask, seqs.shape[1] - width, entropy=True)
        torch.testing.assert_close(got.detach(), want.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(entropy, want_entropy.detach(), atol=1e-5, rtol=1e-5)
        assert not entropy.requires_grad and (entropy > 0).all()
        for a, b in zip(torch.autograd.grad((got * weights).sum(), params), want_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)  # float32 sums in another order
        _, entropy = task.completion_logps(prep.model, seqs, prompt_mask, seqs.shape[1] - width, entropy=True,
                                           entropy_grad=True)  # task.entropy_coef's: with its gradient
        torch.testing.assert_close(entropy.detach(), want_entropy.detach(), atol=1e-5, rtol=1e-5)
        for a, b in zip(torch.autograd.grad((entropy * weights).sum(), params), want_entropy_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        assert task._plain_head is (plain is None)  # the tiny Llama's logits are its head's


def test_min_p_and_the_repetition_penalty_reach_the_sampler(tmp_path):
    """task.min_p near 1 keeps only the likeliest token: the greedy completion; a large task.repetition_penalty
    keeps a greedy completion from repeating any token it has seen, the prompt's included."""
    config, settings = grpo_setup(tmp_path, extra=["task.min_p=0.999"])
    prep = prepare(load_config(config, settings))
    task = prep.task
    batch = task.collate(task.encode([{"instruction": "repeat", "input": "a great movie", "output": "x"}],
                                     "train").features)
    width = batch["input_ids"].shape[1]
    seqs, mask, _ = task.sample(prep.model, batch, 3)
    greedy = prep.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 do_sample=False, max_new_tokens=8, pad_token_id=task.pad_id,
                                 eos_token_id=task.tok.eos_token_id)
    for i in range(3):
        n = int(mask[i].sum())
        assert torch.equal(seqs[i, width:width + n], greedy[0, width:width + n])
    task.config.task.min_p, task.config.task.top_k, task.config.task.repetition_penalty = 0.0, 1, 1e4
    seqs, mask, _ = task.sample(prep.model, batch, 1)
    tokens = seqs[0, :width + int(mask[0].sum())].tolist()
    assert len(set(tokens[width:])) == len(tokens[width:]) and not set(tokens[width:]) & set(tokens[:width])
    assert greedy[0, width:].tolist() != tokens[width:]  # the penalty changed the answer


def test_the_entropy_of_logits_with_minus_infinity_has_a_finite_gradient():
    """A -inf logit (a model that masks tokens out) adds nothing to the entropy nor NaN to its gradient."""
    from lorafit.train.tasks import row_entropy

    logits = torch.tensor([[0.5, float("-inf"), 1.5, -1.0]], requires_grad=True)
    entropy = row_entropy(logits, grad=True)
    (grad,) = torch.autograd.grad(entropy.sum(), logits)
    finite = torch.tensor([[0.5, 1.5, -1.0]], requires_grad=True)
    logp = finite.log_softmax(-1)
    (want,) = torch.autograd.grad(-(logp.exp() * logp).sum(), finite)
    torch.testing.assert_close(entropy.detach(), -(logp.exp() * logp).sum(-1).detach())
    assert grad[0, 1] == 0 and torch.allclose(grad[0, [0, 2, 3]], want[0])
    assert not row_entropy(logits).requires_grad


def expected_loss(logp, old, ref, mask, advantages, beta, form, level, low, high, max_new_tokens,
                  delta=None, rho=1.0, entropy=None, coef=0.0):
    """The GRPO loss of the module docstring, written out: the clipped ratio per token or per completion (capped
    at ``delta`` where the advantage is negative; or cispo's or sapo's term) less ``coef`` times the ``entropy``,
    on the tokens whose entropy is in the top ``rho`` share, the k3 KL term on all, and the ways of adding the
    token losses up (as the sum the loop divides by its units)."""
    log_ratio = logp - old
    if level == "sequence":
        log_ratio = (log_ratio * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
    ratio = log_ratio.exp()
    a = advantages[:, None]
    if form == "cispo":
        per_token = -ratio.clamp(max=high).detach() * a * logp
    elif form == "sapo":
        tau = torch.where(a > 0, SAPO_TAU[0], SAPO_TAU[1])
        per_token = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * a
    else:
        first = ratio if delta is None else torch.where(a < 0, ratio.clamp(max=delta), ratio)  # above 1 + ε_high
        per_token = -torch.minimum(first * a, ratio.clamp(low, high) * a)
    per_token = per_token - coef * entropy  # the entropy bonus
    if rho < 1:
        per_token = per_token * (entropy >= torch.quantile(entropy[mask > 0].detach(), 1 - rho)) * (mask > 0)
    per_token = per_token + beta * (torch.exp(ref - logp) - (ref - logp) - 1)
    total = per_token * mask
    return {"grpo": lambda: (total.sum(1) / mask.sum(1).clamp(min=1)).sum(),
            "sapo": lambda: (total.sum(1) / mask.sum(1).clamp(min=1)).sum(),
            "dr_grpo": lambda: total.sum() / max_new_tokens,
            "bnpo": lambda: total.sum() / mask.sum().clamp(min=1),
            "dapo": lambda: total.sum(), "cispo": lambda: total.sum(), "luspo": lambda: total.sum()}[form]()


SAPO_TAU = (2.0, 3.0)  # task.sapo_temperature_pos and _neg in the loss test


@pytest.mark.parametrize("beta, form, scale, level, truncated, delta, rho, coef", [
    (0.0, "grpo", "true", "token", False, None, 1.0, 0.0), (0.2, "grpo", "true", "token", False, 1.05, 0.5, 0.3),
    (0.2, "dr_grpo", "false", "token", False, None, 1.0, 0.0), (0.0, "bnpo", "'batch'", "token", True, None, 1.0, 0.1),
    (0.1, "dapo", "'group'", "sequence", True, 1.041, 0.2, 0.0),
    (0.0, "grpo", "'none'", "sequence", False, None, 1.0, 0.0),
    (0.0, "cispo", "true", "token", False, None, 1.0, 0.0), (0.1, "sapo", "'group'", "token", True, None, 0.5, 0.2),
    (0.0, "luspo", "true", "sequence", False, None, 1.0, 0.0)])
def test_the_loss_is_grpo_s_clipped_group_relative_objective(tmp_path, beta, form, scale, level, truncated, delta,
                                                            rho, coef):
    """On fixed samples and rewards, two steps on one batch of samples (task.num_iterations = 2): the loss's
    value and gradient are those of the formula, on the first step (the ratio is 1: -A log p's gradient) and on
    the second, after the weights moved, where the clip cuts off some tokens and not others. The advantages
    are scaled per group, over the step's rewards or not at all; completions that did not end can be left out;
    the units returned for the loop are the completions, 1 per micro-batch (bnpo) or the tokens (dapo). Also
    with INTELLECT-2's cap on the ratio (task.grpo_delta), the policy term on the highest-entropy tokens only
    (task.top_entropy_quantile) and an entropy bonus (task.entropy_coef)."""
    config, settings = grpo_setup(tmp_path, extra=[f"task.grpo_beta={beta}", "task.num_generations=3",
                                                   f"task.grpo_loss={form}", f"task.scale_rewards={scale}",
                                                   f"task.importance_sampling_level={level}",
                                                   f"task.mask_truncated_completions={str(truncated).lower()}",
                                                   "task.num_iterations=2", "task.grpo_epsilon=0.02",
                                                   "task.grpo_epsilon_high=0.04", "task.max_new_tokens=6",
                                                   f"task.top_entropy_quantile={rho}", f"task.entropy_coef={coef}",
                                                   *([f"task.grpo_delta={delta}"] if delta else []),
                                                   *([f"task.sapo_temperature_pos={SAPO_TAU[0]}",
                                                      f"task.sapo_temperature_neg={SAPO_TAU[1]}"]
                                                     if form == "sapo" else [])])
    prep = prepare(load_config(config, settings))
    lorafit.attach(prep.model, lorafit.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(0)
    bs = [p for name, p in prep.model.named_parameters() if "lora_B" in name]
    with torch.no_grad():
        for p in bs:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    task = prep.task
    batch = task.collate(task.encode([{"instruction": "repeat", "input": "a great movie", "output": "x"},
                                      {"instruction": "repeat", "input": "the plot", "output": "y"}], "train").features)
    torch.manual_seed(1)
    seqs, mask, completions = task.sample(prep.model, batch, 3)
    eos = task.tok.eos_token_id
    seqs[1, batch["input_ids"].shape[1] + 1] = eos  # one completion surely ends early, one surely does not
    seqs[2, batch["input_ids"].shape[1]:] = 1 if eos == 0 else 0
    ends = seqs[:, batch["input_ids"].shape[1]:] == eos
    mask = ((ends.cumsum(1) - ends.long()) == 0).float()
    rewards = torch.tensor([0.0, 1.0, 0.5, 2.0, 2.0, -1.0])
    task.sample = lambda model, b, n: (seqs, mask, completions)
    task._scores = lambda b, c, n, ids, call: rewards[:, None]
    units = task.prepare_window(prep.model, [(batch, True)])

    loss_mask = mask * ends.any(1, keepdim=True) if truncated else mask
    assert torch.equal(batch["completion_mask"], loss_mask) and loss_mask[2].sum() == (0 if truncated else 6)
    assert units == {"grpo": None, "dr_grpo": None, "bnpo": [1], "dapo": [int(loss_mask.sum())], "sapo": None,
                     "cispo": [int(loss_mask.sum())], "luspo": None}[form]
    groups = rewards.view(2, 3)
    advantages = groups - groups.mean(1, keepdim=True)
    std = {"true": groups.std(1, keepdim=True), "'group'": groups.std(1, keepdim=True), "false": None,
           "'none'": None, "'batch'": rewards.std()}[scale]
    advantages = (advantages if std is None else advantages / (std + 1e-4)).flatten()
    torch.testing.assert_close(batch["advantages"], advantages)

    prompt_mask = batch["attention_mask"].repeat_interleave(3, dim=0)
    with torch.no_grad():
        old = task.completion_logps(prep.model, seqs, prompt_mask, mask.shape[1])
        with lorafit.disabled(prep.model):
            ref = task.completion_logps(prep.model, seqs, prompt_mask, mask.shape[1])
    params = [p for p in prep.model.parameters() if p.requires_grad]
    kl_sum = entropy_sum = 0.0
    for step in range(2):
        if step == 1:  # an optimizer step's worth of change; the samples and old log-probabilities stay
            with torch.no_grad():
                for p in bs:
                    p.add_(torch.randn(p.shape, generator=g) * 0.01)
        loss = task.loss_sum(prep.model, batch)
        got = torch.autograd.grad(loss, params)
        logp, entropy = task.completion_logps(prep.model, seqs, prompt_mask, mask.shape[1], entropy=True,
                                              entropy_grad=True)
        want_loss = expected_loss(logp, old if step else logp.detach(), ref, loss_mask, advantages, beta, form, level,
                                  0.98, 1.04, 6, delta, rho, entropy, coef)
        want = torch.autograd.grad(want_loss, params)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(loss.detach(), want_loss.detach(), atol=1e-5, rtol=1e-5)
        kl_sum += float(((torch.exp(ref - logp) - (ref - logp) - 1) * loss_mask).sum().detach())
        entropy_sum += float((entropy * loss_mask).sum().detach())
    log = task.train_log()
    assert log["entropy"] == pytest.approx((entropy_sum, 2 * float(loss_mask.sum())), rel=1e-5)
    if form == "sapo":  # no clip
        assert "clip_ratio" not in log
    else:
        clip = log["clip_ratio"]
        assert 0 < clip[0] < clip[1], clip  # the second step clipped (cispo: capped) some of its tokens, not all
    assert log["reward_std"] == pytest.approx((float(groups.std(1).sum()), 2)) and log["flat_groups"] == (0.0, 2)
    if beta:
        assert log["kl"] == pytest.approx((kl_sum, 2 * float(loss_mask.sum())), rel=1e-5)
    else:
        assert "kl" not in log
    ratio = (logp - old).exp()
    assert ((ratio - 1).abs() > 0.04)[loss_mask > 0].any() and ((ratio - 1).abs() < 0.02)[loss_mask > 0].any()
    if delta:  # the cap acted: a negative advantage's ratio went past it
        if level == "sequence":
            log_ratio = ((logp - old) * loss_mask).sum(1, keepdim=True) / loss_mask.sum(1, keepdim=True).clamp(min=1)
            ratio = log_ratio.exp()
        assert ((ratio > delta) & (advantages[:, None] < 0)).expand_as(loss_mask)[loss_mask > 0].any()


@pytest.mark.parametrize("extra", [["train.save_every=3", "task.grpo_beta=0.1", "task.log_completions=true"],
                                   ["train.save_every=4", "task.num_iterations=2", "task.grpo_loss=dapo",
                                    "task.scale_rewards='batch'", "train.grad_accum=2", "train.batch_size=2",
                                    "train.epochs=2"]])
def test_a_resumed_grpo_run_samples_what_an_uninterrupted_one_does(tmp_path, extra):
    """Also with two steps on each batch of samples: checkpoints fall between batches, so a resumed run samples
    anew where the uninterrupted one did; completions.jsonl loses the lines of the steps taken again."""
    config, settings = grpo_setup(tmp_path, extra=extra)
    train(config, settings + [f"output_dir={json.dumps(str(tmp_path / 'a'))}"], progress=False)
    args = settings + [f"output_dir={json.dumps(str(tmp_path / 'b'))}"]
    with pytest.raises(Crash):
        train(config, args, callbacks=(crash_at(7),), progress=False)  # the last checkpoint: step 6 or 4
    train(config, args, resume=True, progress=False)
    assert_same_tensors(adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b"))
    if "task.log_completions=true" in extra:
        lines = [(tmp_path / run / "completions.jsonl").read_text().splitlines() for run in ("a", "b")]
        assert len(lines[0]) == 32 * 16 + 4 * 8 and lines[0] == lines[1]  # 32 steps' 16 and 4 evaluations' 8
    else:
        assert not (tmp_path / "a" / "completions.jsonl").exists()


def test_a_classification_run_s_probability_is_the_reward_and_references_reach_functions(tmp_path):
    """A lorafit classifier as the judge (the probability of its class "1"): the scorer gives the judge's own
    probabilities; a GRPO run rewarded by it trains and evaluates; a function sees each row's reference."""
    judge_dir = tmp_path / "judge"
    judge_dir.mkdir()
    train(classification_setup(judge_dir), ["train.epochs=4"], progress=False)
    texts = ["a great movie", "an awful plot", "the film"]
    scorer = run_scorer(str(judge_dir / "run"), "1")
    judge = load_run(judge_dir / "run", None, None)
    with torch.no_grad():
        enc = judge.tokenizer(texts, padding=True, return_tensors="pt")
        want = judge.model(**enc).logits.softmax(-1)[:, 1]
    torch.testing.assert_close(torch.tensor(scorer([[]] * 3, texts, [None] * 3)), want, atol=1e-6, rtol=0)

    policy_dir = tmp_path / "policy"
    policy_dir.mkdir()
    config, settings = grpo_setup(policy_dir, reward="echo")
    summary = train(config, settings[:1] + [f"task.reward_model='{judge_dir / 'run'}'", "task.reward_label='1'",
                                            f"task.reward_function='{policy_dir / 'rewards.py'}:echo'",
                                            "task.max_new_tokens=8", "train.epochs=1"], progress=False)
    validation = summary["validation"]
    assert 0 < validation["reward/model"] < 1 and 0 <= validation["reward/echo"] <= 1  # a probability; 0 or 1
    assert validation["reward"] == pytest.approx(validation["reward/model"] + validation["reward/echo"])
    logged = [json.loads(line) for line in (policy_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    for r in (r for r in logged if r["type"] == "train"):
        assert 0 < r["reward/model"] < 1 and r["reward"] == pytest.approx(r["reward/model"] + r["reward/echo"])


@pytest.mark.parametrize("encoder", [False, True])
def test_a_reward_run_scores_the_conversation_as_its_training_encoded_it(tmp_path, encoder):
    """A decoder's chat-template conversation, or an encoder's text pair (the response alone without a prompt):
    the scores the reward run gives the pairs' rows."""
    from tests.test_train_reward import reward_setup

    train(reward_setup(tmp_path, encoder=encoder), ["train.epochs=1"], progress=False)
    run = load_run(tmp_path / "run", None, None)
    scorer = run_scorer(str(tmp_path / "run"), None)
    for text in ("say something", ""):
        prompt = [{"role": "user", "content": text}] if text else []
        row = {"prompt": text, "chosen": "a great film", "rejected": "a dull film"}
        feature = run.task.encode([row], "train").features[0]
        with torch.no_grad():
            chosen, rejected = run.task.scores(run.model, run.task.collate([feature]))
        got = scorer([prompt, prompt], ["a great film", "a dull film"], [None, None])
        torch.testing.assert_close(torch.tensor(got), torch.cat([chosen, rejected]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("encoder", [False, True])
def test_a_pretrained_reward_model_scores_the_conversation_and_a_classifier_a_class(tmp_path, encoder):
    """A transformers sequence-classification model that is not a lorafit run: with one output, a decoder's score
    of the conversation its chat template renders and an encoder's of the (prompt, completion) text pair, each
    as the model scores it alone; with classes, the probability of task.reward_label for the completion's text.
    A GRPO run trains against it."""
    from lorafit.chat import render
    from lorafit.train.rewards import pretrained_scorer
    from tests.test_train_support import instruction_rows, tiny_bert_dir, tiny_llama_dir

    rows = instruction_rows(16)
    base = tiny_bert_dir(tmp_path, [{"text": f"{r['instruction']} {r['input']} {r['output']}"} for r in rows]) \
        if encoder else tiny_llama_dir(tmp_path, rows)
    tok = transformers.AutoTokenizer.from_pretrained(base)
    torch.manual_seed(0)
    for labels, name in ((1, "rm"), (2, "judge")):
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=labels, id2label={0: "no", 1: "yes"} if labels == 2 else {0: "score"},
            label2id={"no": 0, "yes": 1} if labels == 2 else {"score": 0}, pad_token_id=tok.pad_token_id)
        torch.nn.init.normal_(model.score.weight if hasattr(model, "score") else model.classifier.weight, std=1.0)
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    prompts = [[{"role": "user", "content": "repeat a great movie"}], [{"role": "user", "content": "say hi"}],
               [{"role": "system", "content": "be brief"}, {"role": "user", "content": "repeat the plot"}]]
    completions = ["a great movie with a great cast", "hi", "the"]
    scorer = pretrained_scorer(str(tmp_path / "rm"), None, "cpu", 48)
    got = scorer(prompts, completions, [None] * 3)
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        for p, c, g in zip(prompts, completions, got):
            if encoder:  # BERT's tokenizer has a separator and no template: a text pair
                enc = tok("\n".join(m["content"] for m in p), c, return_tensors="pt")
            else:
                enc = tok(render(tok, [*p, {"role": "assistant", "content": c}]), add_special_tokens=False,
                          return_tensors="pt")
            assert g == pytest.approx(float(rm(**enc).logits[0, 0]), abs=1e-5)
    assert len(set(got)) == 3  # the scores tell the completions apart

    judge = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "judge").eval()
    with torch.no_grad():
        want = judge(**tok(completions, padding=True, return_tensors="pt")).logits.softmax(-1)[:, 1]
    got = pretrained_scorer(str(tmp_path / "judge"), "yes", "cpu", 48)(prompts, completions, [None] * 3)
    torch.testing.assert_close(torch.tensor(got), want, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"task.reward_label must name the class of .*judge.* got None, its "
                                         r"classes: 'no', 'yes'"):
        pretrained_scorer(str(tmp_path / "judge"), None, "cpu", 48)
    with pytest.raises(ValueError, match=r"task.reward_label is for a classifier; .*rm has one output"):
        pretrained_scorer(str(tmp_path / "rm"), "yes", "cpu", 48)
    with pytest.raises(ValueError, match=r"tiny-.* is neither a lorafit run \(no config.toml\) nor a trained "
                                         r"sequence-classification model: it has no .*(classifier|score).weight"):
        pretrained_scorer(str(base), None, "cpu", 48)  # a base model: its head would be random
    if encoder:
        return
    policy = tmp_path / "policy"
    policy.mkdir()
    config, settings = grpo_setup(policy, extra=["train.epochs=1"])
    summary = train(config, [settings[0], f"task.reward_model='{tmp_path / 'rm'}'", *settings[2:]], progress=False)
    assert math.isfinite(summary["validation"]["reward"])


GRPO = ["task.type=grpo", "task.reward_function='x.py:f'", "task.max_new_tokens=8"]


@pytest.mark.parametrize("settings, message", [
    (["task.type=grpo"], "task.reward_model .* or task.reward_function .* is required for task.type = 'grpo'"),
    ([*GRPO, "task.reward_label='1'"],
     "task.reward_label names a class of task.reward_model's classifier"),
    ([*GRPO, "task.num_generations=1"], "task.num_generations must be >= 2"),
    ([*GRPO, "train.method=full", "task.grpo_beta=0.1"],
     "full fine-tuning leaves none of; set task.grpo_beta = 0"),
    ([*GRPO, "train.distributed=fsdp"], "'fsdp' is not supported"),
    ([*GRPO, "task.max_new_tokens=48"], "must leave room for a prompt"),
    (["task.num_generations=3"], "task.num_generations is for task.type = 'grpo'"),
    ([*GRPO, "task.grpo_loss=ppo"],
     "task.grpo_loss must be one of 'grpo', 'dr_grpo', 'bnpo', 'dapo', 'cispo', 'sapo', 'luspo', got 'ppo'"),
    ([*GRPO, "task.scale_rewards='std'"], "task.scale_rewards must be true, false or one of 'group', 'batch', 'none'"),
    ([*GRPO, "task.scale_rewards=1"], "task.scale_rewards must be true or false or a string, got 1"),
    ([*GRPO, "task.reward_weights=[1, 2]"], r"task.reward_weights must have one weight per reward \(1: "),
    ([*GRPO, "task.reward_function=['x.py:f', '']"], "task.reward_function must name a function"),
    ([*GRPO, "task.num_iterations=0"], "task.num_iterations must be >= 1"),
    ([*GRPO, "task.top_p=0"], "task.top_p must be > 0 and <= 1"),
    ([*GRPO, "task.top_k=-1"], r"task.top_k must be >= 0 \(0: off\)"),
    ([*GRPO, "task.grpo_epsilon_high=-0.1"], "task.grpo_epsilon_high must be a finite number > 0"),
    ([*GRPO, "task.importance_sampling_level=seq"], "task.importance_sampling_level must be one of 'token', "),
    ([*GRPO, "task.num_iterations=2", "train.save_every=3"],
     r"train.save_every \(3\) must be a multiple of task.num_iterations \(2\)"),
    (["task.num_iterations=2"], "task.num_iterations is for task.type = 'grpo'"),
    ([*GRPO, "task.generation_batch_size=2"],
     r"task.generation_batch_size must be 0 \(a step's completions in one generation\) or at least "
     r"task.num_generations \(4\)"),
    (["task.generation_batch_size=8"], "task.generation_batch_size is for task.type = 'grpo'"),
    ([*GRPO, "task.grpo_epsilon_high=0.28", "task.grpo_delta=1.2"],
     r"task.grpo_delta must be a finite number above the clip's upper end 1 \+ task.grpo_epsilon_high \(1.28\); "
     "got 1.2"),
    ([*GRPO, "task.top_entropy_quantile=1.5"], r"task.top_entropy_quantile must be between 0 \(only the highest"),
    (["task.top_entropy_quantile=0.2"], "task.top_entropy_quantile is for task.type = 'grpo'"),
    (["task.log_completions=true"], "task.log_completions is for task.type = 'grpo'"),
    ([*GRPO, "task.entropy_coef=inf"], "task.entropy_coef must be a finite number"),
    ([*GRPO, "task.min_p=1"], r"task.min_p must be >= 0 and < 1 \(0: off\)"),
    ([*GRPO, "task.repetition_penalty=0"], r"task.repetition_penalty must be a finite number > 0 \(1: off\)"),
    ([*GRPO, "task.sapo_temperature_neg=2"], "task.sapo_temperature_neg is for task.grpo_loss = 'sapo'; "
                                             "task.grpo_loss is 'grpo'"),
    ([*GRPO, "task.grpo_loss=sapo", "task.sapo_temperature_pos=0"], "task.sapo_temperature_pos must be a finite"),
    ([*GRPO, "task.grpo_loss=cispo", "task.grpo_delta=2"], "task.grpo_delta caps the ratio of the clipped "
                                                           "objective; task.grpo_loss = 'cispo' has no clip"),
])
def test_what_grpo_cannot_use_is_refused_naming_the_setting(tmp_path, settings, message):
    config = instruction_setup(tmp_path, 8, lora=LORA, train=TRAIN)
    with pytest.raises(ValueError, match=message):
        train(config, settings, progress=False)
    assert not (tmp_path / "run").exists()


def test_a_reward_function_that_misbehaves_is_named(tmp_path):
    config, settings = grpo_setup(tmp_path, reward="short")
    with pytest.raises(ValueError, match=r"task.reward_function .*rewards.py:short: returned 1 rewards for 16"):
        train(config, settings, progress=False)
    config, settings = grpo_setup(tmp_path, reward="missing")
    with pytest.raises(ValueError, match=r"task.reward_function: .*rewards.py has no function 'missing'"):
        train(config, settings, overwrite=True, progress=False)


def test_the_example_reward_checks_the_first_word_against_the_label():
    from examples.rewards import sentiment_label

    logged = []
    got = sentiment_label(["p"] * 5, ["Positive.", "negative, surely", "The review is positive", "", "positive"],
                          [1, "0", "1", "1", "0"], log_metric=lambda name, value: logged.append((name, value)))
    assert got == [1.0, 1.0, 0.0, 0.0, 0.0] and logged == [("label_answers", 0.6)]
