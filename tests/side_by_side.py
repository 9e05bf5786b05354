"""The suite's long checks that run other programs (each documented command, the quick benchmark suites), run
beside the rest of the suite: such a program spends most of its time starting up and loading on one core.

A test module registers a check with ``register(key, seconds, prepare)`` and marks the test that reads its result
``@pytest.mark.side_by_side(key)``. The marked tests run last (conftest.py moves them). At the session's start,
``Checks`` prepares every check a collected test is marked with, in the main thread (``prepare(tmp_dir)`` returns
what to run: transformers' lazy imports are not thread-safe), and one worker thread runs them, longest first,
while the suite's other tests run beside it with one core fewer for torch; when the marked tests are reached, a
second worker joins. Each marked test waits for its own result. Checks no collected test needs never start.

The programs run with one OpenMP thread each (``ONE_THREAD``, in their environment): two programs of two
threads each on a 2-core machine spend much of the time spinning for each other (the same checks took 14 %
longer that way).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

_CHECKS: dict[str, tuple[float, Callable]] = {}
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
MAX_WORKERS = 2


def register(key: str, seconds: float, prepare: Callable[[Any], Callable[[], Any]]) -> None:
    """``seconds``: about how long it runs alone, to start the longest first."""
    _CHECKS[key] = (seconds, prepare)


class Checks:
    """The wanted checks, prepared now and run by worker threads (``add_worker``); ``results[key]`` is a Future."""

    def __init__(self, wanted: set[str], tmp_dir: Callable[[str], Any]) -> None:
        keys = sorted((k for k in wanted if k in _CHECKS), key=lambda k: _CHECKS[k][0], reverse=True)
        self._queue = deque((k, _CHECKS[k][1](tmp_dir(k))) for k in keys)
        self.results: dict[str, Future] = {k: Future() for k in keys}
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []

    def add_worker(self) -> None:
        """One more worker, up to ``MAX_WORKERS``."""
        with self._lock:
            if len(self._workers) < MAX_WORKERS and self._queue:
                worker = threading.Thread(target=self._work, name="side-by-side", daemon=True)
                self._workers.append(worker)
                worker.start()

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    return
                key, thunk = self._queue.popleft()
            future = self.results[key]
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(thunk())
            except BaseException as exc:  # noqa: BLE001 - the test that reads it reports it
                future.set_exception(exc)

    def close(self) -> None:
        """Drop the checks not started (a session cut short) and wait for the running ones."""
        with self._lock:
            while self._queue:
                self.results[self._queue.popleft()[0]].cancel()
        for worker in self._workers:
            worker.join()
