"""What scores a completion for ``task.type = "grpo"``: a lorafit run's model (``task.reward_model``) and/or
Python functions (``task.reward_function``, one or a list); with several, their sum, or their weighted sum
(``task.reward_weights``).

- A **reward run** (``task.type = "reward"``) scores the conversation, the prompt and the completion as the
  assistant's turn, rendered as its training rendered them (lorafit.chat: the chat template, or an encoder's
  text pair), cut at its ``task.max_length``.
- A **classification run** gives the probability of one of its classes (``task.reward_label``) for the
  completion's text alone (a sentiment or toxicity judge).
- A **transformers sequence-classification model** that is not a lorafit run (a directory, a hub name in the
  local cache, or a built-in name): with one output (a reward model, TRL's or OpenAssistant's), its score of the
  conversation, rendered with its tokenizer's chat template (the completion as the assistant's turn), or as the
  text pair (prompt, completion) for an encoder without a template, as lorafit.chat renders any scored
  conversation; with classes, the probability of ``task.reward_label`` for the completion's text.
- A **function** ``"path/to/file.py:name"`` (or ``"package.module:name"``) is called as ``name(prompts,
  completions, references)`` with lists of the prompts' texts (their messages' contents, a line each), the
  completions' texts and each row's reference (``data.output_field``, or None) and returns one number per
  completion, or None for a completion it does not judge (a reward for some kinds of prompt only): a completion's
  reward is then the (weighted) sum of the rewards that judged it, and each reward's logged mean is over the
  completions it judged. The rows' other columns come as keyword arguments, a list each, when the function names
  them as parameters after those three (all of them when it takes ``**kwargs``), and ``completion_ids`` (each
  completion's token ids, through its end token) when it names that.
- A function with a parameter named ``completions`` is called as TRL calls its reward functions: the lists by
  name, each only where it names it or takes ``**kwargs`` (``def reward(completions, answer, **kwargs)`` works as
  written), and for chat data (``data.messages_field``) in TRL's conversational form: a prompt as its list of
  messages, a completion as ``[{"role": "assistant", "content": text}]``.
- Either kind of function also gets, where it names them (or, called by name, takes ``**kwargs``), TRL's
  ``trainer_state`` (a ``transformers.TrainerState``: ``global_step``, the optimizer steps done, ``max_steps``,
  ``epoch``, for a reward that changes as training goes on), ``log_metric(name, value)`` (a number averaged into
  the run's log under ``name``: metrics.jsonl, the progress bar, the evaluation's results) and
  ``log_extra(column, values)`` (one value per completion, a column of ``completions.jsonl`` with
  ``task.log_completions``).
- A function may be ``async`` (or return an awaitable): the async functions of a round run concurrently, on one
  event loop that lasts the run (a client a function keeps stays bound to it), in a thread of its own, so that
  they also run where the caller already runs an event loop (a notebook).
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import math
import numbers
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorafit.chat import reads_text_pairs, render, text_pair
from lorafit.train.config import CONFIG_FILE, TaskSection

SCORE_BATCH = 32  # completions per forward of a reward or classification run's model

# (prompts' messages, completions' texts, references, the rows or None, the completions' token ids or None,
#  the RewardCall or None) -> a reward per completion, NaN where a function returned None; an async function's
#  scorer returns an awaitable of that list (score_all awaits it)
Scorer = Callable[..., Any]


@dataclass
class RewardCall:
    """What the rewards of one round of completions share besides them: the training's position (TRL's
    ``trainer_state``) and what functions log through ``log_metric`` and ``log_extra``."""

    trainer_state: Any = None
    metrics: dict[str, list[float]] = field(default_factory=dict)  # name -> [sum, count]
    extra: dict[str, list] = field(default_factory=dict)  # column -> one value per completion
    reserved: frozenset[str] = frozenset()  # the run's own metric names, which log_metric may not take


def score_all(rewards: list[tuple[str, Scorer]], prompts: list, completions: list[str], references: list,
              rows: list | None, completion_ids: list | None, call: RewardCall | None = None) -> list[list[float]]:
    """Each reward's scores of the completions; the async functions' calls run concurrently."""
    results = [score(prompts, completions, references, rows, completion_ids, call) for _, score in rewards]
    waiting = [i for i, result in enumerate(results) if inspect.isawaitable(result)]
    if waiting:
        async def together():
            return await asyncio.gather(*(results[i] for i in waiting))

        for i, result in zip(waiting, asyncio.run_coroutine_threadsafe(together(), _event_loop()).result()):
            results[i] = result
    return results


_LOOP: tuple[int, asyncio.AbstractEventLoop] | None = None  # (the process that started it, the loop)


def _event_loop() -> asyncio.AbstractEventLoop:
    """The event loop async reward functions run on, in a daemon thread, started at the first need."""
    global _LOOP
    if _LOOP is None or _LOOP[0] != os.getpid():  # a forked process inherits the loop but not its thread
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, name="lorafit-rewards", daemon=True).start()
        _LOOP = (os.getpid(), loop)
    return _LOOP[1]


def build_rewards(t: TaskSection, conversational: bool = False, device: str = "auto") -> list[tuple[str, Scorer]]:
    """The rewards task section ``t`` names, each with the name its mean is logged under: "model" for the run,
    a function's own name (the config has checked that there is at least one); ``conversational``: the rows
    are chat messages (what TRL-style functions get, see ``function_scorer``); ``device``: model.device, where a
    pretrained model scores (a run's own config says where it runs)."""
    named: list[tuple[str, Scorer]] = []
    if t.reward_model:
        is_run = (Path(t.reward_model) / CONFIG_FILE).is_file()
        named.append(("model", run_scorer(t.reward_model, t.reward_label) if is_run else
                      pretrained_scorer(t.reward_model, t.reward_label, device, t.max_length)))
    for spec in t.reward_functions():
        named.append((spec.rpartition(":")[2], function_scorer(spec, conversational)))
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

        def score(prompts, completions, references, rows=None, completion_ids=None, call=None):
            conversations = [(p, [{"role": "assistant", "content": c}]) for p, c in zip(prompts, completions)]
            return run.task.score_conversations(run.model, conversations, run.device, SCORE_BATCH)

        return score
    if kind == "classification":
        return _class_probability(run.model, tok, run.device, label, run.config.task.max_length, run_dir)
    raise ValueError(f"task.reward_model: {run_dir} is a {kind!r} run; a reward run or a classification run scores "
                     "completions")


def _class_probability(model, tok, device, label: str | None, max_length: int, name: str) -> Scorer:
    """The classifier's probability of class ``label`` for each completion's text."""
    classes = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
    if label not in classes:
        raise ValueError(f"task.reward_label must name the class of {name} whose probability is the reward; "
                         f"got {label!r}, its classes: {', '.join(map(repr, classes))}")
    index = classes.index(label)

    @torch.no_grad()
    def score(prompts, completions, references, rows=None, completion_ids=None, call=None):
        out: list[float] = []
        for start in range(0, len(completions), SCORE_BATCH):
            enc = tok(completions[start:start + SCORE_BATCH], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
            out += model(**enc.to(device)).logits.float().softmax(-1)[:, index].tolist()
        return out

    return score


def pretrained_scorer(name: str, label: str | None, device_name: str, max_length: int) -> Scorer:
    """A transformers sequence-classification model that is not a lorafit run, in its saved dtype, on
    ``device_name`` (model.device); ``max_length``: task.max_length, where the model has no position limit."""
    from lorafit.train.models import _transformers, load_tokenizer, position_limit, resolve_model
    from lorafit.train.run import select_device  # run.py builds tasks, which build scorers

    source = resolve_model(name, "task.reward_model")
    tok = load_tokenizer(source)
    try:
        model, loading = _transformers().AutoModelForSequenceClassification.from_pretrained(
            source.path, dtype="auto", output_loading_info=True, **source.kwargs)
    except ValueError as exc:
        raise ValueError(f"task.reward_model {name!r} is neither a lorafit run (no {CONFIG_FILE}) nor a sequence "
                         f"classification model: {str(exc).splitlines()[0]}") from None
    if loading["missing_keys"]:  # a base model: its head would be new random weights, its rewards noise
        raise ValueError(f"task.reward_model {name!r} is neither a lorafit run (no {CONFIG_FILE}) nor a trained "
                         f"sequence-classification model: it has no {', '.join(sorted(loading['missing_keys']))}")
    if model.config.pad_token_id is None:  # it finds each row's last token by the padding
        model.config.pad_token_id = tok.pad_token_id
    device = select_device(device_name)
    model.to(device).eval()
    limit = min(position_limit(model) or max_length, getattr(tok, "model_max_length", max_length) or max_length)
    if model.config.num_labels > 1 or label is not None:
        if model.config.num_labels == 1:
            raise ValueError(f"task.reward_label is for a classifier; {name} has one output, a reward model's "
                             "score, which is the reward")
        return _class_probability(model, tok, device, label, limit, name)
    pairs = reads_text_pairs(tok)

    @torch.no_grad()
    def score(prompts, completions, references, rows=None, completion_ids=None, call=None):
        out: list[float] = []
        for start in range(0, len(completions), SCORE_BATCH):
            ps, cs = prompts[start:start + SCORE_BATCH], completions[start:start + SCORE_BATCH]
            if pairs:
                enc = tok([text_pair(p, [])[0] for p in ps], cs, padding=True, truncation=True, max_length=limit,
                          return_tensors="pt")
            else:  # the template writes the special tokens it wants
                texts = [render(tok, [*p, {"role": "assistant", "content": c}]) for p, c in zip(ps, cs)]
                enc = tok(texts, add_special_tokens=False, padding=True, truncation=True, max_length=limit,
                          return_tensors="pt")
            out += model(**enc.to(device)).logits[:, 0].float().tolist()
        return out

    return score


def function_scorer(spec: str, conversational: bool = False) -> Scorer:
    """The function ``spec`` names: ``"file.py:name"`` (a path, relative to the working directory) or
    ``"module:name"``; ``conversational``: TRL-style functions get the prompts and completions as messages."""
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

    trl_style, by_name, named, required, every = _parameters(fn)

    def score(prompts, completions, references, rows=None, completion_ids=None, call=None):
        if "completion_ids" in by_name and completion_ids is None:
            raise ValueError(f"task.reward_function {spec}: asks for completion_ids, which this caller does not have")
        columns = {}
        if rows and (named or every):
            present = {k for row in rows for k in row}
            missing = [k for k in required if k not in present]
            if missing:
                raise ValueError(f"task.reward_function {spec}: asks for the column {missing[0]!r}, which the rows do "
                                 f"not have (their columns: {', '.join(sorted(present))})")
            keys = (present if every else present & set(named)) - set(_GIVEN)
            columns = {k: [row.get(k) for row in rows] for k in sorted(keys)}
        if trl_style and conversational:
            given = {"prompts": [list(p) for p in prompts],
                     "completions": [[{"role": "assistant", "content": c}] for c in completions]}
        else:
            given = {"prompts": [text_pair(p, [])[0] for p in prompts], "completions": list(completions)}
        call = call or RewardCall()
        given.update(references=list(references), completion_ids=completion_ids, trainer_state=call.trainer_state,
                     log_metric=_metric_logger(spec, call), log_extra=_extra_logger(spec, call, len(completions)))
        # TRL-style **kwargs take all of them (completion_ids where this caller has them)
        wanted = _GIVEN if trl_style and every else by_name
        keywords = {k: given[k] for k in wanted if k in by_name or given[k] is not None}
        if trl_style:
            values = fn(**keywords, **columns)
        else:
            values = fn(given["prompts"], given["completions"], given["references"], **keywords, **columns)
        if inspect.isawaitable(values):
            return checked_later(values, completions)
        return checked(values, completions)

    async def checked_later(awaitable, completions):
        return checked(await awaitable, completions)

    def checked(values, completions) -> list[float]:
        values = list(values)
        if len(values) != len(completions):
            raise ValueError(f"task.reward_function {spec}: returned {len(values)} rewards for {len(completions)} "
                             "completions")
        out = [_reward(v) for v in values]
        bad = [v for v, x in zip(values, out) if x is None]
        if bad:
            raise ValueError(f"task.reward_function {spec}: returned {bad[0]!r}; a reward is a finite number, or "
                             "None for a completion the function does not judge")
        return out

    return score


def _metric_logger(spec: str, call: RewardCall) -> Callable[[str, Any], None]:
    """TRL's ``log_metric(name, value)``: ``value`` added into the mean the run logs under ``name``."""
    def log_metric(name: str, value) -> None:
        number = _reward(value)
        if not isinstance(name, str) or not name:
            raise ValueError(f"task.reward_function {spec}: log_metric's name must be a non-empty string, got "
                             f"{name!r}")
        if name in call.reserved or name.startswith("reward/"):
            raise ValueError(f"task.reward_function {spec}: log_metric({name!r}) names one of the run's own metrics; "
                             "give it a name of its own")
        if number is None or math.isnan(number):
            raise ValueError(f"task.reward_function {spec}: log_metric({name!r}, {value!r}): a metric is a finite "
                             "number")
        entry = call.metrics.setdefault(name, [0.0, 0])
        entry[0] += number
        entry[1] += 1

    return log_metric


def _extra_logger(spec: str, call: RewardCall, n: int) -> Callable[[str, Any], None]:
    """TRL's ``log_extra(column, values)``: a value per completion, for the completions log."""
    def log_extra(column: str, values) -> None:
        values = list(values)
        if not isinstance(column, str) or not column:
            raise ValueError(f"task.reward_function {spec}: log_extra's column must be a non-empty string, got "
                             f"{column!r}")
        if len(values) != n:
            raise ValueError(f"task.reward_function {spec}: log_extra({column!r}) got {len(values)} values for {n} "
                             "completions")
        call.extra[column] = values

    return log_extra


def _reward(value) -> float | None:
    """``value`` as a reward (NaN for None, which means "not judged"), or None when it is not a finite number."""
    if value is None:
        return math.nan
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return None
    return float(value)


# what a function gets besides the rows' columns: the first three also by position
_GIVEN = ("prompts", "completions", "references", "completion_ids", "trainer_state", "log_metric", "log_extra")


def _parameters(fn) -> tuple[bool, set[str], list[str], list[str], bool]:
    """How ``fn`` is called: whether by name (TRL's way, where one parameter is called ``completions``; else the
    first three parameters by position), which of ``_GIVEN`` it names (and so takes by name), the row columns it
    takes as keywords (its other parameters), those of them without a default, and whether it takes ``**kwargs``
    (then every column, and when called by name everything of ``_GIVEN``)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: the three lists only
        return False, set(), [], [], False
    every = any(p.kind is p.VAR_KEYWORD for p in params)
    keywords = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    trl_style = "completions" in {p.name for p in keywords}
    rest = keywords if trl_style else keywords[3:]
    by_name = {p.name for p in rest if p.name in _GIVEN}
    named = [p for p in rest if p.name not in _GIVEN]
    return trl_style, by_name, [p.name for p in named], [p.name for p in named if p.default is p.empty], every
