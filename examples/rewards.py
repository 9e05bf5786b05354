"""Reward functions for task.type = "grpo" (task.reward_function = "examples/rewards.py:NAME").

lorafit calls one as ``NAME(prompts, completions, references)``: lists of the prompts' texts, the sampled
completions' texts and each row's reference (data.output_field, or None), one reward per completion back.
A function that names more parameters after those three gets the rows' columns of those names, a list each
(``**kwargs``: every column).
"""

from __future__ import annotations

SST2_LABELS = {"0": "negative", "1": "positive"}


def sentiment_label(prompts: list[str], completions: list[str], references: list) -> list[float]:
    """1 where the completion's first word is the row's SST-2 label as a word ("positive" for 1, "negative" for
    0), else 0: a reward that checks the answer, as math rewards check a final number."""
    rewards = []
    for completion, reference in zip(completions, references):
        words = completion.strip().lower().split()
        first = words[0].strip(".,!:;\"'") if words else ""
        rewards.append(float(first == SST2_LABELS.get(str(reference), str(reference).lower())))
    return rewards
