"""The adapters a server holds: loaded on demand from a directory, evicted when over capacity.

Every subdirectory ``DIR/<name>`` holding a PEFT adapter is adapter ``name``.

- A request *acquires* an adapter (loading it if needed) and *releases* it when
  its batch is done. What it acquired stays attached until then, even if the
  adapter is reloaded, unloaded or evicted meanwhile: each load attaches a new
  version under a model-internal name (``v<N>``), and an old version is
  detached when its last request releases it.
- Reading and checking the files (the slow part) happens without any lock;
  only attaching the new factors and copying the weights into them holds the
  model lock, which is what requests for other adapters can wait for.
- Least recently used adapters are evicted above ``max_adapters`` or
  ``max_bytes``; pinned adapters never are.
- On acquire, a changed ``(size, mtime)`` of the files triggers a content hash
  (SHA-256); a different hash reloads the adapter.
- A classifier head (linear ``modules_to_save`` copy) gets the number of outputs
  stored in the file, so adapters for 2 and 4 classes share one base model;
  ``Entry.head`` records such differences from the base model's modules, and only
  requests with equal ``head`` can share a batched forward.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import lorafit
from lorafit.batched import param_shapes
from lorafit.io import CONFIG_NAME, WEIGHTS_NAME, _check_tensors, _fit_head_sizes, _without_base_copies, peft_key
from lorafit.model import saved_modules

NAME = re.compile(r"[A-Za-z0-9._-]+")


class AdapterNotFound(KeyError):
    """No such adapter in the adapter directory (HTTP 404)."""


class BadAdapter(ValueError):
    """The adapter's files are unreadable or do not fit the base model (HTTP 400)."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name) or name in (".", "..") or len(name) > 200:
        raise ValueError(f"adapter names are 1-200 characters of [A-Za-z0-9._-] (not '.' or '..'), got {name!r}")
    return name


@dataclass
class Entry:
    """One loaded version of an adapter."""

    name: str
    internal: str  # its name inside the model
    digest: str
    signature: tuple
    rank: int
    nbytes: int
    labels: list[str] | None = None
    head: tuple = ()  # (module, parameter shapes) of its modules_to_save copies shaped unlike the base's
    pinned: bool = False
    refs: int = 0
    retired: bool = False  # unloaded, evicted or replaced: detach when refs reaches 0
    loaded_at: float = field(default_factory=time.time)


class AdapterRegistry:
    def __init__(self, model: nn.Module, root: str | Path, *, max_adapters: int | None = None,
                 max_bytes: int | None = None, model_lock: threading.Lock | None = None) -> None:
        self.model = model
        self.root = Path(root).resolve()
        self.max_adapters = max_adapters
        self.max_bytes = max_bytes
        self.model_lock = model_lock or threading.Lock()  # held by forwards and by attach + copy
        self._lock = threading.Lock()  # the tables below
        self._loaded: OrderedDict[str, Entry] = OrderedDict()  # LRU order: oldest first
        self._pinned: set[str] = set()
        self._loading: dict[str, threading.Lock] = {}
        self._counter = itertools.count(1)
        self.hits: dict[str, int] = {}
        self.stats = {"loads": 0, "reloads": 0, "evictions": 0, "unloads": 0, "load_seconds": 0.0}

    # -- paths -----------------------------------------------------------------
    def path(self, name: str) -> Path:
        """The adapter's directory, refusing names that would leave the adapter directory."""
        check_name(name)
        path = (self.root / name).resolve()
        if path.parent != self.root:
            raise ValueError(f"adapter {name!r} resolves outside the adapter directory")
        return path

    def available(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if NAME.fullmatch(p.name) and (p / CONFIG_NAME).is_file() and p.resolve().parent == self.root)

    def _signature(self, path: Path) -> tuple:
        try:
            stats = [(path / f).stat() for f in (CONFIG_NAME, WEIGHTS_NAME)]
        except FileNotFoundError:
            return ()
        return tuple((s.st_size, s.st_mtime_ns, s.st_ino) for s in stats)

    # -- requests ----------------------------------------------------------------
    def acquire(self, name: str) -> Entry:
        """The current version of ``name``, loaded if needed; call ``release`` when done with it."""
        path = self.path(name)
        with self._lock:
            entry = self._loaded.get(name)
            if entry is not None and entry.signature == self._signature(path):
                return self._take(entry)
        return self.load(name, only_if_changed=True, take=True)

    def _take(self, entry: Entry) -> Entry:
        entry.refs += 1
        self.hits[entry.name] = self.hits.get(entry.name, 0) + 1
        if not entry.retired:
            self._loaded.move_to_end(entry.name)
        return entry

    def release(self, entry: Entry) -> None:
        with self._lock:
            entry.refs -= 1
            drop = entry.retired and entry.refs == 0
        if drop:
            self._detach(entry)

    # -- loading -----------------------------------------------------------------
    def load(self, name: str, *, pin: bool | None = None, only_if_changed: bool = False,
             take: bool = False) -> Entry:
        """Load (or reload) adapter ``name`` from its directory. Returns the current version
        (acquired for the caller if ``take``, atomically with its insertion so eviction cannot race)."""
        path = self.path(name)
        if not path.is_dir():
            raise AdapterNotFound(f"no adapter {name!r} in {self.root}")
        with self._lock:
            gate = self._loading.setdefault(name, threading.Lock())
        with gate:  # one load per name at a time; other names load in parallel
            signature = self._signature(path)
            with self._lock:
                old = self._loaded.get(name)
                if pin is not None:
                    (self._pinned.add if pin else self._pinned.discard)(name)
                    if old is not None:
                        old.pinned = pin
            if old is not None and only_if_changed and old.signature == signature:
                with self._lock:
                    if not old.retired:
                        return self._take(old) if take else old
            started = time.perf_counter()
            try:
                config, tensors = lorafit.read_adapter(path)
            except (OSError, ValueError) as exc:
                raise BadAdapter(f"adapter {name!r}: {exc}") from None
            digest = _digest(path)
            if old is not None and old.digest == digest:
                with self._lock:
                    if not old.retired:
                        old.signature = signature
                        return self._take(old) if take else old
            internal = f"v{next(self._counter)}"
            labels = _labels(path)
            with self.model_lock:
                self._attach(path, internal, config, tensors)
                head = _head(self.model, internal)
            entry = Entry(name=name, internal=internal, digest=digest, signature=signature, rank=config.r,
                          nbytes=sum(t.numel() * t.element_size() for t in tensors.values()), labels=labels,
                          head=head, pinned=name in self._pinned)
            with self._lock:
                previous = self._loaded.pop(name, None)
                self._loaded[name] = entry
                self.stats["reloads" if previous is not None else "loads"] += 1
                self.stats["load_seconds"] += time.perf_counter() - started
                victims = ([previous] if previous is not None else []) + self._over_capacity(keep=name)
                for victim in victims:
                    victim.retired = True
                    if victim is not previous:
                        del self._loaded[victim.name]
                        self.stats["evictions"] += 1
                drop = [v for v in victims if v.refs == 0]
                if take:
                    self._take(entry)
            for victim in drop:
                self._detach(victim)
            return entry

    def _attach(self, path: Path, internal: str, config, tensors: dict[str, torch.Tensor]) -> None:
        """Attach the factors and copy the weights in: the only part that holds the model lock."""
        model = self.model
        try:
            lorafit.attach(model, config, internal, activate=False, trainable=False)
        except (ValueError, KeyError) as exc:
            raise BadAdapter(f"adapter {path.name!r} does not fit the base model: {exc}") from None
        try:
            _fit_head_sizes(model, internal, tensors, trainable=False)
            expected = {peft_key(k, internal): p for k, p in lorafit.adapter_parameters(model, internal).items()}
            found = _without_base_copies(path / WEIGHTS_NAME, model, expected, tensors)
            _check_tensors(path / WEIGHTS_NAME, expected, found)
            with torch.no_grad():
                for key, param in expected.items():
                    param.copy_(found[key])
        except ValueError as exc:
            lorafit.detach(model, internal)
            raise BadAdapter(f"adapter {path.name!r}: {exc}") from None
        except BaseException:
            lorafit.detach(model, internal)
            raise

    def _over_capacity(self, keep: str) -> list[Entry]:
        """Least recently used unpinned adapters to evict (called with ``_lock`` held)."""
        victims = []
        count = len(self._loaded)
        size = sum(e.nbytes for e in self._loaded.values())
        for entry in list(self._loaded.values()):
            over = (self.max_adapters is not None and count > self.max_adapters) or (
                self.max_bytes is not None and size > self.max_bytes)
            if not over:
                break
            if entry.pinned or entry.name == keep:
                continue
            victims.append(entry)
            count -= 1
            size -= entry.nbytes
        return victims

    def _detach(self, entry: Entry) -> None:
        with self.model_lock:
            if entry.internal in lorafit.adapter_configs(self.model):
                lorafit.detach(self.model, entry.internal)

    def unload(self, name: str) -> bool:
        """Forget ``name`` (detached once in-flight requests are done). False if it was not loaded."""
        check_name(name)
        with self._lock:
            entry = self._loaded.pop(name, None)
            self._pinned.discard(name)
            if entry is None:
                return False
            entry.retired = True
            self.stats["unloads"] += 1
            drop = entry.refs == 0
        if drop:
            self._detach(entry)
        return True

    # -- reporting ---------------------------------------------------------------
    def loaded(self) -> list[Entry]:
        with self._lock:
            return list(self._loaded.values())

    def describe(self) -> list[dict]:
        """Every adapter in the directory or in memory: name, rank, size, loaded, pinned, hits."""
        with self._lock:
            loaded = dict(self._loaded)
            hits = dict(self.hits)
        rows = []
        for name in sorted(set(self.available()) | set(loaded)):
            entry = loaded.get(name)
            if entry is not None:
                rank, size = entry.rank, entry.nbytes
            else:
                rank, size = _peek(self.root / name)
            rows.append({"name": name, "rank": rank, "size_bytes": size, "loaded": entry is not None,
                         "pinned": bool(entry and entry.pinned), "hits": hits.get(name, 0)})
        return rows

    def bytes_loaded(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._loaded.values())


def _head(model: nn.Module, internal: str) -> tuple:
    """The modules_to_save copies of adapter ``internal`` whose parameters are shaped unlike the
    base model's module (a 4-class head on a 2-class base), as ``((module, shapes), ...)``."""
    return tuple((path, param_shapes(w.modules_to_save[internal])) for path, w in saved_modules(model)
                 if internal in w.adapter_names
                 and param_shapes(w.modules_to_save[internal]) != param_shapes(w.original_module))


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in (CONFIG_NAME, WEIGHTS_NAME):
        with open(path / f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _labels(path: Path) -> list[str] | None:
    """Optional ``labels.json`` beside an adapter: the class names of its classifier head."""
    import json

    f = path / "labels.json"
    if not f.is_file():
        return None
    try:
        labels = json.loads(f.read_text())
    except ValueError as exc:
        raise BadAdapter(f"{f} is not valid JSON: {exc}") from None
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise BadAdapter(f"{f} must hold a JSON list of label names")
    return labels


def _peek(path: Path) -> tuple[int | None, int | None]:
    """Rank and weight-file size of an adapter that is not loaded (without reading the weights)."""
    try:
        config = lorafit.LoraConfig.load(path / CONFIG_NAME)
        return config.r, (path / WEIGHTS_NAME).stat().st_size
    except (OSError, ValueError):
        return None, None
