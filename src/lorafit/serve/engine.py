"""The model side of the server: loading the base model, dynamic batching, batched forwards.

One worker thread runs the batches. Requests that arrive within ``max_wait``
of the first waiting one are put in the same batch (up to ``max_batch`` rows),
whatever adapters they ask for: ``adapter_per_row`` gives each row its own. Only
the heads must agree: a batch holds requests whose adapters' ``modules_to_save``
copies have the same shapes (``Entry.head``; one output tensor cannot hold rows
of 2 and 4 logits). Others wait, in arrival order, for the next batch.

The queue holds at most ``max_queue`` rows: beyond that ``submit`` refuses (the
server answers 503), so a burst cannot make every later request wait without end.
A job cancelled while queued (its client left, or it timed out) leaves the queue
and never runs; a generation cancelled while running stops at its next token.
Generation batches are continuous: each row is answered when it is done and leaves
the batch, and jobs queued meanwhile join it (``Batcher.take_more``) while the
oldest waiting job has the batch's head.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from lorafit.base_models import resolve_model
from lorafit.batched import adapter_per_row
from lorafit.chat import reads_text_pairs, render, text_pair
from lorafit.serve.registry import AdapterRegistry, Entry, FairLock


@dataclass
class Job:
    rows: int
    payload: object
    entry: Entry | None  # None: the base model
    future: Future = field(default_factory=Future)
    # streaming generation: (row, its text so far, the scored tokens that text now holds that were not passed on
    # before: empty unless the request asks for logprobs)
    on_token: Callable[[int, str, list], None] | None = None
    queued: float = 0.0  # time.monotonic() at submit
    cancelled: bool = False  # set by Batcher.cancel; read by the worker between tokens

    @property
    def head(self) -> tuple:
        """Jobs with equal ``head`` can share a forward (the base model's is ``()``)."""
        return self.entry.head if self.entry is not None else ()


class QueueFull(RuntimeError):
    """The batch queue holds ``max_queue`` rows already (HTTP 503)."""


class Batcher:
    """Collects jobs into batches for ``run(jobs)`` on one worker thread."""

    def __init__(self, run: Callable[[list[Job]], list], registry: AdapterRegistry, *, max_batch: int = 32,
                 max_wait: float = 0.005, max_queue: int = 1024, on_batch: Callable[[int], None] | None = None
                 ) -> None:
        self.run, self.registry = run, registry
        self.max_batch, self.max_wait, self.max_queue, self.on_batch = max_batch, max_wait, max_queue, on_batch
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._joined: list[Job] = []
        self._thread = threading.Thread(target=self._loop, name="lorafit-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Future:
        with self._cond:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            if sum(j.rows for j in self._jobs) + job.rows > self.max_queue:
                raise QueueFull(f"the server is busy ({self.max_queue} rows are waiting); try again shortly")
            job.queued = time.monotonic()
            self._jobs.append(job)
            self._cond.notify()
        return job.future

    def cancel(self, job: Job) -> None:
        """Cancel ``job`` (its client left, or it timed out). Still queued: it leaves the queue now, giving back
        its adapter reference (so that the adapter can be evicted at once) and its rows' place in the queue.
        Taken into a batch but not started: the worker skips it and gives the reference back. Running: a
        generation stops at its next token. Done: nothing happens."""
        job.cancelled = True
        with self._cond:
            cancelled = job.future.cancel()  # succeeds only before the worker marks it running
            dequeued = cancelled and any(j is job for j in self._jobs)
            if dequeued:
                self._jobs = deque(j for j in self._jobs if j is not job)
        if dequeued and job.entry is not None:
            self.registry.release(job.entry)

    def close(self, timeout: float | None = None) -> None:
        """Stop taking jobs; the worker finishes every job already queued, then exits."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    def pending(self) -> int:
        with self._cond:
            return len(self._jobs)

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                while not self._jobs:
                    if self._closed:
                        return None
                    self._cond.wait()
                deadline = self._jobs[0].queued + self.max_wait  # a job left out of the last batch has waited
                while not self._closed and self._jobs and sum(j.rows for j in self._jobs) < self.max_batch:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._jobs:  # else every job was cancelled (cancel) while this waited for more
                    break
            head = self._jobs[0].head
            batch, rows = [], 0
            for job in self._jobs:
                if job.head != head:
                    continue
                if batch and rows + job.rows > self.max_batch:
                    break
                batch.append(job)
                rows += job.rows
            taken = {id(job) for job in batch}
            self._jobs = deque(job for job in self._jobs if id(job) not in taken)
            return batch

    def take_more(self, head: tuple, room: int) -> list[Job]:
        """For a batch that is running (``run`` calls this on the worker thread): the jobs at the front of the
        queue whose ``head`` is the batch's, up to ``room`` rows, marked running. None when the oldest waiting
        job has another head: the batch then drains, and that job's batch goes next."""
        taken = []
        with self._cond:
            rows = 0
            while self._jobs and self._jobs[0].head == head and rows + self._jobs[0].rows <= room:
                taken.append(self._jobs.popleft())
                rows += taken[-1].rows
        started = [job for job in taken if self._start(job)]
        self._joined.extend(started)
        return started

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            batch = [job for job in batch if self._start(job)]
            if not batch:
                continue
            if self.on_batch:
                self.on_batch(sum(j.rows for j in batch))
            self._joined = []  # what take_more adds to this batch
            try:
                results = self.run(batch)
            except BaseException as exc:  # noqa: BLE001 - handed to the requests, the worker keeps going
                results = [exc] * len(batch)
            finally:
                for job in batch + self._joined:
                    if job.entry is not None:
                        self.registry.release(job.entry)
            for job, result in zip(batch, results):
                if job.future.done():  # answered by run itself, as soon as it was done
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
            failed = next((r for r in results if isinstance(r, BaseException)), None)
            for job in self._joined:  # run answers those it took in; if it failed first, they get its error
                if not job.future.done():
                    job.future.set_exception(failed or RuntimeError("the batch it joined ended without it"))

    def _start(self, job: Job) -> bool:
        """Mark ``job`` running (it can no longer be cancelled while queued); False if it was."""
        if job.future.set_running_or_notify_cancel():
            return True
        if job.entry is not None:
            self.registry.release(job.entry)
        return False


# -- models ------------------------------------------------------------------------
def serving_device(device: str | torch.device | None) -> torch.device:
    """``device``, or CUDA when there is a GPU, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_model(spec: str, num_labels: int | None = None, device: str | torch.device | None = None,
               dtype: torch.dtype = torch.float32, task: str | None = None):
    """(model, tokenizer, task) for ``--model``: a built-in name of ``lorafit train`` (``minilm``,
    ``smollm2-135m``) or a local transformers model directory, in ``dtype`` on ``device`` (None: CUDA when
    there is a GPU, else the CPU).

    ``task`` (``--task``): ``generate`` or ``classify``; None: what the checkpoint is (``model_task``). A causal
    LM loads for ``classify`` as a sequence classifier, as ``lorafit train`` loads it for a classifier or a reward
    model (task.type ``classification``, ``reward``), so adapters trained that way are served.

    A classifier keeps the head its checkpoint describes (``num_labels`` of its config;
    2, randomly initialised, for a model without a head such as minilm) unless
    ``num_labels`` overrides it. That head serves requests without an adapter; an
    adapter with a head brings its own number of classes from its file.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()
    device = serving_device(device)
    source = resolve_model(spec, "--model")
    path, kwargs = source.path, source.kwargs
    config = AutoConfig.from_pretrained(path, **kwargs)
    natural = model_task(config, kwargs)
    task = task or natural
    if task not in ("generate", "classify"):
        raise ValueError(f"--task must be 'generate' or 'classify', got {task!r}")
    if task == "generate":
        if natural != "generate":
            raise ValueError(f"--task generate needs a causal LM; {spec!r} is a "
                             f"{'/'.join(config.architectures or [config.model_type])}: serve it with --task classify")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    else:
        labels = num_labels or getattr(config, "num_labels", 2)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=labels, dtype=dtype, **kwargs)
        except ValueError as exc:
            if "Unrecognized configuration class" not in str(exc):
                raise
            raise ValueError(f"--model {spec!r} cannot be loaded as a sequence classifier (--task classify): "
                             f"{str(exc).splitlines()[0]}") from None
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if task == "classify" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # a decoder's score is read at its last non-pad token
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer, task


def model_task(config, kwargs: dict) -> str:
    """``generate`` for a causal LM, else ``classify``. A GGUF file (llama.cpp's format, smollm2-135m's)
    holds a decoder LM and its config names no architecture."""
    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or [])) or "gguf_file" in kwargs
    return "generate" if causal else "classify"


# -- batched work ------------------------------------------------------------------
# No real text averages more characters per token (English: about 4): a text cut to max_tokens times
# this keeps its first max_tokens tokens, and a megabyte of text costs no more to tokenize than a page.
CHARS_PER_TOKEN = 16


class ClassifyRow(NamedTuple):
    text: str
    pair: str | None = None  # the second text of a pair
    special_tokens: bool = True  # False: a rendered conversation, whose chat template wrote the special tokens


def conversation_row(tokenizer, messages: list[dict]) -> ClassifyRow:
    """A conversation to classify or score, rendered as ``lorafit train`` rendered the reward model's (and
    preference) conversations: with the chat template, or for an encoder without one as the text pair of the
    messages before the last and the last (the prompt and its response)."""
    if not reads_text_pairs(tokenizer):
        return ClassifyRow(render(tokenizer, messages), special_tokens=False)
    first, second = text_pair(messages[:-1], messages[-1:])
    return ClassifyRow(first, second) if first else ClassifyRow(second)  # no prompt: the response alone


def classify_batch(model, tokenizer, lock: FairLock, max_tokens: int, jobs: list[Job]) -> list:
    """Each job's payload is a list of ClassifyRow. A head with one output (a reward model's) gives its raw score;
    a classifier's gives the probabilities of its classes."""
    cut = max_tokens * CHARS_PER_TOKEN
    inputs = [row._replace(text=row.text[:cut], pair=row.pair and row.pair[:cut])
              for job in jobs for row in job.payload]
    names = [job.entry.internal if job.entry else None for job in jobs for _ in job.payload]
    special = inputs[0].special_tokens
    if all(row.pair is None and row.special_tokens == special for row in inputs):
        # one call: a fast tokenizer works through the texts in parallel
        enc = tokenizer([row.text for row in inputs], padding=True, truncation=True, max_length=max_tokens,
                        add_special_tokens=special, return_tensors="pt")
    else:  # rows of different kinds: each its own encoding, padded together
        enc = tokenizer.pad([tokenizer(row.text, row.pair, truncation=True, max_length=max_tokens,
                                       add_special_tokens=row.special_tokens) for row in inputs], return_tensors="pt")
    with lock, torch.inference_mode(), adapter_per_row(model, names):
        logits = model(**enc.to(model.device)).logits
    logits = logits.float().cpu()  # one copy from the device: the rows are read one number at a time
    probs = logits.softmax(-1)
    id2label = getattr(model.config, "id2label", None) or {}
    size = probs.shape[-1]  # one head size per batch (the batcher groups by head)
    if len(id2label) != size:  # the base model's names do not fit an adapter's head of another size
        id2label = {}
    out, start = [], 0
    for job in jobs:
        # the registry checked that an adapter's labels.json fits its head
        names_ = (job.entry and job.entry.labels) or [id2label.get(i, f"LABEL_{i}") for i in range(size)]
        rows = []
        for raw, p in zip(logits[start:start + job.rows], probs[start:start + job.rows]):
            if size == 1:
                rows.append({"label": names_[0], "score": float(raw[0])})
                continue
            best = int(p.argmax())
            rows.append({"label": names_[best], "score": float(p[best]),
                         "probabilities": {names_[i]: float(v) for i, v in enumerate(p)}})
        out.append(rows)
        start += job.rows
    return out


@dataclass
class GenerateRequest:
    ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop_ids: frozenset[int]
    stop_texts: tuple[str, ...] = ()  # the answer ends before the first of these it would contain
    logprobs: int | None = None  # None: no log-probabilities; k: each token's and the k likeliest tokens'
    echo: bool = False  # the prompt's tokens' log-probabilities too (each given the tokens before it)


@dataclass
class Scored:
    """A token and its log-probability under the model (before temperature and top-p), with the ``k`` likeliest
    tokens at that place; the first prompt token has no log-probability (nothing precedes it)."""
    token: int
    logprob: float | None
    top: list[tuple[int, float]]


def _scored(logprobs: torch.Tensor, tokens: torch.Tensor, k: int) -> list[Scored]:
    """``tokens[j]``'s log-probability in row ``j`` of ``logprobs`` ([n, vocabulary]) and the row's top ``k``,
    copied from the device at once."""
    chosen = logprobs.gather(-1, tokens[:, None].to(logprobs.device))[:, 0].cpu().tolist()
    values, ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    values, ids = values.cpu().tolist(), ids.cpu().tolist()
    return [Scored(int(t), lp, list(zip(i, v))) for t, lp, i, v in zip(tokens.tolist(), chosen, ids, values)]


def _choose(logits: torch.Tensor, req: GenerateRequest, gen: torch.Generator) -> int:
    if req.temperature <= 0:
        return int(logits.argmax())
    probs = (logits.float() / req.temperature).softmax(-1)
    if req.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < req.top_p  # the smallest set whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


def _cache_name(model) -> str:
    """What the model's forward calls its key/value cache, argument and output alike: ``cache`` in
    transformers releases that renamed it, ``past_key_values`` before (deprecated since, removed in 5.40)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _logits_kwarg(model) -> str | None:
    """The forward's argument that computes logits for the last positions only (a prompt's other logits are
    a [tokens, vocabulary] tensor per row that only echoed log-probabilities read): ``logits_to_keep``, or
    ``num_logits_to_keep`` in transformers before 4.50; None if the model has neither."""
    parameters = inspect.signature(model.forward).parameters
    return next((name for name in ("logits_to_keep", "num_logits_to_keep") if name in parameters), None)


def generate_batch(model, tokenizer, lock: FairLock, jobs: list[Job],
                   more: Callable[[int], list[Job]] | None = None, max_rows: int = 0) -> list:
    """Decode all jobs together, each with its adapter and its own sampling settings. A row that is done (stop
    token, length, or its client gone) is answered at once and leaves the batch. ``more(room)``, where given,
    hands over up to ``room`` rows of requests that came since (answered through their futures the same way):
    they join the running batch after their prefill, up to ``max_rows`` rows. Dropping and joining rows needs
    transformers' ``DynamicCache``; with another cache, rows stay to the end and nothing joins. Returns the
    answers of ``jobs``."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = model.device
    cache, last_only = _cache_name(model), _logits_kwarg(model)
    decoding = _Decoding(tokenizer)
    rows = decoding.add(jobs)
    if not rows:
        return decoding.answers[:len(jobs)]
    with contextlib.ExitStack() as stack:
        stack.enter_context(lock)
        stack.enter_context(torch.inference_mode())
        adapters = stack.enter_context(contextlib.ExitStack())  # adapter_per_row of the rows as they are now
        logits, past, mask = _prefill(model, decoding, rows, pad, device, adapters, cache, last_only)
        elastic = _elastic(past)  # the model's kind of cache: the same for every forward of the batch
        while True:
            step = decoding.choose(rows, logits)
            live = [k for k, i in enumerate(rows) if decoding.answers[i] is None]
            if not live:
                break
            replan = False  # whether row k of the batch is now another request (its adapters must follow)
            if len(live) < len(rows) and elastic:  # the done rows leave: their cache rows with them
                keep = torch.tensor(live, dtype=torch.long, device=device)
                past.batch_select_indices(keep)
                mask, step, rows = mask[keep], step[live], [rows[k] for k in live]
                replan = True
            if more is not None and elastic and len(rows) < max_rows:
                joining = decoding.add(more(max_rows - len(rows)))
                if joining:
                    replan = True  # the prefill below runs with the joining rows' adapters
                    new_logits, new_past, new_mask = _prefill(model, decoding, joining, pad, device, adapters, cache,
                                                              last_only)
                    new_step = decoding.choose(joining, new_logits)
                    left = [k for k, i in enumerate(joining) if decoding.answers[i] is None]
                    if left:
                        keep = torch.tensor(left, dtype=torch.long, device=device)
                        new_past.batch_select_indices(keep)
                        mask = _joined(past, new_past, mask, new_mask[keep])
                        step = torch.cat([step, new_step[left]])
                        rows = rows + [joining[k] for k in left]
            if replan:
                adapters.close()
                adapters.enter_context(adapter_per_row(model, [decoding.names[i] for i in rows]))
            mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=torch.long, device=device)], dim=1)
            positions = mask.sum(-1, keepdim=True) - 1  # each row's own count of real tokens
            result = model(input_ids=step.to(device), attention_mask=mask, position_ids=positions,
                           **{cache: past}, use_cache=True)
            logits, past = result.logits[:, -1], getattr(result, cache)
    return decoding.answers[:len(jobs)]


class _Decoding:
    """The requests of one generation batch, by index in the order they came: tokens so far, sampler, adapter
    and answer (set, and its job's future with it, when the request is done)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.jobs: list[Job] = []
        self.gens: list[torch.Generator] = []
        self.out: list[list[int]] = []
        self.answers: list[dict | None] = []
        self.names: list[str | None] = []
        self.scores: list[list[Scored]] = []  # of the tokens in out, for requests that ask for logprobs
        self.streamed: list[int] = []  # of those scores, how many on_token has passed on
        self.prompt_scores: list[list[Scored] | None] = []  # for requests that ask for echo

    def add(self, jobs: list[Job]) -> list[int]:
        """Indices of the new requests that want tokens (those asking for none are answered here)."""
        rows = []
        for job in jobs:
            r: GenerateRequest = job.payload
            g = torch.Generator()
            g.manual_seed(r.seed if r.seed is not None else int(torch.randint(0, 2**62, ()).item()))
            self.jobs.append(job)
            self.gens.append(g)
            self.out.append([])
            self.answers.append(None)
            self.names.append(job.entry.internal if job.entry else None)
            self.scores.append([])
            self.streamed.append(0)
            self.prompt_scores.append(None)
            i = len(self.jobs) - 1
            if r.max_new_tokens == 0 and not r.echo:  # an echo is computed by the prefill
                self.finish(i, "length")
            else:
                rows.append(i)
        return rows

    def finish(self, i: int, reason: str, text: str | None = None, scored: int | None = None) -> None:
        """Answer request ``i``: its text (``text``: cut at a stop text, whose first ``scored`` tokens hold it)."""
        if text is None:
            text = self.tokenizer.decode(self.out[i], skip_special_tokens=True)
        r: GenerateRequest = self.jobs[i].payload
        self.answers[i] = {"text": text, "tokens": len(self.out[i]), "finish_reason": reason}
        if r.logprobs is not None:
            self.answers[i]["logprobs"] = self.scores[i][:scored]
        if r.echo:
            self.answers[i]["prompt_logprobs"] = self.prompt_scores[i]
        if not self.jobs[i].future.done():
            self.jobs[i].future.set_result(self.answers[i])  # the batcher leaves an answered job alone

    def choose(self, rows: list[int], logits: torch.Tensor) -> torch.Tensor:
        """The next token of each row (0 for rows that are done); answers the rows that finish."""
        # one copy from the device a token: each row's choice, stop check and streaming happen on the host
        logits = logits.float().cpu()
        step = torch.zeros((len(rows), 1), dtype=torch.long)
        for k, i in enumerate(rows):
            job = self.jobs[i]
            r: GenerateRequest = job.payload
            if self.answers[i] is not None:
                continue
            if job.cancelled:  # its client has gone: stop spending time on it
                self.finish(i, "cancelled")
                continue
            if r.max_new_tokens == 0:  # only its prompt's scores (echo)
                self.finish(i, "length")
                continue
            token = _choose(logits[k], r, self.gens[i])
            if token in r.stop_ids:
                self.finish(i, "stop")
                continue
            if r.logprobs is not None:
                self.scores[i] += _scored(logits[k:k + 1].log_softmax(-1), torch.tensor([token]), r.logprobs)
            self.out[i].append(token)
            step[k, 0] = token
            if r.stop_texts or job.on_token:
                text = self.tokenizer.decode(self.out[i], skip_special_tokens=True)
                cut = min((at for at in (text.find(t) for t in r.stop_texts) if at >= 0), default=-1)
                if cut >= 0:
                    scored = self._tokens_before(i, cut) if r.logprobs is not None else None
                    self.finish(i, "stop", text[:cut], scored)
                    continue
                if job.on_token:  # without a tail that may still become a stop text, or an unfinished character
                    shown = text[:len(text) - _stop_prefix(text, r.stop_texts)].rstrip("\ufffd")
                    job.on_token(i, shown, [] if r.logprobs is None else self._newly_shown(i, text, shown))
            if len(self.out[i]) >= r.max_new_tokens:
                self.finish(i, "length")
        return step

    def _newly_shown(self, i: int, text: str, shown: str) -> list[Scored]:
        """The scores of request ``i``'s tokens whose text lies within ``shown`` (its text ``text`` so far, less
        a held-back tail) that were not passed on before."""
        n = len(self.out[i])
        if len(shown) < len(text):  # the tokens that hold the tail wait for the text they make
            while n > self.streamed[i] and len(self.tokenizer.decode(self.out[i][:n],
                                                                     skip_special_tokens=True)) > len(shown):
                n -= 1
        new, self.streamed[i] = self.scores[i][self.streamed[i]:n], max(n, self.streamed[i])
        return new

    def _tokens_before(self, i: int, cut: int) -> int:
        """How many of request ``i``'s tokens it takes to reach character ``cut`` of its text (the last of them
        may hold more: the start of a stop text)."""
        n = len(self.out[i])
        while n > 0 and len(self.tokenizer.decode(self.out[i][:n - 1], skip_special_tokens=True)) >= cut:
            n -= 1
        return n

    def score_prompts(self, rows: list[int], logits: torch.Tensor) -> None:
        """The prompt scores of the rows that ask for an echo, from their prefill's left-padded logits."""
        width = logits.shape[1]
        for k, i in enumerate(rows):
            r: GenerateRequest = self.jobs[i].payload
            if r.echo:
                n = len(r.ids)
                logprobs = logits[k, width - n:width - 1].float().log_softmax(-1)
                self.prompt_scores[i] = [Scored(r.ids[0], None, []),
                                         *_scored(logprobs, torch.tensor(r.ids[1:]), r.logprobs or 0)]


def _stop_prefix(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest end of ``text`` that begins one of ``stops``."""
    return max((n for stop in stops for n in range(min(len(stop) - 1, len(text)), 0, -1)
                if stop.startswith(text[-n:])), default=0)


def _prefill(model, decoding: _Decoding, rows: list[int], pad: int, device, adapters: contextlib.ExitStack,
             cache: str, last_only: str | None):
    """The prompts of ``rows``, left-padded into one batch (every row's next token in the same column) and run
    with their adapters: last logits, cache, attention mask. Scores the prompts that ask for it."""
    reqs = [decoding.jobs[i].payload for i in rows]
    width = max(len(r.ids) for r in reqs)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, r in enumerate(reqs):
        ids[k, width - len(r.ids):] = torch.tensor(r.ids)
        mask[k, width - len(r.ids):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    adapters.close()
    adapters.enter_context(adapter_per_row(model, [decoding.names[i] for i in rows]))
    echo = any(r.echo for r in reqs)
    keep = {last_only: 1} if last_only and not echo else {}
    result = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **keep)
    if echo:
        decoding.score_prompts(rows, result.logits)
    return result.logits[:, -1], getattr(result, cache), mask


def _elastic(past) -> bool:
    """Whether rows can leave and join this cache: transformers' DynamicCache of plain layers (not sliding
    windows, whose layers keep other state)."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:  # transformers before the cache layers
        return False
    return type(past) is DynamicCache and all(type(layer) is DynamicLayer and layer.is_initialized
                                               for layer in past.layers)


def _joined(past, new_past, mask: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
    """``new_past``'s rows appended to ``past`` (in place), the shorter side left-padded with masked-out
    entries; returns the joined attention mask."""
    width = max(mask.shape[1], new_mask.shape[1])

    def left(t: torch.Tensor, dim: int) -> torch.Tensor:
        missing = width - t.shape[dim]
        if not missing:
            return t
        shape = list(t.shape)
        shape[dim] = missing
        return torch.cat([t.new_zeros(shape), t], dim=dim)

    for layer, new in zip(past.layers, new_past.layers, strict=True):
        layer.keys = torch.cat([left(layer.keys, -2), left(new.keys, -2)])
        layer.values = torch.cat([left(layer.values, -2), left(new.values, -2)])
    return torch.cat([left(mask, 1), left(new_mask, 1)])
