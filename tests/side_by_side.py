"""The suite's long checks that run other programs (each documented command, the quick benchmark suites), run
side by side: such a program spends most of its time starting up and loading on one core, so two of them take
little longer than the longer one alone.

A test module registers a check with ``register(key, seconds, prepare)`` and marks the test that reads its result
``@pytest.mark.side_by_side(key)``. When the first marked test runs, the ``side_by_side`` fixture (conftest.py)
prepares every check that a collected test is marked with, in this thread (``prepare(tmp_dir)`` returns what to
run: transformers' lazy imports are not thread-safe), then runs them two at a time, longest first; each test
waits for its own result. Checks no collected test needs never start.

The programs run with one OpenMP thread each (``ONE_THREAD``, in their environment): two programs of two
threads each on a 2-core machine spend much of the time spinning for each other (the same checks took 14 %
longer that way).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

_CHECKS: dict[str, tuple[float, Callable]] = {}
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def register(key: str, seconds: float, prepare: Callable[[Any], Callable[[], Any]]) -> None:
    """``seconds``: about how long it runs alone, to start the longest first."""
    _CHECKS[key] = (seconds, prepare)


def run(wanted: set[str], tmp_dir: Callable[[str], Any]) -> Iterator[dict[str, Future]]:
    keys = sorted((k for k in wanted if k in _CHECKS), key=lambda k: _CHECKS[k][0], reverse=True)
    thunks = {k: _CHECKS[k][1](tmp_dir(k)) for k in keys}
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {k: pool.submit(thunks[k]) for k in keys}
