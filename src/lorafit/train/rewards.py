"""What scores a completion for ``task.type = "grpo"``: a lorafit run's model (``task.reward_model``) and/or
Python functions (``task.reward_function``, one or a list); with several, their sum, or their weighted sum
(``task.reward_weights``).

- A **reward run** (``task.type = "reward"``) scores the conversation, the prompt and the completion as the
  assistant's turn, rendered as its training rendered them (lorafit.chat: the chat template, or an encoder's
  text pair), cut at its ``task.max_length``.
- A **classification run** gives the probability of one of its classes (``task.reward_label``) for the
  completion's text alone (a sentiment or toxicity judge).
- A **function** ``"path/to/file.py:name"`` (or ``"package.module:name"``) is called as ``name(prompts,
  completions, references)`` with lists of the prompts' texts (their messages' contents, a line each), the
  completions' texts and each row's reference (``data.output_field``, or None) and returns one number per
  completion. The rows' other columns come as keyword arguments, a list each, when the function names them as
  parameters after those three (all of them when it takes ``**kwargs``, as TRL's reward functions do). A
  function with a parameter named ``completions`` gets those three by name instead, each only where it names
  it or takes ``**kwargs``, as TRL calls them: ``def reward(completions, answer, **kwargs)`` works as written.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
from collections.abc import Callable
from pathlib import Path

import torch

from lorafit.chat import text_pair
from lorafit.train.config import TaskSection

SCORE_BATCH = 32  # completions per forward of a reward or classification run's model

# (prompts' messages, completions, references, the rows' columns or None) -> a reward per completion
Scorer = Callable[..., list[float]]


def build_rewards(t: TaskSection) -> list[tuple[str, Scorer]]:
    """The rewards task section ``t`` names, each with the name its mean is logged under: "model" for the run,
    a function's own name (the config has checked that there is at least one)."""
    named: list[tuple[str, Scorer]] = []
    if t.reward_model:
        named.append(("model", run_scorer(t.reward_model, t.reward_label)))
    for spec in t.reward_functions():
        named.append((spec.rpartition(":")[2], function_scorer(spec)))
    names = [name for name, _ in named]
    # two functions of one name (from two files) are told apart by their place
    return [(name if names.count(name) == 1 else f"{name}_{i}", scorer) for i, (name, scorer) in enumerate(named)]


def run_scorer(run_dir: str, label: str | None) -> Scorer:
    from lorafit.train.run import load_run  # run.py builds tasks, which build scorers

    run = load_run(run_dir, None, None)
    run.model.eval()
    kind, tok = run.config.task.type, run.tokenizer
    if kind == "reward":
        if label is not None:
            raise ValueError(f"task.reward_label is for a classification run's model; {run_dir} is a reward run, "
                             "whose score is the reward")

        def score(prompts, completions, references, rows=None):
            conversations = [(p, [{"role": "assistant", "content": c}]) for p, c in zip(prompts, completions)]
            return run.task.score_conversations(run.model, conversations, run.device, SCORE_BATCH)

        return score
    if kind == "classification":
        classes = [str(run.model.config.id2label[i]) for i in range(run.model.config.num_labels)]
        if label not in classes:
            raise ValueError(f"task.reward_label must name the class of {run_dir} whose probability is the reward; "
                             f"got {label!r}, its classes: {', '.join(map(repr, classes))}")
        index = classes.index(label)

        @torch.no_grad()
        def score(prompts, completions, references, rows=None):
            out: list[float] = []
            for start in range(0, len(completions), SCORE_BATCH):
                enc = tok(completions[start:start + SCORE_BATCH], padding=True, truncation=True,
                          max_length=run.config.task.max_length, return_tensors="pt")
                out += run.model(**enc.to(run.device)).logits.float().softmax(-1)[:, index].tolist()
            return out

        return score
    raise ValueError(f"task.reward_model: {run_dir} is a {kind!r} run; a reward run or a classification run scores "
                     "completions")


def function_scorer(spec: str) -> Scorer:
    """The function ``spec`` names: ``"file.py:name"`` (a path, relative to the working directory) or
    ``"module:name"``."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ValueError(f"task.reward_function must be 'path/to/file.py:function' or 'module:function', got {spec!r}")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise FileNotFoundError(f"task.reward_function: {where} does not exist")
        loaded = importlib.util.spec_from_file_location(f"lorafit_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"task.reward_function: {where} has no function {name!r}")

    by_name, named, required, every = _parameters(fn)

    def score(prompts, completions, references, rows=None):
        texts = [text_pair(p, [])[0] for p in prompts]
        columns = {}
        if rows and (named or every):
            present = {k for row in rows for k in row}
            missing = [k for k in required if k not in present]
            if missing:
                raise ValueError(f"task.reward_function {spec}: asks for the column {missing[0]!r}, which the rows do "
                                 f"not have (their columns: {', '.join(sorted(present))})")
            keys = (present if every else present & set(named)) - set(_POSITIONAL)
            columns = {k: [row.get(k) for row in rows] for k in sorted(keys)}
        given = {"prompts": texts, "completions": list(completions), "references": list(references)}
        if by_name:
            values = fn(**{k: v for k, v in given.items() if every or k in by_name}, **columns)
        else:
            values = fn(*given.values(), **columns)
        values = list(values)
        if len(values) != len(completions):
            raise ValueError(f"task.reward_function {spec}: returned {len(values)} rewards for {len(completions)} "
                             "completions")
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)]
        if bad:
            raise ValueError(f"task.reward_function {spec}: returned {bad[0]!r}; a reward is a finite number")
        return [float(v) for v in values]

    return score


_POSITIONAL = ("prompts", "completions", "references")


def _parameters(fn) -> tuple[set[str], list[str], list[str], bool]:
    """How ``fn`` is called: the names of the three lists it takes by name (empty: the first three parameters, by
    position; by name where one parameter is called ``completions``), the row columns it takes as keywords (its
    other parameters), those of them without a default, and whether it takes ``**kwargs`` (then every column)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: the three lists only
        return set(), [], [], False
    every = any(p.kind is p.VAR_KEYWORD for p in params)
    keywords = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    by_name = {p.name for p in keywords if p.name in _POSITIONAL} if "completions" in {p.name for p in keywords} \
        else set()
    named = [p for p in keywords if p.name not in _POSITIONAL] if by_name else keywords[3:]
    return by_name, [p.name for p in named], [p.name for p in named if p.default is p.empty], every
