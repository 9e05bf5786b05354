"""Reading data files, checking fields and labels, splitting, and batching.

Rows are plain dicts. Files are JSON Lines (``.jsonl``; a ``.json`` file holding
one JSON array works too), CSV or TSV (first line: column names). Every problem
a user can fix is a ``ValueError`` / ``FileNotFoundError`` naming the file.
"""

from __future__ import annotations

import codecs
import csv
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from lorafit.train.config import RunConfig, expand_path


@dataclass
class Splits:
    train: list[dict]
    validation: list[dict]
    test: list[dict]
    sources: dict[str, str]  # split -> where its rows came from


def read_rows(path: str | Path, fmt: str = "auto") -> list[dict]:
    path = Path(path)
    if not path.is_file():
        hint = "" if path.parent.is_dir() else f" (directory {str(path.parent)!r} does not exist either)"
        raise FileNotFoundError(f"data file {str(path)!r} does not exist{hint}")
    if fmt == "auto":
        suffix = path.suffix.lower()
        fmt = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv"}.get(suffix, "")
        if not fmt:
            raise ValueError(f"{path}: cannot tell the format from the extension {suffix!r}; use .jsonl, .csv or "
                             ".tsv, or set data.format")
    # utf-8-sig: a byte-order mark, if any, is not part of the first field name. Lines end at "\n" only
    # (JSONL) or where the csv module says (newline=""): str.splitlines() would also cut at U+0085, U+2028
    # or a form feed, which are legal inside a CSV field or a JSON string.
    try:
        with open(path, encoding="utf-8-sig", newline="\n" if fmt == "jsonl" else "") as fh:
            rows = _read_json(path, fh) if fmt == "jsonl" else _read_csv(path, fh, "," if fmt == "csv" else "\t")
    except UnicodeDecodeError:
        raise _decode_error(path) from None
    if not rows:
        raise ValueError(f"{path}: the file holds no rows (empty data set)")
    return rows


def _read_csv(path: Path, fh: TextIO, delimiter: str) -> list[dict]:
    reader = csv.DictReader(fh, delimiter=delimiter)
    rows = []
    try:
        for row in reader:
            if None in row or any(v is None for v in row.values()):
                raise ValueError(f"{path}:{reader.line_num}: the row has a different number of columns than the "
                                 f"header ({', '.join(reader.fieldnames or [])})")
            rows.append(row)
    except csv.Error as exc:
        raise ValueError(f"{path}:{reader.line_num}: not valid {'CSV' if delimiter == ',' else 'TSV'} ({exc})") \
            from None
    return rows


def _read_json(path: Path, fh: TextIO) -> list[dict]:
    lines: Iterable[str] = fh
    if path.suffix.lower() == ".json":
        text = fh.read()
        if text.lstrip().startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not valid JSON ({exc})") from None
            lines = ()
        else:
            lines, rows = text.split("\n"), []
    else:
        rows = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{i}: not valid JSON ({exc.msg})") from None
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {i} is a {type(row).__name__}; every row must be a JSON object")
    return rows


def _decode_error(path: Path) -> ValueError:
    """Where the first byte that is not UTF-8 is: the decoder of a text file only knows its buffer's offset."""
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        return ValueError(f"{path}:{line}: byte 0x{data[exc.start]:02x} is not UTF-8; data files must be UTF-8 "
                          "(with or without a byte-order mark): convert it, e.g. a Latin-1 file with "
                          "`iconv -f latin1 -t utf-8`")
    return ValueError(f"{path}: not UTF-8 text")  # it changed since it failed to decode


def required_fields(config: RunConfig, split: str = "train") -> list[tuple[str, str]]:
    """(config key, field name) pairs every row of ``split`` must have."""
    d, task = config.data, config.task.type
    if task == "classification":
        pairs = [("data.text_field", d.text_field), ("data.label_field", d.label_field)]
        if d.text_pair_field:
            pairs.append(("data.text_pair_field", d.text_pair_field))
        return pairs
    if d.messages_field:
        return [("data.messages_field", d.messages_field)]
    # evaluation rows may carry data.reference_fields instead of the output field (check_fields)
    pairs = [] if split != "train" and d.reference_fields else [("data.output_field", d.output_field)]
    for key in ("instruction_field", "input_field"):
        if getattr(d, key):
            pairs.append((f"data.{key}", getattr(d, key)))
    if not any(key in ("data.instruction_field", "data.input_field") for key, _ in pairs) and not d.instruction:
        raise ValueError("data: a generation task needs data.instruction_field or data.input_field (the prompt), "
                         "or data.messages_field")
    return pairs


def check_fields(rows: list[dict], config: RunConfig, source: str, split: str = "train") -> None:
    fields = list(rows[0])
    for key, name in required_fields(config, split):
        missing = next((i for i, row in enumerate(rows, start=1) if name not in row), None)
        if missing is not None:
            where = "" if missing == 1 else f" in row {missing}"
            raise ValueError(f"{source}: field {name!r} ({key}) not found{where}; the file has fields: "
                             f"{', '.join(fields)}")
    refs, output = config.data.reference_fields, config.data.output_field
    if split != "train" and refs:
        for i, row in enumerate(rows, start=1):
            if output not in row and not all(f in row for f in refs):
                raise ValueError(f"{source}: row {i} has neither {output!r} (data.output_field) nor every one of "
                                 f"{refs} (data.reference_fields); the file has fields: {', '.join(fields)}")
    if config.data.messages_field:
        for i, row in enumerate(rows, start=1):
            msgs = row[config.data.messages_field]
            if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and "role" in m and "content" in m
                                                           for m in msgs)):
                raise ValueError(f"{source}: row {i}: {config.data.messages_field!r} must be a list of "
                                 "{'role': ..., 'content': ...} messages")
            if not any(m["role"] == "assistant" for m in msgs):
                raise ValueError(f"{source}: row {i} has no assistant message to learn from")
    if config.task.type == "classification":
        check_labels(rows, config.data.label_field, source)


def check_labels(rows: list[dict], field: str, source: str) -> None:
    """No empty labels, and no two labels that differ only by surrounding space (a class each, by mistake)."""
    first_row: dict[str, tuple[int, Any]] = {}  # stripped label -> (row, label as written)
    for i, row in enumerate(rows, start=1):
        value = row[field]
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"{source}: row {i}: labels must be strings or integers, got {value!r}")
        key = str(value).strip()
        if not key:
            raise ValueError(f"{source}: row {i}: the label ({field!r}) is empty")
        j, seen = first_row.setdefault(key, (i, value))
        if str(seen) != str(value):
            raise ValueError(f"{source}: row {i}: label {value!r} differs from {seen!r} (row {j}) only by "
                             "surrounding space; make them equal")


def load_splits(config: RunConfig) -> Splits:
    """Train / validation / test rows, checked; validation split off train when no file is given."""
    d = config.data
    train_path = expand_path(d.train)
    train = read_rows(train_path, d.format)
    check_fields(train, config, str(train_path))
    sources = {"train": str(train_path)}
    validation: list[dict] = []
    if d.validation:
        path = expand_path(d.validation)
        validation = read_rows(path, d.format)
        check_fields(validation, config, str(path), "validation")
        sources["validation"] = str(path)
    elif d.validation_fraction > 0:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.train.seed)).tolist()
        n_val = max(1, round(len(train) * d.validation_fraction))
        if n_val >= len(train):
            raise ValueError(f"data.validation_fraction={d.validation_fraction} leaves no training rows "
                             f"({len(train)} rows)")
        held = set(order[:n_val])
        validation = [r for i, r in enumerate(train) if i in held]
        train = [r for i, r in enumerate(train) if i not in held]
        sources["validation"] = f"{d.validation_fraction:g} of {train_path}"
    test: list[dict] = []
    if d.test:
        path = expand_path(d.test)
        test = read_rows(path, d.format)
        check_fields(test, config, str(path), "test")
        sources["test"] = str(path)
    train = train[: d.max_train_rows] if d.max_train_rows else train
    validation = validation[: d.max_eval_rows] if d.max_eval_rows else validation
    test = test[: d.max_test_rows] if d.max_test_rows else test
    return Splits(train=train, validation=validation, test=test, sources=sources)


def label_set(config: RunConfig, splits: Splits) -> list:
    """The ordered label set; every label in every split must belong to it."""
    field = config.data.label_field
    if config.data.labels is not None:
        labels = list(config.data.labels)
    else:
        found = {_label_key(r[field]): r[field] for r in splits.train}
        labels = [found[k] for k in sorted(found)]
        if len(labels) < 2:
            raise ValueError(f"{splits.sources['train']}: field {field!r} has a single label value {labels}; "
                             "classification needs at least two")
    known = {str(v) for v in labels}
    for name in ("train", "validation", "test"):
        rows = getattr(splits, name)
        unknown = sorted({str(r[field]) for r in rows} - known)
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


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                  group_by_length: bool = True) -> list[list[int]]:
    """The batches (lists of row indices) of one epoch: a pure function of (seed, epoch).

    With ``group_by_length``, rows are shuffled, cut into mega-batches of 50
    batches, sorted by length inside each (so a batch holds similar lengths and
    pads little), and the batches are shuffled again. Resuming recomputes the
    same list and skips the batches already done.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=gen).tolist()
    if not group_by_length:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    mega = batch_size * 50
    batches: list[list[int]] = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start:start + mega], key=lambda i: -lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
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
