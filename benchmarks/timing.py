"""Interleaved timing: every variant runs once per round, in a rotating order, so a
noisy neighbour on this shared machine slows all variants alike; ratios are taken
within each round (``ratio``), then the median over rounds."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable


def interleaved(variants: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            gc.collect()
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return times


def kept_bytes(forward: Callable[[], object]) -> tuple[object, int]:
    """Run ``forward`` (which returns a loss) and count the bytes it leaves allocated for backward: what it
    allocates less what it frees, op by op, from torch's profiler (CPU memory): the step's activation
    memory, free of this machine's noise. Returns the loss and the bytes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = forward()
    return loss, sum(e.self_cpu_memory_usage for e in prof.events())


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def ratios(times: dict[str, list[float]], name: str, ref: str) -> list[float]:
    """name's time over ref's time, round by round."""
    return [t / r for t, r in zip(times[name], times[ref], strict=True)]


def ratio(times: dict[str, list[float]], name: str, ref: str) -> float:
    """The median over rounds of name's time over ref's time in the same round. This machine drifts
    (a step took 1.2 s and 2.0 s within minutes) faster than the variants rotate, so a ratio of
    whole-run medians moves with the drift; a variant and its reference in one round move together."""
    return median(ratios(times, name, ref))


def overs(times: dict[str, list[float]], name: str, base: str, unit: str) -> list[float]:
    """(name's time - base's time) / unit's time, round by round, all three from the same round."""
    return [(t - b) / u for t, b, u in zip(times[name], times[base], times[unit], strict=True)]


def spread(xs: list[float], fmt: str = ".2f") -> str:
    """The median and, in brackets, the middle half of the rounds (first to third quartile): on this
    machine the same code moves by several hundredths from run to run, and a goal within that range
    is not settled by one median."""
    if len(xs) < 2:
        return format(median(xs), fmt)
    q1, _, q3 = statistics.quantiles(xs, n=4)
    return f"{format(median(xs), fmt)} [{format(q1, fmt)}, {format(q3, fmt)}]"


def table(rows: list[list[str]], header: list[str]) -> str:
    """A Markdown table (readable in a terminal too)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
