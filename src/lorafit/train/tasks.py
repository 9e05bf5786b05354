"""The three tasks: what an example becomes in tokens, how a batch is padded, what the loss and metrics are.

- ``classification``: text (and optional text pair) -> label; cross-entropy;
  accuracy and macro-F1.
- ``causal_lm``: a prompt and a response rendered with the model's chat
  template; the loss covers the response tokens only (every assistant turn of
  a chat); perplexity, and ROUGE on greedy generations.
- ``seq2seq``: an encoder-decoder (T5/BART) maps the prompt to the output;
  loss on the target tokens; perplexity and ROUGE.

Losses are returned as a *sum* with the number of units it covers (examples or
target tokens), so gradient accumulation can divide by the units of the whole
optimizer step: accumulated micro-batches then equal one large batch.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import itertools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lorafit.chat import render
from lorafit.train.config import RunConfig
from lorafit.train.data import FeatureTable, eval_batches, lengths_of, rows_at
from lorafit.train.distributed import SINGLE, Distributed, unwrap

IGNORE = -100


@dataclass
class Encoded:
    features: list[dict[str, Any]]  # token id lists per example
    skipped: int = 0  # rows that could not fit a single target token into max_length


ENCODING_VERSION = 3  # part of the tokenization cache key: bump when encode_batch changes what it writes


def encode_dataset(task: Task, rows, split: str) -> tuple[FeatureTable, int]:
    """``rows`` (a datasets.Dataset) tokenized by ``Dataset.map``, cached beside the rows' Arrow file under a
    key made of the rows' own fingerprint and everything that changes the tokens (Task.cache_key), so a
    second run with the same inputs reads the tokens back. Returns the table and the rows it skipped."""
    import datasets

    kind = "train" if split == "train" else "evaluation"
    key = hashlib.sha256(repr((rows._fingerprint, task.cache_key(kind), ENCODING_VERSION)).encode()).hexdigest()
    probe = task.encode_batch(rows[:1], split)  # the columns it writes
    features = datasets.Features({name: _FEATURE_TYPES[name] for name in probe})
    encoded = rows.map(task.encode_batch, fn_kwargs={"split": split}, batched=True, batch_size=1000,
                       remove_columns=rows.column_names, features=features, new_fingerprint=key[:32],
                       desc=f"tokenizing the {split} rows")
    return FeatureTable(encoded), len(rows) - len(encoded)


def _feature_types() -> dict[str, Any]:
    try:
        from datasets import List, Value
    except ImportError:  # encode_dataset is then never called
        return {}
    ids = List(Value("int32"))  # token ids and -100 fit, at half the bytes of int64
    return {"input_ids": ids, "labels": ids, "prompt_ids": ids, "rejected_ids": ids, "rejected_labels": ids,
            "kl_ids": ids, "kl_labels": ids,
            "token_type_ids": List(Value("int8")), "rejected_token_type_ids": List(Value("int8")),
            "label": Value("int32"), "length": Value("int32"), "reference": List(Value("string")),
            "margin": Value("float32"), "prompt_messages": Value("string"), "row": Value("string")}


_FEATURE_TYPES = _feature_types()


def tokenizer_fingerprint(tok) -> str:
    """What decides the tokens a tokenizer makes: its whole definition (the fast tokenizer's JSON, which holds
    the vocabulary, normalizer and post-processor), special tokens and chat template."""
    h = hashlib.sha256(type(tok).__name__.encode())
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        from datasets.fingerprint import Hasher

        h.update(Hasher.hash(tok).encode())
    for name in ("special_tokens_map", "chat_template", "add_bos_token", "add_eos_token", "padding_side"):
        h.update(repr(getattr(tok, name, None)).encode())
    return h.hexdigest()


def columns_to_rows(batch: dict[str, list]) -> list[dict]:
    """A columnar batch (Dataset.map) as row dicts; a null is a field the row does not have."""
    keys = list(batch)
    return [{k: v for k, v in zip(keys, values) if v is not None} for values in zip(*batch.values())]


def rows_to_columns(rows: list[dict], fields: list[str] | None = None) -> dict[str, list]:
    fields = fields or list(dict.fromkeys(k for r in rows for k in r))
    return {f: [r.get(f) for r in rows] for f in fields}


def build_task(config: RunConfig, tokenizer, labels: list | None = None) -> Task:
    return task_class(config.task.type)(config, tokenizer, labels)


def task_class(kind: str) -> type[Task]:
    """The Task of task.type ``kind``."""
    from lorafit.train.grpo import GRPO  # they build on the tasks here
    from lorafit.train.kto import KTO
    from lorafit.train.preference import Preference
    from lorafit.train.reward import Reward

    return {"classification": Classification, "causal_lm": CausalLM, "seq2seq": Seq2Seq, "preference": Preference,
            "reward": Reward, "kto": KTO, "grpo": GRPO}[kind]


class Task:
    metric = "eval_loss"  # the default "best" metric
    skipped_because = "no response token fits into"  # why encode_batch leaves rows out
    writes_samples = False  # whether evaluate can record its per-example outputs (keep_samples)

    def __init__(self, config: RunConfig, tokenizer, labels: list | None = None) -> None:
        self.config = config
        self.tok = tokenizer
        self.labels = labels
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._tokenizer_key: str | None = None
        # record what evaluate (and grpo's training) produce per example, for take_samples: `lorafit eval
        # --samples`, grpo's task.log_completions
        self.keep_samples = False
        self._samples: list[dict] = []

    def encode_batch(self, batch: dict[str, list], split: str) -> dict[str, list]:
        """Rows as columns (``Dataset.map(batched=True)``) -> encoded examples as columns, each with its
        "length" (tokens); rows that cannot be used are left out. Every column is there, even when empty."""
        raise NotImplementedError

    def encode(self, rows: list[dict], split: str) -> Encoded:
        """The same for a list of rows: a list of features."""
        out = self.encode_batch(rows_to_columns(rows), split)
        features = columns_to_rows({k: v for k, v in out.items() if k != "length"})
        return Encoded(features, len(rows) - len(features))

    def cache_key(self, kind: str) -> tuple:
        """Everything an encoded example depends on besides the row: a change re-tokenizes (encode_dataset)."""
        if self._tokenizer_key is None:
            self._tokenizer_key = tokenizer_fingerprint(self.tok)
        d, t = self.config.data, self.config.task
        return (type(self).__name__, kind, t.max_length, t.max_target_length, t.max_new_tokens, bool(t.generate_rows),
                d.text_field, d.text_pair_field, d.label_field, d.instruction_field, d.input_field, d.output_field,
                d.messages_field, d.instruction, d.reference_fields, repr(self.labels), self._tokenizer_key)

    @staticmethod
    def greater_is_better(metric: str) -> bool:
        return not (metric.endswith("loss") or metric == "perplexity")

    # -- shared helpers -----------------------------------------------------------
    def _pad(self, seqs: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
        width = max(len(s) for s in seqs)
        rows = [([value] * (width - len(s)) + s) if left else (s + [value] * (width - len(s))) for s in seqs]
        return torch.tensor(rows, dtype=torch.long)

    def _prompt_text(self, row: dict) -> str:
        d = self.config.data
        parts = [d.instruction, row.get(d.instruction_field) if d.instruction_field else None,
                 row.get(d.input_field) if d.input_field else None]
        return "\n\n".join(str(p) for p in parts if p not in (None, ""))

    def _target_text(self, row: dict) -> str:
        """The output field, or for an evaluation row that has only references, the first of them."""
        d = self.config.data
        field = d.output_field if row.get(d.output_field) is not None or not d.reference_fields \
            else d.reference_fields[0]
        return str(row[field])

    def _references(self, row: dict) -> list[str]:
        """What ROUGE scores against: the row's data.reference_fields, or else its target."""
        refs = [str(row[f]) for f in self.config.data.reference_fields or () if row.get(f) is not None]
        return refs or [self._target_text(row)]

    def num_units(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["units"])

    def passes_per_window(self) -> int:
        """Optimizer steps taken on each window of micro-batches (grpo: task.num_iterations on one batch of
        samples); 1: every step reads new rows."""
        return 1

    def training_progress(self, step: int, max_steps: int, epoch: float, is_main: bool) -> None:
        """Where training stands (optimizer steps done, of how many; the epoch, fractional; whether this is
        process 0), told before each window's preparation and each evaluation (grpo hands it to reward
        functions as TRL's trainer_state). Nothing by default."""

    def take_samples(self) -> list[dict] | None:
        """What the task produced since the last call, a record per example (this process's): an evaluation's
        predictions or generations, grpo's sampled completions; None, on every process alike, unless
        ``keep_samples``."""
        if not self.keep_samples:
            return None
        samples, self._samples = self._samples, []
        return samples

    def prepare_window(self, model: nn.Module, micro: list[tuple[dict, bool]],
                       dist: Distributed = SINGLE) -> list[int] | None:
        """Called with a step's micro-batches (on the device, each with whether this process has rows in it)
        before its first forward; may add to the batch dicts (grpo samples and scores completions here) and
        return each micro-batch's units when they differ from collate's. Nothing by default."""
        return None

    def trained_tokens(self, counted: int) -> int:
        """The tokens the last ``loss_sum`` trained on, for the tokens per second; ``counted``: its batch's
        (the attention mask's count, taken on the host before the batch went to the device)."""
        return counted

    def _eval_batches(self, features: list[dict], batch_size: int, dist: Distributed,
                      device: torch.device) -> list[list[int] | None]:
        """This process's evaluation batches (indices into ``features``). Under FSDP every process must run
        the same number of forwards, so the short ones get ``None`` batches: run, then ignored."""
        mine = dist.shard(list(range(len(features))))
        lengths = lengths_of(features)[mine].tolist()
        batches = [[mine[i] for i in b] for b in eval_batches(lengths, batch_size, self.config.train.eval_batch_tokens)]
        if dist.fsdp:
            batches += [None] * (int(dist.all_reduce_max(len(batches), device)) - len(batches))
        return batches

    def evaluate(self, model: nn.Module, features: list[dict], device: torch.device, batch_size: int,
                 autocast: Any, dist: Distributed = SINGLE) -> dict[str, float]:
        raise NotImplementedError


class Classification(Task):
    metric = "accuracy"
    writes_samples = True

    def __init__(self, config, tokenizer, labels) -> None:
        super().__init__(config, tokenizer, labels)
        self.label_ids = {str(v): i for i, v in enumerate(labels or [])}

    def encode_batch(self, batch: dict[str, list], split: str) -> dict[str, list]:
        d = self.config.data
        texts = [str(t) for t in batch[d.text_field]]
        pairs = [str(t) for t in batch[d.text_pair_field]] if d.text_pair_field else None
        enc = self.tok(texts, pairs, truncation=True, max_length=self.config.task.max_length,
                       return_attention_mask=False)
        out = {"input_ids": enc["input_ids"], "label": [self._label_id(v) for v in batch[d.label_field]],
               "length": [len(ids) for ids in enc["input_ids"]]}
        if "token_type_ids" in enc:
            out["token_type_ids"] = enc["token_type_ids"]
        return out

    def _label_id(self, value: Any) -> int:
        try:
            return self.label_ids[str(value)]
        except KeyError:  # only a streamed split gets here: the others were checked whole (data.label_set)
            raise ValueError(f"label {value!r} ({self.config.data.label_field!r}) is not in the label set "
                             f"{list(self.label_ids)} (data.labels)") from None

    def collate(self, feats: list[dict]) -> dict[str, torch.Tensor]:
        ids = self._pad([f["input_ids"] for f in feats], self.pad_id)
        batch = {"input_ids": ids, "attention_mask": self._pad([[1] * len(f["input_ids"]) for f in feats], 0),
                 "labels": torch.tensor([f["label"] for f in feats]), "units": torch.tensor(len(feats))}
        if "token_type_ids" in feats[0]:
            batch["token_type_ids"] = self._pad([f["token_type_ids"] for f in feats], 0)
        return batch

    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        return model(**inputs).logits

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(self.logits(model, batch).float(), batch["labels"], reduction="sum")

    @torch.no_grad()
    def evaluate(self, model, features, device, batch_size, autocast, dist: Distributed = SINGLE,
                 per_class: bool = False) -> dict[str, Any]:
        model.eval()
        preds, gold, loss = [], [], 0.0
        for idx in self._eval_batches(features, batch_size, dist, device):
            batch = {k: v.to(device) for k, v in self.collate(rows_at(features, idx or [0])).items()}
            with autocast():
                logits = self.logits(model, batch).float()
            if idx is None:
                continue
            loss += nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()
            preds += logits.argmax(-1).tolist()
            gold += batch["labels"].tolist()
            if self.keep_samples:
                self._samples += self._sample_records(idx, rows_at(features, idx), logits)
        parts = dist.gather_objects((preds, gold, loss))
        preds, gold = [p for part in parts for p in part[0]], [g for part in parts for g in part[1]]
        loss = sum(part[2] for part in parts)
        metrics: dict[str, Any] = {"eval_loss": loss / len(gold),
                                   "accuracy": sum(p == g for p, g in zip(preds, gold)) / len(gold),
                                   "macro_f1": macro_f1(preds, gold, len(self.label_ids))}
        if per_class:
            metrics["per_class"] = class_report(preds, gold, list(self.label_ids))
        return metrics

    def _sample_records(self, idx: list[int], rows: list[dict], logits: torch.Tensor) -> list[dict]:
        """Each example's text (as the model read it), label, predicted class and class probabilities."""
        names = list(self.label_ids)
        return [{"example": i, "text": self.tok.decode(row["input_ids"], skip_special_tokens=True),
                 "label": names[row["label"]], "predicted": names[int(p.argmax())],
                 "probabilities": dict(zip(names, p.tolist()))}
                for i, row, p in zip(idx, rows, logits.softmax(-1))]


def class_report(preds: list[int], gold: list[int], names: list[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support (gold rows) of each class, by its name."""
    report = {}
    for c, name in enumerate(names):
        tp = sum(p == c and g == c for p, g in zip(preds, gold))
        predicted, support = sum(p == c for p in preds), sum(g == c for g in gold)
        precision, recall = tp / predicted if predicted else 0.0, tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        report[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return report


def macro_f1(preds: list[int], gold: list[int], n_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in gold or predictions."""
    scores = []
    for c in range(n_classes):
        tp = sum(p == c and g == c for p, g in zip(preds, gold))
        fp = sum(p == c and g != c for p, g in zip(preds, gold))
        fn = sum(p != c and g == c for p, g in zip(preds, gold))
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


class _Generative(Task):
    writes_samples = True  # the generations of task.generate_rows examples

    def collate(self, feats: list[dict]) -> dict[str, torch.Tensor]:
        ids = self._pad([f["input_ids"] for f in feats], self.pad_id)
        labels = self._pad([f["labels"] for f in feats], IGNORE)
        batch = {"input_ids": ids, "attention_mask": self._pad([[1] * len(f["input_ids"]) for f in feats], 0),
                 "labels": labels}
        if "position_ids" in feats[0]:  # packed examples (CausalLM.pack)
            batch["position_ids"] = self._pad([f["position_ids"] for f in feats], 0)
        batch["units"] = self._target_count(labels)
        return batch

    def _target_count(self, labels: torch.Tensor) -> torch.Tensor:
        return (labels != IGNORE).sum()

    def _token_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                                           reduction="sum")

    @torch.no_grad()
    def evaluate(self, model, features, device, batch_size, autocast, dist: Distributed = SINGLE) -> dict[str, float]:
        model.eval()
        loss, units = 0.0, 0
        for idx in self._eval_batches(features, batch_size, dist, device):
            batch = {k: v.to(device) for k, v in self.collate(rows_at(features, idx or [0])).items()}
            with autocast():
                batch_loss = self.loss_sum(model, batch).item()
            if idx is not None:
                loss += batch_loss
                units += int(batch["units"])
        loss, units = dist.all_reduce_sum([loss, units], device)
        out = {"eval_loss": loss / max(units, 1)}
        out["perplexity"] = math.exp(min(out["eval_loss"], 50.0))
        n = self.config.task.generate_rows
        if n:
            numbered = dist.shard(list(itertools.islice(
                ((i, f) for i, f in enumerate(features) if f.get("reference") is not None), n)))
            rows = [f for _, f in numbered]
            prompts = [f["prompt_ids"] for f in rows]
            if dist.fsdp:  # same number of generate calls everywhere; the extra outputs are dropped
                most = int(dist.all_reduce_max(len(prompts), device))
                prompts += [features[0].get("prompt_ids", features[0]["input_ids"])] * (most - len(prompts))
            predictions = self.generate(model, prompts, device, batch_size, autocast, synced=dist.fsdp)
            if self.keep_samples:
                self._samples += [{"example": i, "prompt": self.tok.decode(f["prompt_ids"], skip_special_tokens=True),
                                   "generation": text, "references": f["reference"]}
                                  for (i, f), text in zip(numbered, predictions)]
            parts = dist.gather_objects(([f["reference"] for f in rows], predictions[:len(rows)]))
            out.update(rouge([r for part in parts for r in part[0]], [p for part in parts for p in part[1]]))
        return out

    def generate(self, model, prompts: list[list[int]], device, batch_size: int, autocast,
                 synced: bool = False) -> list[str]:
        """Greedy generations; ``synced`` keeps FSDP processes stepping together until all are done."""
        raise NotImplementedError


class CausalLM(_Generative):
    """Prompt + response through the chat template; only response tokens carry loss."""

    def __init__(self, config, tokenizer, labels=None) -> None:
        super().__init__(config, tokenizer, labels)
        self.uses_model_template = bool(tokenizer.chat_template)
        self._plain_head: bool | None = None  # are the logits the output embeddings of the hidden state?

    def messages(self, row: dict) -> list[dict]:
        d = self.config.data
        if d.messages_field:
            return [{"role": m["role"], "content": str(m["content"])} for m in row[d.messages_field]]
        return [{"role": "user", "content": self._prompt_text(row)},
                {"role": "assistant", "content": self._target_text(row)}]

    def encode_messages(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """Token ids and labels: each assistant turn's tokens are labels, everything else IGNORE."""
        pieces = self._pieces(messages)
        return self._join(pieces, self._ids_many([text for text, _ in pieces]))

    def _pieces(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """The conversation's text in pieces, in order: (context, False), (assistant turn, True), ..."""
        pieces: list[tuple[str, bool]] = []
        done = ""  # the text rendered so far
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = render(self.tok, messages[:i], generation_prompt=True)
            full = render(self.tok, messages[: i + 1], generation_prompt=False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise ValueError("the chat template does not render a conversation as a prefix of its "
                                 "continuation, so response tokens cannot be told apart; set a simpler "
                                 "tokenizer chat template")
            pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
            done = full
        return pieces

    def _ids_many(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts in one call to the tokenizer (a fast one works through them in parallel)."""
        if not texts:
            return []
        return self.tok(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]

    @staticmethod
    def _join(pieces: list[tuple[str, bool]], ids: list[list[int]]) -> tuple[list[int], list[int]]:
        out: list[int] = []
        labels: list[int] = []
        for (text, response), piece in zip(pieces, ids):
            piece = piece if text else []
            out += piece
            labels += piece if response else [IGNORE] * len(piece)
        return out, labels

    def encode_batch(self, batch: dict[str, list], split: str) -> dict[str, list]:
        t = self.config.task
        max_len = t.max_length
        generating = split != "train"
        plans = []  # per row: (messages, pieces, the generation prompt or None)
        texts: list[str] = []
        for row in columns_to_rows(batch):
            messages = self.messages(row)
            pieces = self._pieces(messages)
            prompt = render(self.tok, messages[:-1], generation_prompt=True) \
                if generating and messages[-1]["role"] == "assistant" else None
            plans.append((row, messages, pieces, prompt))
            texts += [text for text, _ in pieces] + ([prompt] if prompt is not None else [])
        all_ids = iter(self._ids_many(texts))
        out: dict[str, list] = {"input_ids": [], "labels": [], "length": []}
        if generating:
            out["prompt_ids"], out["reference"] = [], []
        for row, messages, pieces, prompt in plans:
            ids, labels = self._join(pieces, [next(all_ids) for _ in pieces])
            prompt_ids = next(all_ids) if prompt is not None else None
            ids, labels = ids[:max_len], labels[:max_len]
            if all(x == IGNORE for x in labels[1:]):
                continue  # no response token fits
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["length"].append(len(ids))
            if generating:
                usable = prompt_ids is not None and (len(prompt_ids) + t.max_new_tokens <= max_len
                                                     or not t.generate_rows)
                chat = self.config.data.messages_field
                out["prompt_ids"].append(prompt_ids if usable else None)
                out["reference"].append(([messages[-1]["content"]] if chat else self._references(row)) if usable
                                        else None)
        return out

    def _target_count(self, labels: torch.Tensor) -> torch.Tensor:
        return (labels[:, 1:] != IGNORE).sum()  # the first token is never predicted

    def pack(self, features: list[dict]) -> list[dict]:
        """Training examples concatenated into sequences of at most task.max_length tokens (best fit, longest
        first), position ids restarting at each example. Without an attention mask, transformers derives from
        those positions a block-diagonal causal mask: no example attends to another (check_packing)."""
        rooms: list[tuple[int, int]] = []  # (tokens left, sequence), sorted
        packs: list[list[int]] = []
        lengths = lengths_of(features).tolist()
        for i in sorted(range(len(features)), key=lambda i: -lengths[i]):
            n = lengths[i]
            k = bisect.bisect_left(rooms, (n, -1))
            if k == len(rooms):
                packs.append([])
                room, j = self.config.task.max_length, len(packs) - 1
            else:
                room, j = rooms.pop(k)
            packs[j].append(i)
            bisect.insort(rooms, (room - n, j))
        out = []
        for pack in packs:
            f: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
            for example in rows_at(features, pack):
                ids = example["input_ids"]
                f["input_ids"] += ids
                f["labels"] += [IGNORE] + example["labels"][1:]  # not predicted from the example before
                f["position_ids"] += list(range(len(ids)))
            out.append(f)
        return out

    @torch.no_grad()
    def check_packing(self, model: nn.Module, packed: list[dict], device: torch.device) -> None:
        """Refuse a model that attends across packed examples: the logits of a packed sequence's second
        example must be those of that example alone (a model whose attention ignores packed position ids
        would let it see the first)."""
        f = next((f for f in packed if f["position_ids"].count(0) > 1), None)
        if f is None:
            return
        starts = [t for t, p in enumerate(f["position_ids"]) if p == 0] + [len(f["position_ids"])]
        start, end = starts[1], starts[2]
        ids = torch.tensor([f["input_ids"]], device=device)
        positions = torch.tensor([f["position_ids"]], device=device)
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                packed_logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0, start:end]
                alone = model(input_ids=ids[:, start:end], use_cache=False).logits[0]
                # what attending across the examples looks like: one causal sequence
                leaky = model(input_ids=ids[:, :end], use_cache=False).logits[0, start:end]
        finally:
            model.train(training)
        error = (packed_logits.float() - alone.float()).abs().max().item()
        leak = (leaky.float() - alone.float()).abs().max().item()
        # float32 agrees to rounding; 16-bit weights round differently for other shapes, so there the packed
        # logits must be far closer to the example alone than cross-example attention would put them
        if not (torch.allclose(packed_logits.float(), alone.float(), rtol=1e-3, atol=1e-4) or error < 0.1 * leak):
            raise ValueError(f"task.packing: {type(model).__name__} attends across packed examples (its attention "
                             "does not take packed position ids); set task.packing = false")

    def collate(self, feats: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().collate(feats)
        batch.update(loss_positions(batch["labels"]))
        return batch

    def loss_sum(self, model, batch) -> torch.Tensor:
        return self.token_losses(model, batch).sum()

    def token_losses(self, model, batch) -> torch.Tensor:
        """The cross entropy at each position that carries loss (``loss_positions``' order). Logits only at
        those positions, a chunk of rows at a time: full-vocabulary float32 logits for every position would be
        batch x length x vocabulary floats, gigabytes per batch. The positions come with the batch
        (``loss_positions``), so the host never waits for the device here."""
        positions, targets = batch["loss_positions"], batch["loss_targets"]
        # use_cache: the config's default (True) would keep every layer's keys and values for a next token.
        # No attention mask: collate pads on the right, so under causal attention no real token sees the padding
        # (the logits at real tokens are the masked ones), and the padding carries no loss. Without a mask SDPA
        # runs its causal kernels (flash attention on GPUs, not the masked ones), and transformers builds no
        # mask and does not read one back from the device to check it for padding.
        inputs = {"input_ids": batch["input_ids"], "use_cache": False}
        if "position_ids" in batch:  # packed: transformers masks attention across the examples these mark
            inputs["position_ids"] = batch["position_ids"]
        # FSDP (fully_shard gives the model unshard): the head's weight is a shard outside the model's forward. The
        # model may be sharded after its first batches (task.precompute_reference's run before), so asked each time.
        sharded = hasattr(model, "unshard")
        if not sharded and self._plain_head is None:
            self._plain_head = head_is_plain(model, inputs, positions)
        if sharded or not self._plain_head:  # the model's own head and logit transform, at the loss positions
            logits = model(**inputs, logits_to_keep=_mask_at(batch["input_ids"], positions)).logits
            return nn.functional.cross_entropy(logits.float(), targets, reduction="none")
        hidden, _ = forward_hidden(model, inputs, positions[:0])  # no position: the head runs below
        rows = max(1, LOSS_CHUNK_LOGITS // len(self.tok))
        return chunked_cross_entropy(unwrap(model).get_output_embeddings(), hidden.flatten(0, 1)[positions], targets,
                                     rows)

    @torch.no_grad()
    def generate(self, model, prompts, device, batch_size, autocast, synced: bool = False) -> list[str]:
        out: list[str] = [""] * len(prompts)
        for idx in eval_batches([len(p) for p in prompts], batch_size):
            ids = self._pad([prompts[i] for i in idx], self.pad_id, left=True).to(device)
            mask = self._pad([[1] * len(prompts[i]) for i in idx], 0, left=True).to(device)
            with autocast(), eager_generation():
                gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.config.task.max_new_tokens,
                                     do_sample=False, pad_token_id=self.pad_id, eos_token_id=self.tok.eos_token_id,
                                     synced_gpus=synced)
            for j, i in enumerate(idx):
                out[i] = self.tok.decode(gen[j, ids.shape[1]:], skip_special_tokens=True).strip()
        return out


def eager_generation() -> contextlib.AbstractContextManager:
    """Generation runs train.compile's compiled blocks eagerly: each new cache length would otherwise compile
    the blocks again, until torch's recompile limit sends them to eager mode anyway (torch < 2.6 has no
    stances, and generation then compiles)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


LOSS_CHUNK_LOGITS = 1 << 23  # logits per chunk of the causal-LM loss: 32 MiB in float32


def chunked_cross_entropy(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor,
                          rows: int, entropy: bool = False, entropy_grad: bool = False
                          ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The cross entropy of each row of ``head(hidden)`` against ``targets``, ``rows`` rows at a time; with
    ``entropy``, also each row's entropy of ``softmax(head(hidden))``, with a gradient only with
    ``entropy_grad`` (for logging, or for an entropy bonus).

    With gradients, each chunk's logits are recomputed in the backward pass (checkpointing) instead of
    kept, so one chunk's logits exist at a time in both passes."""
    def chunk_losses(h: torch.Tensor, y: torch.Tensor):
        logits = head(h).float()
        if not entropy:
            return nn.functional.cross_entropy(logits, y, reduction="none")
        logp = logits.log_softmax(-1)  # once, for the loss and the entropy (a chunk is LOSS_CHUNK_LOGITS at most)
        losses = -logp.gather(-1, y[:, None])[:, 0]
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            return losses, _entropy(logp)

    chunks = [checkpoint(chunk_losses, h, y, use_reentrant=False) if torch.is_grad_enabled() else chunk_losses(h, y)
              for h, y in zip(hidden.split(rows), targets.split(rows))]
    if not entropy:
        return torch.cat(chunks) if chunks else hidden.new_zeros(0, dtype=torch.float32)
    if not chunks:
        return hidden.new_zeros(0, dtype=torch.float32), hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])


def row_entropy(logits: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """The entropy of softmax(logits) over the last dimension, in float32 (a -inf logit adds 0, and no NaN to
    the gradient), computed LOSS_CHUNK_LOGITS logits at a time: the log-probabilities are one more buffer of
    their size; with a gradient only with ``grad``."""
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        flat = logits.reshape(-1, logits.shape[-1])
        rows = max(1, LOSS_CHUNK_LOGITS // max(flat.shape[1], 1))
        parts = [_entropy(chunk.float().log_softmax(-1)) for chunk in flat.split(rows)]
        return (torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.float32)).view(logits.shape[:-1])


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    """The entropy of each row of log-probabilities; a -inf one adds 0, and no NaN to the gradient."""
    return -(logp.exp() * logp.masked_fill(torch.isinf(logp), 0.0)).sum(-1)


def loss_positions(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """For a batch's labels (IGNORE where no loss): ``loss_positions``, the flat indices (row * length + t) of
    the hidden states that predict a target (position t predicts token t + 1), and ``loss_targets``, those
    targets. Computed from the labels on the CPU, where collate makes them: selecting positions of a known
    count on the device makes the host wait for nothing, where a boolean mask would (its count is read back)."""
    targets = labels[:, 1:]
    keep = targets != IGNORE
    rows, cols = keep.nonzero(as_tuple=True)
    return {"loss_positions": rows * labels.shape[1] + cols, "loss_targets": targets[keep]}


def _mask_at(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A boolean mask of ids' shape, true at the flat ``positions``."""
    flat = torch.zeros(ids.numel(), dtype=torch.bool, device=ids.device)
    return flat.index_fill_(0, positions, True).view_as(ids)


def forward_hidden(model: nn.Module, inputs: dict, logits_to_keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The body's output (what the head reads) and the model's logits at ``logits_to_keep`` (transformers'
    argument: a boolean mask, or positions kept in every row), from one forward through ``model`` itself: a
    DDP wrapper must see the forward to sync the gradients."""
    captured = []
    hook = unwrap(model).base_model.register_forward_hook(lambda module, args, out: captured.append(out[0]))
    try:
        logits = model(**inputs, logits_to_keep=logits_to_keep).logits
    finally:
        hook.remove()
    return captured[0], logits


def head_is_plain(model: nn.Module, inputs: dict, positions: torch.Tensor) -> bool:
    """Whether the logits are the output embeddings of the hidden state, so the loss can apply them itself.

    Not for a model that transforms its logits (Gemma's soft-capping, Cohere's and Granite's scales): compared on
    the first loss position. (Never asked under FSDP, whose ``unshard`` module keeps the head's weight sharded.)"""
    head = unwrap(model).get_output_embeddings()
    if head is None:
        return False
    ids = inputs["input_ids"]
    first = _mask_at(ids, positions[:1])
    # fork_rng: dropout draws no random numbers here, so a resumed run draws what an uninterrupted one did
    with torch.no_grad(), torch.random.fork_rng(devices=[ids.device] if ids.device.type == "cuda" else []):
        hidden, logits = forward_hidden(model, inputs, first)
        return torch.allclose(head(hidden[first]), logits)


class Seq2Seq(_Generative):
    """Encoder-decoder: the prompt is the encoder input, the output the decoder target."""

    def _with_eos(self, ids: list[int], max_len: int) -> list[int]:
        eos = self.tok.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids = ids[: max_len - 1] + [eos]
        return ids

    def encode_batch(self, batch: dict[str, list], split: str) -> dict[str, list]:
        t = self.config.task
        rows = columns_to_rows(batch)
        sources = [self._prompt_text(r) for r in rows]
        targets = [self._target_text(r) for r in rows]
        src = self.tok(sources, truncation=True, max_length=t.max_length)["input_ids"]
        tgt = self.tok(targets, truncation=True, max_length=t.max_target_length)["input_ids"]
        ids = [self._with_eos(s, t.max_length) for s in src]
        out = {"input_ids": ids, "labels": [self._with_eos(y, t.max_target_length) for y in tgt],
               "length": [len(i) for i in ids]}
        if split != "train":
            out["prompt_ids"], out["reference"] = ids, [self._references(r) for r in rows]
        return out

    def loss_sum(self, model, batch) -> torch.Tensor:
        labels = batch["labels"]
        prepare = getattr(unwrap(model), "prepare_decoder_input_ids_from_labels", None)
        if prepare is None:
            raise ValueError(f"{type(model).__name__} cannot build decoder inputs from labels; is it a seq2seq model?")
        decoder_ids = prepare(labels=labels)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=decoder_ids).logits
        return self._token_loss(logits, labels)

    @torch.no_grad()
    def generate(self, model, prompts, device, batch_size, autocast, synced: bool = False) -> list[str]:
        out: list[str] = [""] * len(prompts)
        for idx in eval_batches([len(p) for p in prompts], batch_size):
            ids = self._pad([prompts[i] for i in idx], self.pad_id).to(device)
            mask = self._pad([[1] * len(prompts[i]) for i in idx], 0).to(device)
            with autocast(), eager_generation():
                gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, synced_gpus=synced,
                                     max_new_tokens=self.config.task.max_new_tokens)
            for j, i in enumerate(idx):
                out[i] = self.tok.decode(gen[j], skip_special_tokens=True).strip()
        return out


def rouge(references: list[list[str]], predictions: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (x100) with Porter stemming, as in the summarization literature.

    A row with several references scores its best one per ROUGE type (rouge-score's ``score_multi``)."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise ImportError("ROUGE needs the rouge-score package: pip install 'lorafit[train]'") from None
    if not references:
        warnings.warn("no evaluation rows fit a generation into task.max_length; ROUGE skipped", stacklevel=2)
        return {}
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for refs, pred in zip(references, predictions):
        for key, score in scorer.score_multi(refs, pred).items():
            totals[key] += score.fmeasure
    return {k: 100 * v / len(references) for k, v in totals.items()}
