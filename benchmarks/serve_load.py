"""Loopback load test of `lorafit serve` (classification on all-MiniLM-L6-v2, or a tiny BERT with --quick).

The server runs as its own process on 127.0.0.1 (a free port); this process is the
client: a bounded number of requests from a fixed number of concurrent client
threads, each request one text for an adapter drawn at random from 1, 10 or 100
adapters (r=8 on query/key/value/dense, each with its own classifier head).
Then: hot-load latency (POST /v1/adapters of an adapter not in memory), a run
where other adapters (and the ones in use) are loaded and unloaded under load, and
one on a second server holding at most 12 adapters, where every load evicts one. Last, the same mix on a
float32, an int8 and an NF4 base (``--quantize``), each in a fresh server: requests per second and the server's
resident memory.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import lorafit
from benchmarks import models
from benchmarks.memory_probe import _status_kb
from benchmarks.timing import table

TOKEN = "bench"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TEXTS = ["a gripping, beautifully shot film", "the plot never comes together", "an ok way to spend an evening",
         "i loved every minute of it", "dull, predictable and far too long", "the actors do what they can"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_adapters(quick: bool, root: Path, count: int) -> tuple[str, Path]:
    from transformers import AutoTokenizer

    model = models.bert_classifier(quick)
    if quick:  # the server loads models from a directory: save the tiny BERT with a tokenizer
        from tests import serve_models

        spec = str(serve_models.bert_dir(root))
        model = serve_models.load(Path(spec))
        targets = ["query", "key", "value", "dense"]
    else:
        spec = "minilm"
        AutoTokenizer.from_pretrained(models.minilm_dir())  # fail early if the tokenizer is missing
        targets = ["query", "key", "value", "dense"]
    lorafit.attach(model, lorafit.LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="SEQ_CLS"))
    models.save_random_adapters(model, [root / "adapters" / f"task{i:03d}" for i in range(count)])
    return spec, root / "adapters"


@contextlib.contextmanager
def _server(client, spec: str, adapters: Path, max_adapters: int, quantize: int = 0):
    """`lorafit serve` in its own process on a free loopback port; yields (its URL, its pid) once /health
    answers."""
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "lorafit.cli", "serve", "--model", spec, "--adapters", str(adapters),
           "--host", "127.0.0.1", "--port", str(port), "--token", TOKEN, "--max-adapters", str(max_adapters),
           "--max-batch", "32", "--max-wait-ms", "5", "--log-level", "warning", "--quantize", str(quantize)]
    server = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parents[1])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if client.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"lorafit serve did not start: {server.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
        yield url, server.pid
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()


def _load(client, url: str, adapters: list[str], n: int, concurrency: int, seed: int, stop_at: float):
    """n requests from `concurrency` threads; returns (latencies of successes, failures, wall seconds)."""
    lat, failures = [], []
    lock = threading.Lock()
    counter = iter(range(n))
    rnd = random.Random(seed)
    plan = [(rnd.choice(adapters), rnd.choice(TEXTS)) for _ in range(n)]

    def worker():
        while True:
            with lock:
                i = next(counter, None)
            if i is None or time.monotonic() > stop_at:
                return
            adapter, text = plan[i]
            start = time.perf_counter()
            try:
                r = client.post(f"{url}/v1/classify", json={"texts": [text], "adapter": adapter}, timeout=120)
                ok = r.status_code == 200
                err = None if ok else f"{r.status_code} {r.text[:200]}"
            except Exception as exc:  # noqa: BLE001 - counted as a failed request
                ok, err = False, repr(exc)
            with lock:
                (lat.append(time.perf_counter() - start) if ok else failures.append(err))

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, failures, time.perf_counter() - start


def _under_churn(client, url: str, in_use: list[str], churn_names: list[str], unload_share: float, n: int,
                 concurrency: int, stop_at: float) -> dict:
    """`_load` over `in_use` while another client loads (and, `unload_share` of the time, unloads) adapters
    drawn from `churn_names`, one every 20 ms."""
    import httpx

    stop = threading.Event()
    churn = {"loads": 0, "unloads": 0, "errors": 0, "load_ms": []}

    def churner():
        rnd = random.Random(5)
        with httpx.Client() as c:
            while not stop.is_set():
                name = rnd.choice(churn_names)
                if rnd.random() < unload_share:
                    r = c.delete(f"{url}/v1/adapters/{name}", headers=AUTH, timeout=120)
                    churn["unloads"] += r.status_code == 200
                    churn["errors"] += r.status_code not in (200, 404)
                else:
                    r = c.post(f"{url}/v1/adapters", json={"name": name}, headers=AUTH, timeout=120)
                    churn["loads"] += r.status_code == 200
                    churn["errors"] += r.status_code != 200
                    if r.status_code == 200:
                        churn["load_ms"].append(r.json()["load_ms"])
                time.sleep(0.02)

    t = threading.Thread(target=churner)
    t.start()
    try:
        lat, fails, wall = _load(client, url, in_use, n, concurrency, 3, stop_at)
    finally:
        stop.set()
        t.join(60)
    stats = {line.split()[0]: float(line.split()[1]) for line in client.get(f"{url}/metrics").text.splitlines()
             if line.startswith(("lorafit_adapter_evictions_total", "lorafit_adapter_loads_total"))}
    return {"requests": len(lat) + len(fails), "failed": len(fails), "failures": fails[:5],
            "req_per_s": len(lat) / wall, "p50_ms": 1000 * _pct(lat, 0.5), "p99_ms": 1000 * _pct(lat, 0.99),
            "adapter_loads": churn["loads"], "adapter_unloads": churn["unloads"],
            "evictions": int(stats.get("lorafit_adapter_evictions_total", 0)),
            "load_unload_errors": churn["errors"],
            "load_ms_median_under_load": statistics.median(churn["load_ms"]) if churn["load_ms"] else None}


def _status_mb(pid: int, field: str) -> float:
    """A /proc/PID/status memory field (VmRSS, VmHWM) in MB; NaN where there is no /proc."""
    try:
        return _status_kb(field, pid) / 1024
    except (OSError, RuntimeError):
        return float("nan")


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] if xs else float("nan")


def _row(what: str, r: dict, steady: float | None) -> list[str]:
    return [what, str(r["requests"]), str(r["failed"]), f"{r['req_per_s']:.1f}",
            f"{r['req_per_s'] / steady:.2f}" if steady else "", f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}"]


def run(args, print_table) -> dict:
    import httpx

    quick = args.quick
    n_adapters = 12 if quick else 110
    requests = 24 if quick else 400
    concurrency = 4 if quick else 16
    budget = 60 if quick else 120  # seconds per scenario, at most
    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp, httpx.Client(limits=httpx.Limits(max_connections=concurrency + 4)) \
            as client:
        spec, adapters = _make_adapters(quick, Path(tmp), n_adapters)
        names = [f"task{i:03d}" for i in range(n_adapters)]
        spreads = (1, 4, 10) if quick else (1, 10, 100)
        in_use = names[:4] if quick else names[:10]
        rows, load_rows = [], []
        with _server(client, spec, adapters, 128) as (url, _):
            for k in spreads:  # warm: every adapter of the run loaded once
                for name in names[:k]:
                    client.post(f"{url}/v1/adapters", json={"name": name}, headers=AUTH, timeout=120)
            for k in spreads:
                _load(client, url, names[:k], concurrency * 2, concurrency, 1, time.monotonic() + budget)
                lat, fails, wall = _load(client, url, names[:k], requests, concurrency, 2, time.monotonic() + budget)
                res[f"{k} adapters"] = {"requests": len(lat) + len(fails), "failed": len(fails),
                                        "req_per_s": len(lat) / wall, "p50_ms": 1000 * _pct(lat, 0.5),
                                        "p99_ms": 1000 * _pct(lat, 0.99)}
            steady = res[f"{len(in_use)} adapters"]["req_per_s"]  # the mix the churn runs request
            for k in spreads:
                rows.append(_row(f"{k}", res[f"{k} adapters"], steady))
            # hot load: adapters never loaded before, one at a time, on an idle server
            cold = names[max(spreads):max(spreads) + (3 if quick else 8)]
            server_ms, client_ms = [], []
            for name in cold:
                start = time.perf_counter()
                r = client.post(f"{url}/v1/adapters", json={"name": name}, headers=AUTH, timeout=120)
                client_ms.append(1000 * (time.perf_counter() - start))
                server_ms.append(r.json()["load_ms"])
            res["hot_load"] = {"server_ms_median": statistics.median(server_ms),
                               "client_ms_median": statistics.median(client_ms), "n": len(cold)}
            load_rows.append(["hot-load (POST /v1/adapters, idle server)", f"{statistics.median(client_ms):.0f}",
                              f"{statistics.median(server_ms):.0f}", str(len(cold))])
            # load/unload churn: the adapters in use and others loaded and unloaded while requests run
            res["churn"] = c = _under_churn(client, url, in_use, names if quick else in_use + names[100:n_adapters],
                                            0.5, requests, concurrency, time.monotonic() + budget)
            rows.append(_row(f"{len(in_use)} + load/unload churn ({c['adapter_loads']} loads, "
                             f"{c['adapter_unloads']} unloads)", c, steady))
            if c["load_ms_median_under_load"] is not None:
                load_rows.append(["load under churn (server side)", "", f"{c['load_ms_median_under_load']:.0f}",
                                  str(c["adapter_loads"])])
            res["metrics_tail"] = [line for line in client.get(f"{url}/metrics").text.splitlines()
                                   if line.startswith(("lorafit_batch_rows_count", "lorafit_batch_rows_sum",
                                                       "lorafit_adapters_loaded"))]
        # eviction churn: a server holding len(in_use) + 2 adapters; each load of another one evicts the least
        # recently used (now and then one in use, which its next request loads again)
        with _server(client, spec, adapters, len(in_use) + 2) as (url, _):
            for name in in_use:
                client.post(f"{url}/v1/adapters", json={"name": name}, headers=AUTH, timeout=120)
            _load(client, url, in_use, concurrency * 2, concurrency, 1, time.monotonic() + budget)
            res["eviction churn"] = c = _under_churn(client, url, in_use, names[len(in_use):], 0.0, requests,
                                                     concurrency, time.monotonic() + budget)
            rows.append(_row(f"{len(in_use)} + eviction churn (at most {len(in_use) + 2} loaded; "
                             f"{c['adapter_loads']} loads, {c['evictions']} evictions)", c, steady))
        # a quantized base (`lorafit serve --quantize`): the same adapters in use, the server's speed and memory
        quant_rows, float_rps = [], None
        for bits in ((4,) if quick else (0, 8, 4)):
            with _server(client, spec, adapters, len(in_use), quantize=bits) as (url, pid):
                for name in in_use:
                    client.post(f"{url}/v1/adapters", json={"name": name}, headers=AUTH, timeout=120)
                _load(client, url, in_use, concurrency * 2, concurrency, 1, time.monotonic() + budget)
                lat, fails, wall = _load(client, url, in_use, requests, concurrency, 4, time.monotonic() + budget)
                r = {"requests": len(lat) + len(fails), "failed": len(fails), "req_per_s": len(lat) / wall,
                     "p50_ms": 1000 * _pct(lat, 0.5), "p99_ms": 1000 * _pct(lat, 0.99),
                     "rss_mb": _status_mb(pid, "VmRSS"), "peak_rss_mb": _status_mb(pid, "VmHWM"),
                     "anon_mb": _status_mb(pid, "RssAnon")}
            res[f"quantize {bits}"] = r
            float_rps = r["req_per_s"] if bits == 0 else float_rps
            label = {0: "float32 (no --quantize)", 4: "--quantize 4 (NF4)", 8: "--quantize 8 (int8)"}[bits]
            quant_rows.append([label, str(r["requests"]), str(r["failed"]), f"{r['req_per_s']:.1f}",
                               f"{r['req_per_s'] / float_rps:.2f}" if float_rps else "", f"{r['p50_ms']:.0f}",
                               f"{r['p99_ms']:.0f}", f"{r['rss_mb']:.0f}", f"{r['peak_rss_mb']:.0f}",
                               f"{r['anon_mb']:.0f}"])
    model = "tiny BERT" if quick else "all-MiniLM-L6-v2"
    print_table(f"lorafit serve load test ({model}, loopback, {concurrency} concurrent clients, one text a request, "
                f"max batch 32, max wait 5 ms)",
                table(rows, ["adapters in the mix", "requests", "failed", "req/s", f"× {len(in_use)} steady",
                             "p50 ms", "p99 ms"]))
    print_table("Adapter hot-load latency (r=8 on query/key/value/dense + classifier head)",
                table(load_rows, ["what", "client ms (median)", "server ms (median)", "n"]))
    print_table(f"lorafit serve with a quantized base ({model}, {len(in_use)} adapters in the mix, a fresh server "
                "each; RSS of the server process after the requests; anon: its RSS without file-backed pages, "
                "such as the code of the torch ops that quantized serving uses)",
                table(quant_rows, ["base", "requests", "failed", "req/s", "× float32", "p50 ms", "p99 ms", "RSS MB",
                                   "peak RSS MB", "anon MB"]))
    return res
