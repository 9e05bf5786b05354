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
- Each load reads the adapter's files once into memory and hashes and parses those
  same bytes, so a version's hash always describes its weights, and a file rewritten
  in place meanwhile cannot crash the process (no memory map). Files that change
  while they are read are read again; if they change during every read, the load
  fails as a copy in progress does.
- On acquire, a changed ``(size, mtime, inode)`` of the files (``labels.json``
  included) triggers a content hash (SHA-256); a different hash reloads the adapter.
  If the new files do not load (a copy still in progress), requests keep the last
  good version; the failure is logged and counted, and the next change tries again.
- A classifier head (linear ``modules_to_save`` copy) gets the number of outputs
  stored in the file, so adapters for 2 and 4 classes share one base model;
  ``Entry.head`` records such differences from the base model's modules, and only
  requests with equal ``head`` can share a batched forward.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

import lorafit
from lorafit.batched import param_shapes
from lorafit.config import modifies_base_weight
from lorafit.io import CONFIG_NAME, LABELS_NAME, WEIGHTS_NAME, adapter_rank, parse_labels
from lorafit.model import adapter_parameters, saved_modules

NAME = re.compile(r"[A-Za-z0-9._-]+")
FILES = (CONFIG_NAME, WEIGHTS_NAME, LABELS_NAME)
# File times come from a coarse clock (milliseconds; seconds on some file systems): a write in the
# same tick as a look leaves them unchanged. Files changed this recently are compared by content.
SETTLE_NS = 2_000_000_000
READ_ATTEMPTS = 3  # reads of an adapter's files before a change during each of them fails the load
log = logging.getLogger("lorafit.serve")


class AdapterError(Exception):
    """A request for an adapter that cannot be served; the HTTP layer maps each kind to a status."""


class AdapterNotFound(AdapterError, KeyError):
    """No such adapter in the adapter directory (HTTP 404)."""

    def __str__(self) -> str:
        return str(self.args[0])  # not KeyError's repr


class BadAdapter(AdapterError, ValueError):
    """The adapter's files are unreadable or do not fit the base model (HTTP 400)."""


class BadName(AdapterError, ValueError):
    """Not a valid adapter name, or one that leads out of the adapter directory (HTTP 422)."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name) or name in (".", "..") or len(name) > 200:
        raise BadName(f"adapter names are 1-200 characters of [A-Za-z0-9._-] (not '.' or '..'), got {name!r}")
    return name


@dataclass
class Entry:
    """One loaded version of an adapter."""

    name: str
    internal: str  # its name inside the model
    digest: str
    signature: tuple | None  # the files' state last looked at; None: compare by content next time
    rank: int
    nbytes: int
    labels: list[str] | None = None
    head: tuple = ()  # (module, parameter shapes) of its modules_to_save copies shaped unlike the base's
    pinned: bool = False
    refs: int = 0
    retired: bool = False  # unloaded, evicted or replaced: detach when refs reaches 0
    loaded_at: float = field(default_factory=time.time)


class FairLock:
    """A lock granted in the order it was asked for. The batch worker takes the model lock again right
    after each batch; with a plain lock a load waiting to attach (or a version waiting to be detached)
    could wait through batch after batch: under eviction churn on a busy 2-core machine it waited 0.36 s
    at the median and 2.8 s at most, with no cap. In turn, it waits for one batch at most."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self.tickets = 0  # handed out so far
        self._serving = 0

    def acquire(self) -> None:
        with self._cond:
            ticket, self.tickets = self.tickets, self.tickets + 1
            self._cond.wait_for(lambda: self._serving == ticket)

    def release(self) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class AdapterRegistry:
    def __init__(self, model: nn.Module, root: str | Path, *, max_adapters: int | None = None,
                 max_bytes: int | None = None, model_lock: FairLock | threading.Lock | None = None) -> None:
        self.model = model
        self.root = Path(root).resolve()
        self.max_adapters = max_adapters
        self.max_bytes = max_bytes
        self.model_lock = model_lock or FairLock()  # held by forwards and by attach + copy, in turn
        self._lock = threading.Lock()  # the tables below
        self._loaded: OrderedDict[str, Entry] = OrderedDict()  # LRU order: oldest first
        self._loading: dict[str, threading.Lock] = {}
        self._counter = itertools.count(1)
        self.hits: dict[str, int] = {}
        self.stats = {"loads": 0, "reloads": 0, "evictions": 0, "unloads": 0, "load_failures": 0,
                      "load_seconds": 0.0}

    # -- paths -----------------------------------------------------------------
    def path(self, name: str) -> Path:
        """The adapter's directory, refusing names that would leave the adapter directory."""
        check_name(name)
        path = (self.root / name).resolve()
        if path.parent != self.root:
            raise BadName(f"adapter {name!r} resolves outside the adapter directory")
        return path

    def available(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if NAME.fullmatch(p.name) and (p / CONFIG_NAME).is_file() and p.resolve().parent == self.root)

    def _signature(self, path: Path) -> tuple | None:
        """(size, mtime, inode) of each file (None if missing); None if one changed too recently to tell."""
        now, signature = time.time_ns(), _file_states(path)
        if any(s is not None and now - s[1] < SETTLE_NS for s in signature):
            return None
        return signature

    # -- requests ----------------------------------------------------------------
    def acquire(self, name: str) -> Entry:
        """The current version of ``name``, loaded if needed; call ``release`` when done with it."""
        signature = self._signature(self.path(name))
        with self._lock:
            entry = self._loaded.get(name)
            if entry is not None and signature is not None and entry.signature == signature:
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
        (acquired for the caller if ``take``, atomically with its insertion so eviction cannot race).

        With ``only_if_changed`` (a request's change check), files that fail to load leave the
        loaded version in service; otherwise (an explicit load) the failure is raised."""
        path = self.path(name)
        if not path.is_dir():
            raise AdapterNotFound(f"no adapter {name!r} in the adapter directory")
        with self._lock:
            gate = self._loading.setdefault(name, threading.Lock())
        with gate:  # one load per name at a time; other names load in parallel
            signature = self._signature(path)  # before reading: a change during the read is seen next time
            with self._lock:
                old = self._loaded.get(name)
                if old is not None and old.retired:
                    old = None
            if (old is not None and only_if_changed and signature is not None and old.signature == signature
                    and (kept := self._keep(old, signature, pin, take)) is not None):
                return kept
            started = time.perf_counter()
            try:
                files = self._read(name, path)
                digest = hashlib.sha256(b"".join(hashlib.sha256(f or b"").digest() for f in files)).hexdigest()
                if old is not None and old.digest == digest and (kept := self._keep(old, signature, pin, take)):
                    return kept
                entry = self._new_version(name, files, digest, signature)
            except BadAdapter as exc:
                with self._lock:
                    self.stats["load_failures"] += 1
                log.warning("%s", exc)
                if old is not None and only_if_changed and (kept := self._keep(old, signature, None, take)):
                    log.warning("adapter %r: serving the version loaded before until its files load", name)
                    return kept
                raise
            with self._lock:
                previous = self._loaded.pop(name, None)
                entry.pinned = pin if pin is not None else bool(previous and previous.pinned)
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

    def _keep(self, entry: Entry, signature: tuple | None, pin: bool | None, take: bool) -> Entry | None:
        """Go on with the loaded version: the files are unchanged, hold the same bytes, or fail to load
        (then ``signature`` marks this state as tried, and the next change tries again). None where an
        unload or an eviction retired it meanwhile: it may be detached already, so the caller loads anew."""
        with self._lock:
            if entry.retired:
                return None
            entry.signature = signature
            if pin is not None:
                entry.pinned = pin
            return self._take(entry) if take else entry

    def _read(self, name: str, path: Path) -> tuple[bytes, bytes, bytes | None]:
        """The bytes of config, weights and (optional) labels: everything a version is made of.

        Files that change while they are read can give bytes of two versions that still parse: a read
        that overlaps an in-place write sees part of each (a config with the new alpha and the old rank),
        and a file replaced between two reads pairs the old config with the new weights. So the files'
        states are taken before and after the read, and the small files are read twice. A file replaced
        once (renamed into place) reads whole the next time: after READ_ATTEMPTS reads that all saw a
        change, the load fails as a copy in progress would (the next change check tries again)."""
        try:
            for _ in range(READ_ATTEMPTS):
                before = _file_states(path)
                config, weights = lorafit.read_adapter_files(path)
                labels = _read_labels(path)
                stable = (path / CONFIG_NAME).read_bytes() == config and _read_labels(path) == labels
                if stable and _file_states(path) == before:
                    return config, weights, labels
            raise ValueError("its files changed while they were read (a copy in progress?)")
        except (OSError, ValueError) as exc:
            # errors show paths inside the adapter directory only: where it is is the server's business
            raise BadAdapter(f"adapter {name!r}: {str(exc).replace(str(self.root) + os.sep, '')}") from None

    def _new_version(self, name: str, files: tuple[bytes, bytes, bytes | None], digest: str,
                     signature: tuple | None) -> Entry:
        """Parse the files and attach them as a new version (only attaching holds the model lock)."""
        config_json, weights, labels_json = files
        internal = f"v{next(self._counter)}"
        try:
            config, tensors = lorafit.parse_adapter(config_json, weights, source=name)
            # target_parameters has no per-row path; layer_replication would change the served model's layers,
            # and KaSA (kasa_config) truncate its weights, under every other adapter
            unsupported = [f for f in ("target_parameters", "layer_replication", "kasa_config") if getattr(config, f)]
            if unsupported:
                raise ValueError(f"it uses {unsupported[0]}, which lorafit serve does not support; merge it into the "
                                 "base model (lorafit merge) and serve that")
            if modifies_base_weight(config.init_lora_weights):
                raise ValueError(f"init_lora_weights={config.init_lora_weights!r} rewrites the base weights when "
                                 "loaded, under every other adapter served; merge it into the base model (lorafit "
                                 "merge) and serve that, or save a PiSSA/OLoRA adapter with as_plain_lora=True")
            labels = _labels(labels_json)
            with self.model_lock:
                lorafit.load_adapter_state(self.model, config, tensors, internal, activate=False, source=name)
                head, classes = _head(self.model, internal), _classes(self.model, internal)
                if labels is not None and classes is not None and len(labels) != classes:
                    lorafit.detach(self.model, internal)
                    raise ValueError(f"{LABELS_NAME} names {len(labels)} classes but the classifier head has "
                                     f"{classes} outputs")
        except (ValueError, KeyError) as exc:
            raise BadAdapter(f"adapter {name!r}: {exc.args[0] if isinstance(exc, KeyError) else exc}") from None
        return Entry(name=name, internal=internal, digest=digest, signature=signature, rank=config.r,
                     nbytes=_attached_bytes(self.model, internal), labels=labels, head=head)

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


def _file_states(path: Path) -> tuple:
    """(size, mtime, inode) of each of an adapter's files, None for a missing one."""
    states = []
    for f in FILES:
        try:
            s = (path / f).stat()
        except FileNotFoundError:
            states.append(None)
            continue
        states.append((s.st_size, s.st_mtime_ns, s.st_ino))
    return tuple(states)


def _read_labels(path: Path) -> bytes | None:
    try:
        return (path / LABELS_NAME).read_bytes()
    except FileNotFoundError:
        return None


def _head(model: nn.Module, internal: str) -> tuple:
    """The modules_to_save copies of adapter ``internal`` whose parameters are shaped unlike the
    base model's module (a 4-class head on a 2-class base), as ``((module, shapes), ...)``."""
    return tuple((path, param_shapes(w.modules_to_save[internal])) for path, w in saved_modules(model)
                 if internal in w.adapter_names
                 and param_shapes(w.modules_to_save[internal]) != param_shapes(w.original_module))


def _classes(model: nn.Module, internal: str) -> int | None:
    """How many classes adapter ``internal`` predicts: the outputs of its linear modules_to_save copy
    (the classifier head a sequence-classification adapter saves), else the base model's labels."""
    for _, wrapper in saved_modules(model):
        copy = wrapper.modules_to_save[internal] if internal in wrapper.adapter_names else None
        if type(copy) is nn.Linear:
            return copy.out_features
    return getattr(getattr(model, "config", None), "num_labels", None)


def _labels(data: bytes | None) -> list[str] | None:
    """Optional ``labels.json`` beside an adapter: the class names of its classifier head."""
    return None if data is None else parse_labels(data)


def _peek(path: Path) -> tuple[int | None, int | None]:
    """Rank (the r it would load with) and weight-file size of an adapter that is not loaded (without reading
    the weights); None for what cannot be read."""
    try:
        size = (path / WEIGHTS_NAME).stat().st_size
    except OSError:
        return None, None
    try:
        return adapter_rank((path / CONFIG_NAME).read_bytes(), str(path / CONFIG_NAME)), size
    except (OSError, ValueError):
        return None, size


def _attached_bytes(model: nn.Module, name: str) -> int:
    """The memory adapter ``name`` holds in the model: its parameters as attached, which can differ from its file's
    tensors (a VeRA file's factors at the shared width; bfloat16 factors loaded into a float32 model)."""
    return sum(p.numel() * p.element_size() for p in adapter_parameters(model, name).values())
