"""Reward functions for task.type = "grpo" (task.reward_function = "examples/rewards.py:NAME").

lorafit calls one as ``NAME(prompts, completions, references)``: lists of the prompts' texts, the sampled
completions' texts and each row's reference (data.output_field, or None), one reward per completion back.
A function that names more parameters after those three gets the rows' columns of those names, a list each
(``**kwargs``: every column), and TRL's ``log_metric`` (a number averaged into metrics.jsonl and the
evaluation's results under its name) when it names that.
"""

from __future__ import annotations

SST2_LABELS = {"0": "negative", "1": "positive"}


def sentiment_label(prompts: list[str], completions: list[str], references: list,
                    log_metric=None) -> list[float]:
    """1 where the completion's first word is the row's SST-2 label as a word ("positive" for 1, "negative" for
    0), else 0: a reward that checks the answer, as math rewards check a final number. Logs ``label_answers``,
    the share of completions whose first word is either label: the format learnt, apart from the judgement."""
    rewards, firsts = [], []
    for completion, reference in zip(completions, references):
        words = completion.strip().lower().split()
        firsts.append(words[0].strip(".,!:;\"'") if words else "")
        rewards.append(float(firsts[-1] == SST2_LABELS.get(str(reference), str(reference).lower())))
    if log_metric is not None:
        log_metric("label_answers", sum(first in SST2_LABELS.values() for first in firsts) / max(len(firsts), 1))
    return rewards
