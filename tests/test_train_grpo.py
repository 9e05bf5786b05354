"""task.type = "grpo": online RL from a reward function or a lorafit run's model, on a tiny Llama."""

from __future__ import annotations

import json
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


@pytest.mark.parametrize("beta, form, scale", [(0.0, "grpo", True), (0.2, "grpo", True), (0.2, "dr_grpo", False)])
def test_the_loss_is_grpo_s_group_relative_objective(tmp_path, beta, form, scale):
    """On fixed samples and rewards: the loss's gradient is that of -A_i mean_t log p_it (plus beta times the
    k3 KL estimate against the base model), and its value that of -A_i mean_t 1 + beta KL (with the paper's
    mean over tokens the advantages' part is 0: a group's sum to 0); Dr. GRPO's form divides token sums by
    max_new_tokens and leaves the advantages unscaled."""
    config, settings = grpo_setup(tmp_path, extra=[f"task.grpo_beta={beta}", "task.num_generations=3",
                                                   f"task.grpo_loss={form}",
                                                   f"task.scale_rewards={str(scale).lower()}"])
    prep = prepare(load_config(config, settings))
    lorafit.attach(prep.model, lorafit.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in prep.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    task = prep.task
    batch = task.collate(task.encode([{"instruction": "repeat", "input": "a great movie", "output": "x"},
                                      {"instruction": "repeat", "input": "the plot", "output": "y"}], "train").features)
    torch.manual_seed(1)
    seqs, mask, completions = task.sample(prep.model, batch, 3)
    rewards = torch.tensor([0.0, 1.0, 0.5, 2.0, 2.0, -1.0])
    task.sample = lambda model, b, n: (seqs, mask, completions)
    task._rewards = lambda b, c, n: rewards
    params = [p for p in prep.model.parameters() if p.requires_grad]
    loss = task.loss_sum(prep.model, batch)
    got = torch.autograd.grad(loss, params)

    groups = rewards.view(2, 3)
    advantages = groups - groups.mean(1, keepdim=True)
    advantages = (advantages / (groups.std(1, keepdim=True) + 1e-4) if scale else advantages).flatten()
    length = mask.sum(1) if form == "grpo" else 8  # task.max_new_tokens
    prompt_mask = batch["attention_mask"].repeat_interleave(3, dim=0)
    logp = task.completion_logps(prep.model, seqs, prompt_mask, mask.shape[1])
    with torch.no_grad(), lorafit.disabled(prep.model):
        ref = task.completion_logps(prep.model, seqs, prompt_mask, mask.shape[1])
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    per_seq = ((-advantages[:, None] * logp + beta * kl) * mask).sum(1) / length
    want = torch.autograd.grad(per_seq.sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    expected_value = (((-advantages[:, None] + beta * kl) * mask).sum(1) / length).sum()  # the ratio's value is 1
    torch.testing.assert_close(loss.detach(), expected_value.detach(), atol=1e-5, rtol=1e-5)
    assert mask.sum() < mask.numel() or all(len(c.split()) for c in completions)  # masks end at the eos


def test_a_resumed_grpo_run_samples_what_an_uninterrupted_one_does(tmp_path):
    config, settings = grpo_setup(tmp_path, extra=["train.save_every=3", "task.grpo_beta=0.1"])
    train(config, settings + [f"output_dir={json.dumps(str(tmp_path / 'a'))}"], progress=False)
    args = settings + [f"output_dir={json.dumps(str(tmp_path / 'b'))}"]
    with pytest.raises(Crash):
        train(config, args, callbacks=(crash_at(8),), progress=False)  # the last checkpoint: step 6
    train(config, args, resume=True, progress=False)
    assert_same_tensors(adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b"))


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
    assert 0 <= summary["validation"]["reward"] <= 2


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
    ([*GRPO, "task.grpo_loss=dapo"], "task.grpo_loss must be one of 'grpo', 'dr_grpo', got 'dapo'"),
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

    got = sentiment_label(["p"] * 5, ["Positive.", "negative, surely", "The review is positive", "", "positive"],
                          [1, "0", "1", "1", "0"])
    assert got == [1.0, 1.0, 0.0, 0.0, 0.0]
