"""Where rows come from: local JSONL / JSON / CSV / TSV / Parquet files and Hugging Face hub data sets, read
through `datasets` into Arrow tables that are memory-mapped from its cache, never whole-file Python lists.

Parquet files and hub names go through ``datasets.load_dataset``. JSONL, JSON and CSV/TSV files are read by the
readers below, row by row, into ``Dataset.from_generator``: Python's ``csv`` and ``json`` modules split lines
where those formats do (not at U+0085, U+2028 or a form feed inside a field), read UTF-8 with or without a
byte-order mark, and name the file and line of every problem. The Arrow copy is keyed by the file's path, size
and modification time, so an unchanged file is read once.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorafit.train.config import expand_path

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
            ".parquet": "parquet"}
_READER_VERSION = 1  # part of the Arrow copy's cache key: bump when the readers change what they yield


class DataFileError(ValueError):
    """A problem in a data file the user can fix; raised from inside `datasets`' generator and unwrapped."""


def cache_dir(configured: str | None = None) -> Path:
    """data.cache_dir, else $HF_DATASETS_CACHE, else ~/.cache/lorafit/datasets: never the data's own directory."""
    if configured:
        return expand_path(configured)
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"]).expanduser()
    return Path.home() / ".cache" / "lorafit" / "datasets"


def is_hub_name(text: str) -> bool:
    """'owner/name' (optionally ':split'): not a path a user would write for a local file."""
    name = text.partition(":")[0] if not text.startswith(("/", ".", "~", "$")) else ""
    return (name.count("/") == 1 and Path(name).suffix.lower() not in SUFFIXES and not Path(name).exists()
            and all(part and not part.startswith(".") for part in name.split("/")))


def open_source(spec: str, fmt: str, cache: Path, split: str, streaming: bool = False):
    """The rows of one data file or hub split as a ``datasets.Dataset`` (an ``IterableDataset`` when
    ``streaming``). ``split`` names the hub split read when ``spec`` is 'owner/name' without ':split'."""
    import datasets

    if not sys.stderr.isatty():  # progress bars would garble captured or logged error output
        datasets.disable_progress_bars()
    path = expand_path(spec)
    if not path.is_file() and is_hub_name(spec):
        return _open_hub(spec, cache, split, streaming)
    if not path.is_file():
        hint = "" if path.parent.is_dir() else f" (directory {str(path.parent)!r} does not exist either)"
        raise FileNotFoundError(f"data file {str(path)!r} does not exist{hint}")
    fmt = format_of(path, fmt)
    if fmt == "parquet":
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(cache),
                                   streaming=streaming)
        if not streaming and len(ds) == 0:
            raise ValueError(f"{path}: the file holds no rows (empty data set)")
        return ds
    stat = path.stat()
    kwargs: dict[str, Any] = {"path": str(path.resolve()), "fmt": fmt, "size": stat.st_size,
                              "mtime_ns": stat.st_mtime_ns, "version": _READER_VERSION, "as_text": ()}
    if streaming:
        return datasets.IterableDataset.from_generator(read_file, gen_kwargs=kwargs)
    # A field with values of several types (a label 0 in one row, "1" in another) is kept as text: an Arrow
    # column has one type, and "1" and 1 are the same label anyway. `datasets` would store it as JSON text.
    try:
        ds = _from_generator(kwargs, cache)
        kwargs["as_text"] = tuple(k for k, f in ds.features.items() if type(f).__name__ == "Json")
    except _MixedTypes:
        ds, kwargs["as_text"] = None, tuple(sorted(mixed_fields(path, fmt))) or ("",)
    if not kwargs["as_text"]:
        return ds
    try:
        return _from_generator(kwargs, cache)
    except _MixedTypes as exc:
        raise ValueError(f"{path}: the rows cannot be stored as one table ({exc}); give every row's field "
                         "the same type") from None


class _MixedTypes(Exception):
    pass


def _from_generator(kwargs: dict, cache: Path):
    import datasets

    try:
        return datasets.Dataset.from_generator(read_file, gen_kwargs=kwargs, cache_dir=str(cache))
    except datasets.exceptions.DatasetGenerationError as exc:
        cause = exc.__cause__
        if isinstance(cause, (DataFileError, FileNotFoundError)):
            raise cause from None
        raise _MixedTypes(str(cause or exc)) from None


def _open_hub(name: str, cache: Path, split: str, streaming: bool):
    import datasets

    repo, _, chosen = name.partition(":")
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    try:
        return datasets.load_dataset(repo, split=chosen or split, cache_dir=str(cache), streaming=streaming)
    except Exception as exc:  # noqa: BLE001 - connection, repository or split missing: one message for all
        why = ("; reading a hub data set needs a network connection and HF_HUB_OFFLINE is set (and it is not in "
               f"the cache {str(cache)!r})") if offline else f" ({' '.join(str(exc).split())[:300]})"
        raise ValueError(f"{name!r} is not a local file and could not be loaded as a Hugging Face hub data set "
                         f"(split {chosen or split!r}){why}") from None


def format_of(path: Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{path}: cannot tell the format from the extension {suffix!r}; use .jsonl, .json, .csv, "
                         ".tsv or .parquet, or set data.format")
    return SUFFIXES[suffix]


# -- the readers: generators of rows ------------------------------------------------------------------------


def read_file(path: str, fmt: str, as_text: tuple[str, ...] = (), **_identity: Any) -> Iterator[dict]:
    """The rows of a JSONL / JSON / CSV / TSV file, one dict at a time; ``as_text`` fields as strings.

    The keyword arguments after ``as_text`` only identify the file's version for the cache."""
    p = Path(path)
    n = 0
    # utf-8-sig: a byte-order mark, if any, is not part of the first field name. Lines end at "\n" only
    # (JSONL) or where the csv module says (newline=""): str.splitlines() would also cut at U+0085, U+2028
    # or a form feed, which are legal inside a CSV field or a JSON string.
    try:
        with open(p, encoding="utf-8-sig", newline="" if fmt in ("csv", "tsv") else "\n") as fh:
            rows = _csv_rows(p, fh, "," if fmt == "csv" else "\t") if fmt in ("csv", "tsv") else _json_rows(p, fh)
            for row in rows:
                n += 1
                for field in as_text:
                    value = row.get(field)
                    if value is not None and not isinstance(value, str):
                        row[field] = json.dumps(value, ensure_ascii=False)
                yield row
    except UnicodeDecodeError:
        raise decode_error(p) from None
    if not n:
        raise DataFileError(f"{p}: the file holds no rows (empty data set)")


def _csv_rows(path: Path, fh, delimiter: str) -> Iterator[dict]:
    reader = csv.DictReader(fh, delimiter=delimiter)
    try:
        for row in reader:
            if None in row or any(v is None for v in row.values()):
                raise DataFileError(f"{path}:{reader.line_num}: the row has a different number of columns than "
                                    f"the header ({', '.join(reader.fieldnames or [])})")
            yield row
    except csv.Error as exc:
        raise DataFileError(f"{path}:{reader.line_num}: not valid {'CSV' if delimiter == ',' else 'TSV'} ({exc})") \
            from None


def _json_rows(path: Path, fh) -> Iterator[dict]:
    first, skipped = fh.read(1), 0
    while first and first.isspace():
        skipped += first == "\n"
        first = fh.read(1)
    if first == "[":  # one JSON array (a .json file): parsed whole, as the format requires
        try:
            rows = json.loads(first + fh.read())
        except json.JSONDecodeError as exc:
            raise DataFileError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(rows, list):
            raise DataFileError(f"{path}: not a JSON array of objects")
        for i, row in enumerate(rows, start=1):
            yield _object(path, row, f"row {i}")
        return
    # JSON Lines; the first line lost the characters read above, and carriage returns end lines too
    for i, line in enumerate(fh, start=1 + skipped):
        if i == 1 + skipped:
            line = first + line
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFileError(f"{path}:{i}: not valid JSON ({exc.msg})") from None
        yield _object(path, row, f"row {i}")


def _object(path: Path, row: Any, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataFileError(f"{path}: {where} is a {type(row).__name__}; every row must be a JSON object")
    return row


def mixed_fields(path: Path, fmt: str) -> set[str]:
    """Top-level fields whose values have more than one JSON type (null aside)."""
    kinds: dict[str, set[type]] = {}
    for row in read_file(str(path), fmt):
        for key, value in row.items():
            if value is not None:
                kinds.setdefault(key, set()).add(type(value))
    return {k for k, v in kinds.items() if len(v) > 1}


def decode_error(path: Path) -> DataFileError:
    """Where the first byte that is not UTF-8 is (the text decoder only knows its buffer's offset); read in
    blocks, so a large file costs no more memory than a small one."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with open(path, "rb") as fh:
        block = fh.read(1 << 20).removeprefix(codecs.BOM_UTF8)
        while block:
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                line += exc.object.count(b"\n", 0, exc.start)
                return DataFileError(f"{path}:{line}: byte 0x{exc.object[exc.start]:02x} is not UTF-8; data files "
                                     "must be UTF-8 (with or without a byte-order mark): convert it, e.g. a Latin-1 "
                                     "file with `iconv -f latin1 -t utf-8`")
            line += block.count(b"\n")
            block = fh.read(1 << 20)
    return DataFileError(f"{path}: not UTF-8 text")  # it changed since it failed to decode
