"""Checking fields and labels, splitting, and batching the rows that ``sources.py`` reads.

The rows of a split are a ``datasets.Dataset``: an Arrow table memory-mapped from the cache, read a column or a
batch at a time (an ``IterableDataset`` for a streamed training split, ``data.streaming``). Every problem a user
can fix is a ``ValueError`` / ``FileNotFoundError`` naming the file.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lorafit.train.config import PAIR_TASKS, RunConfig, expand_path
from lorafit.train.sources import cache_dir, decode_error, is_hub_name, open_source  # noqa: F401 (re-exported)

Rows = Any  # a datasets.Dataset, an IterableDataset (streamed training rows) or a list of dicts
HELD_OUT = ("validation", "test")  # the splits that are evaluated, never trained on


@dataclass
class Splits:
    train: Rows
    validation: Rows
    test: Rows
    sources: dict[str, str]  # split -> where its rows came from


def read_rows(path: str, fmt: str = "auto", cache: str | None = None) -> list[dict]:
    """Every row of a small data file as dicts (examples, tests): training reads the Arrow table instead."""
    return open_source(str(path), fmt, cache_dir(cache), "train").to_list()


def _source_name(spec: str) -> str:
    path = expand_path(spec)
    return str(path) if path.is_file() or not is_hub_name(spec) else spec


def required_fields(config: RunConfig, split: str = "train") -> list[tuple[str, str]]:
    """(config key, field name) pairs every row of ``split`` must have."""
    d, task = config.data, config.task.type
    if task == "classification":
        pairs = [("data.text_field", d.text_field), ("data.label_field", d.label_field)]
        if d.text_pair_field:
            pairs.append(("data.text_pair_field", d.text_pair_field))
        return pairs
    if task in PAIR_TASKS:
        pairs = [("data.chosen_field", d.chosen_field), ("data.rejected_field", d.rejected_field)]
        if d.margin_field:
            pairs.append(("data.margin_field", d.margin_field))
    elif task == "kto":
        pairs = [("data.output_field", d.output_field), ("data.label_field", d.label_field)]
    elif task == "grpo":  # prompts; a reference where the config names one
        if d.messages_field:
            return [("data.messages_field", d.messages_field)]
        pairs = [("data.output_field", d.output_field)] if d.output_field else []
    elif d.messages_field:
        return [("data.messages_field", d.messages_field)]
    else:  # evaluation rows may carry data.reference_fields instead of the output field (check_fields)
        pairs = [] if split != "train" and d.reference_fields else [("data.output_field", d.output_field)]
    for key in ("instruction_field", "input_field"):
        if getattr(d, key):
            pairs.append((f"data.{key}", getattr(d, key)))
    prompted = any(key in ("data.instruction_field", "data.input_field") for key, _ in pairs) or d.instruction
    if not prompted and task not in (*PAIR_TASKS, "kto"):  # their responses may be whole conversations
        raise ValueError("data: a generation task needs data.instruction_field or data.input_field (the prompt), "
                         "or data.messages_field")
    return pairs


def column(rows: Rows, name: str):
    """One field of every row as a pyarrow ChunkedArray (a list of rows is converted)."""
    import pyarrow as pa

    if isinstance(rows, list):
        return pa.chunked_array([pa.array([r.get(name) for r in rows])])
    return rows.with_format("arrow")[name] if rows._indices is not None else rows.data.column(name)


def _first(mask) -> int | None:
    """The 1-based row of the first true value of a boolean Arrow array, or None."""
    import pyarrow.compute as pc

    i = pc.index(mask.fill_null(False), True).as_py()
    return None if i < 0 else i + 1


def check_fields(rows: Rows, config: RunConfig, source: str, split: str = "train") -> None:
    """Every row has the fields the task reads; in a streamed split, the first row (the rest as they come)."""
    import pyarrow.compute as pc

    whole = not streamed(rows)
    if not whole:
        rows = list(rows.take(1))
        if not rows:
            raise ValueError(f"{source}: the file holds no rows (empty data set)")
    fields = list(rows.column_names) if not isinstance(rows, list) else list(rows[0])
    label = config.data.label_field if config.task.type == "classification" else None
    for key, name in required_fields(config, split):
        if name not in fields:
            raise ValueError(f"{source}: field {name!r} ({key}) not found; the file has fields: {', '.join(fields)}")
        missing = _first(pc.is_null(column(rows, name))) if name != label else None  # a null label: check_labels
        if missing is not None:
            raise ValueError(f"{source}: field {name!r} ({key}) not found in row {missing}; the file has fields: "
                             f"{', '.join(fields)}")
    refs, output = config.data.reference_fields, config.data.output_field
    if split != "train" and refs:
        without = [pc.is_null(column(rows, f)) if f in fields else None for f in [output, *refs]]
        if without[0] is not None:
            lacking = None
            for ref in without[1:]:
                lacking = ref if lacking is None or ref is None else pc.or_(lacking, ref)
            bad = _first(pc.and_(without[0], lacking)) if lacking is not None else None
        else:
            bad = 1 if any(w is None for w in without[1:]) else _first(_any_of(without[1:]))
        if bad is not None:
            raise ValueError(f"{source}: row {bad} has neither {output!r} (data.output_field) nor every one of "
                             f"{refs} (data.reference_fields); the file has fields: {', '.join(fields)}")
    if config.data.messages_field:
        for i, msgs in enumerate(iter_column(rows, config.data.messages_field), start=1):
            if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and "role" in m and "content" in m
                                                           for m in msgs)):
                raise ValueError(f"{source}: row {i}: {config.data.messages_field!r} must be a list of "
                                 "{'role': ..., 'content': ...} messages")
            if config.task.type != "grpo" and not any(m["role"] == "assistant" for m in msgs):  # grpo: prompts
                raise ValueError(f"{source}: row {i} has no assistant message to learn from")
    if config.task.type == "classification" and whole:
        check_labels(rows, config.data.label_field, source)


def _any_of(masks: list):
    import pyarrow.compute as pc

    out = masks[0]
    for m in masks[1:]:
        out = pc.or_(out, m)
    return out


def iter_column(rows: Rows, name: str, batch: int = 4096) -> Iterator[Any]:
    """The values of one field as Python objects, a batch at a time."""
    if isinstance(rows, list):
        yield from (r.get(name) for r in rows)
        return
    col = column(rows, name)
    for start in range(0, len(col), batch):
        yield from col.slice(start, batch).to_pylist()


def check_labels(rows: Rows, field: str, source: str) -> None:
    """No empty labels, and no two labels that differ only by surrounding space (a class each, by mistake).

    Found from the label column's distinct values; the rows are named only for the values at fault."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = column(rows, field)
    problems: list[tuple[int, str]] = []  # (row, message): the first row's problem is reported
    null = _first(pc.is_null(col))
    if null is not None:
        problems.append((null, f"row {null}: labels must be strings or integers, got None"))
    kind = col.type
    if not (pa.types.is_integer(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_null(kind)):
        first = next(i for i, v in enumerate(iter_column(rows, field), start=1) if v is not None)
        got = col[first - 1].as_py()
        problems.append((first, f"row {first}: labels must be strings or integers, got {got!r}"))
    elif not pa.types.is_integer(kind):
        variants: dict[str, list[str]] = {}  # stripped label -> the labels as written
        for value in pc.unique(col).to_pylist():
            if value is not None:
                variants.setdefault(value.strip(), []).append(value)
        for key, values in variants.items():
            firsts = sorted((pc.index(col, v).as_py() + 1, v) for v in values)
            if not key:
                problems.append((firsts[0][0], f"row {firsts[0][0]}: the label ({field!r}) is empty"))
            elif len(firsts) > 1:
                (j, seen), (i, value) = firsts[:2]
                message = (f"row {i}: label {value!r} differs from {seen!r} (row {j}) only by surrounding space; "
                           "make them equal")
                problems.append((i, message))
    if problems:
        raise ValueError(f"{source}: {min(problems)[1]}")


def streamed(rows: Rows) -> bool:
    return type(rows).__name__ == "IterableDataset"


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _first_rows(rows: Rows, n: int | None) -> Rows:
    if not n:
        return rows
    if streamed(rows):
        return rows.take(n)
    if len(rows) <= n:
        return rows
    return rows.select(range(n), new_fingerprint=_fingerprint(rows._fingerprint, "first", n))


def load_splits(config: RunConfig) -> Splits:
    """Train / validation / test rows, checked; validation split off train when no file is given.

    With data.streaming the training rows are an IterableDataset read as the run goes; the validation and
    test files are small, and are read as tables."""
    d = config.data
    if d.streaming:
        check_streaming(config)
    cache = cache_dir(d.cache_dir)
    train = open_source(d.train, d.format, cache, "train", streaming=d.streaming)
    sources = {"train": _source_name(d.train)}
    check_fields(train, config, sources["train"])
    held_out: dict[str, Rows] = {split: [] for split in HELD_OUT}
    for split in HELD_OUT:  # their files are small: read as tables even when the training rows stream
        spec = getattr(d, split)
        if spec:
            held_out[split] = open_source(spec, d.format, cache, split)
            sources[split] = _source_name(spec)
            check_fields(held_out[split], config, sources[split], split)
    if not d.validation and d.validation_fraction > 0:
        train, held_out["validation"] = _split_off(train, d.validation_fraction, config.train.seed)
        sources["validation"] = f"{d.validation_fraction:g} of {sources['train']}"
    return Splits(train=_first_rows(train, d.max_train_rows),
                  validation=_first_rows(held_out["validation"], d.max_eval_rows),
                  test=_first_rows(held_out["test"], d.max_test_rows), sources=sources)


def _split_off(rows: Rows, fraction: float, seed: int) -> tuple[Rows, Rows]:
    """(kept, held out): a random ``fraction`` of the rows held out (data.validation_fraction), in file order."""
    n = len(rows)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    n_val = max(1, round(n * fraction))
    if n_val >= n:
        raise ValueError(f"data.validation_fraction={fraction} leaves no training rows ({n} rows)")
    key = (rows._fingerprint, fraction, seed)
    held = rows.select(np.sort(order[:n_val]), new_fingerprint=_fingerprint(*key, "held"))
    kept = rows.select(np.sort(order[n_val:]), new_fingerprint=_fingerprint(*key, "kept"))
    return kept, held


def check_streaming(config: RunConfig) -> None:
    """What a stream of training rows cannot do: anything that needs all of them before the first step."""
    d = config.data
    if not config.train.max_steps:
        raise ValueError("data.streaming reads the training rows as the run goes, without counting them first: set "
                         "train.max_steps")
    if d.validation_fraction:
        raise ValueError("data.streaming: data.validation_fraction cannot hold rows out of a stream; give a "
                         "validation file (data.validation)")
    if config.task.type == "classification" and d.labels is None:
        raise ValueError("data.streaming: set data.labels; the label set cannot be found without reading every "
                         "row first")
    if config.task.packing:
        raise ValueError("data.streaming: task.packing packs the whole training set at once; turn one of them off")


def label_set(config: RunConfig, splits: Splits) -> list:
    """The ordered label set; every label in every split must belong to it (a streamed training split's
    labels are checked as its rows are encoded)."""
    import pyarrow.compute as pc

    field = config.data.label_field
    if config.data.labels is not None:
        labels = list(config.data.labels)
    else:
        found = {_label_key(v): v for v in pc.unique(column(splits.train, field)).to_pylist()}
        labels = [found[k] for k in sorted(found)]
        if len(labels) < 2:
            raise ValueError(f"{splits.sources['train']}: field {field!r} has a single label value {labels}; "
                             "classification needs at least two")
    known = {str(v) for v in labels}
    for name in ("train", "validation", "test"):
        rows = getattr(splits, name)
        if isinstance(rows, list) and not rows or streamed(rows):
            continue
        unknown = sorted({str(v) for v in pc.unique(column(rows, field)).to_pylist()} - known)
        if unknown:
            what = "data.labels" if config.data.labels is not None else f"the labels of the training file ({name} " \
                   "has labels training never saw)"
            raise ValueError(f"{splits.sources[name]}: labels {unknown[:10]} are not in the label set "
                             f"{[str(v) for v in labels]} ({what})")
    return labels


def _label_key(value: int | str) -> tuple:
    # Numbers sort numerically, strings alphabetically; "2" and 2 are the same label (check_labels typed them).
    text = str(value)
    return (0, int(text), "") if text.lstrip("-").isdigit() else (1, 0, text)


# -- batching ------------------------------------------------------------------------


class RowTable(Sequence):
    """Features read a batch of rows at a time through ``rows(indices)``; an index or a slice reads through it."""

    @abstractmethod
    def rows(self, indices: Sequence[int]) -> list[dict]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.rows(range(*i.indices(len(self))))
        return self.rows([int(i)])[0]


class FeatureTable(RowTable):
    """Encoded examples in an Arrow table (what ``Task.encode_batch`` wrote through ``Dataset.map``), read a
    batch at a time: ``table[i]`` and ``table.rows(indices)`` are dicts of token id lists, as in a list of
    features, without the fields a row does not have."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset
        self._lengths: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[dict]:
        for batch in self.dataset.iter(batch_size=1024):
            yield from _row_dicts(batch)

    def rows(self, indices: Sequence[int]) -> list[dict]:
        return _row_dicts(self.dataset[[int(i) for i in indices]])

    def lengths(self) -> np.ndarray:
        if self._lengths is None:
            self._lengths = np.asarray(self.dataset.with_format("numpy")["length"])
        return self._lengths


def _row_dicts(batch: dict[str, list]) -> list[dict]:
    keys = [k for k in batch if k != "length"]
    n = len(next(iter(batch.values()))) if batch else 0
    return [{k: batch[k][i] for k in keys if batch[k][i] is not None} for i in range(n)]


def rows_at(features: Sequence[dict], indices: Sequence[int]) -> list[dict]:
    rows = getattr(features, "rows", None)
    return rows(indices) if rows is not None else [features[i] for i in indices]


def lengths_of(features: Sequence[dict]) -> np.ndarray:
    """Tokens per example (a FeatureTable stores them; nothing else is read)."""
    if hasattr(features, "lengths"):
        return features.lengths()
    return np.array([len(f["input_ids"]) for f in features], dtype=np.int64)


class StreamedFeatures:
    """A streamed training split (data.streaming): rows read, shuffled in a buffer, encoded and batched as the
    run goes. Its length is the number of rows the run reads (train.max_steps x batch_size x grad_accum):
    the stream's own is not known before it ends."""

    def __init__(self, rows, encode, n_rows: int, shuffle_buffer: int) -> None:
        self.rows, self.encode, self.n_rows, self.shuffle_buffer = rows, encode, n_rows, shuffle_buffer

    def __len__(self) -> int:
        return self.n_rows

    def batches(self, batch_size: int, seed: int, epoch: int, group_by_length: bool = True) -> Iterator[list[dict]]:
        """The epoch's batches: a pure function of (seed, epoch), as epoch_batches is. With group_by_length,
        each window of 50 batches of rows is sorted by length, cut into batches, and those shuffled."""
        stream = self.rows.shuffle(seed=seed, buffer_size=self.shuffle_buffer)
        stream.set_epoch(epoch)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        rows = iter(stream)
        while window := list(itertools.islice(rows, batch_size * 50)):
            feats = self.encode(window)
            order = sorted(range(len(feats)), key=lambda i: -len(feats[i]["input_ids"])) if group_by_length \
                else list(range(len(feats)))
            cut = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
            perm = torch.randperm(len(cut), generator=gen).tolist() if group_by_length else range(len(cut))
            for i in perm:
                yield [feats[j] for j in cut[i]]


def train_batches(features, batch_size: int, seed: int, epoch: int, group_by_length: bool = True,
                  skip: int = 0) -> Iterator[list[dict]]:
    """The rows of each of the epoch's batches after the first ``skip`` (a resumed epoch), read as needed."""
    if isinstance(features, StreamedFeatures):
        yield from itertools.islice(features.batches(batch_size, seed, epoch, group_by_length), skip, None)
        return
    for idx in epoch_batches(lengths_of(features), batch_size, seed, epoch, group_by_length)[skip:]:
        yield rows_at(features, idx)


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                  group_by_length: bool = True) -> list[list[int]]:
    """The batches (lists of row indices) of one epoch: a pure function of (seed, epoch).

    With ``group_by_length``, rows are shuffled, cut into mega-batches of 50
    batches, sorted by length inside each (so a batch holds similar lengths and
    pads little), and the batches are shuffled again. Resuming recomputes the
    same list and skips the batches already done.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=gen)
    if group_by_length:
        # a stable sort by (mega-batch, longest first): tensors, as a million rows would be slow in Python
        by_length = torch.sort(-torch.as_tensor(np.asarray(lengths), dtype=torch.long)[order], stable=True).indices
        mega = torch.arange(len(order)) // (batch_size * 50)
        order = order[by_length[torch.sort(mega[by_length], stable=True).indices]]
    flat = order.tolist()
    batches = [flat[i:i + batch_size] for i in range(0, len(flat), batch_size)]
    if not group_by_length:
        return batches
    perm = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in perm]


def eval_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Longest first, so the padding per batch is small and memory peaks at once: at most ``batch_size`` rows
    and ``max_tokens`` padded tokens (rows x the batch's first, longest row) a batch, one row at least."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and (max_tokens is None or (len(last) + 1) * lengths[last[0]] <= max_tokens):
            last.append(i)
        else:
            batches.append([i])
    return batches


def steps_per_epoch(n_rows: int, batch_size: int, grad_accum: int) -> int:
    return math.ceil(math.ceil(n_rows / batch_size) / grad_accum)
