"""Prometheus metrics in the text exposition format, without a client library."""

from __future__ import annotations

import threading

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# a label per value a client can choose would let clients add series without end
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Histogram:
    def __init__(self, buckets) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += 1
        self.sum += value

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.total}')
        out.append(f"{name}_sum{{{labels}}} {self.sum:.6f}" if labels else f"{name}_sum {self.sum:.6f}")
        out.append(f"{name}_count{{{labels}}} {self.total}" if labels else f"{name}_count {self.total}")
        return out


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = {}
        self.latency: dict[str, Histogram] = {}
        self.batch_rows = Histogram(BATCH_BUCKETS)
        self.cancelled = {"stream": 0, "request": 0}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """``route`` is a route's template (or "unmatched"), never a raw path."""
        with self._lock:
            key = (method if method in METHODS else "other", route, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            self.latency.setdefault(route, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def observe_batch(self, rows: int) -> None:
        with self._lock:
            self.batch_rows.observe(rows)

    def observe_cancelled(self, kind: str) -> None:
        """A client left before its answer: ``stream`` (an event stream closed) or ``request``."""
        with self._lock:
            self.cancelled[kind] += 1

    def render(self, registry, pending: int) -> str:
        with self._lock:
            lines = ["# HELP lorafit_requests_total HTTP requests by method, route and status.",
                     "# TYPE lorafit_requests_total counter"]
            for (method, route, status), n in sorted(self.requests.items()):
                lines.append(f'lorafit_requests_total{{method="{method}",route="{route}",status="{status}"}} {n}')
            lines += ["# HELP lorafit_request_seconds Request latency.", "# TYPE lorafit_request_seconds histogram"]
            for route, hist in sorted(self.latency.items()):
                lines += hist.lines("lorafit_request_seconds", f'route="{route}"')
            lines += ["# HELP lorafit_batch_rows Rows per batched forward.", "# TYPE lorafit_batch_rows histogram"]
            lines += self.batch_rows.lines("lorafit_batch_rows")
            lines += ["# HELP lorafit_streams_cancelled_total Streams whose client left before the end.",
                      "# TYPE lorafit_streams_cancelled_total counter",
                      f"lorafit_streams_cancelled_total {self.cancelled['stream']}",
                      "# HELP lorafit_requests_cancelled_total Requests whose client left before the answer.",
                      "# TYPE lorafit_requests_cancelled_total counter",
                      f"lorafit_requests_cancelled_total {self.cancelled['request']}"]
        loaded = registry.loaded()
        stats = dict(registry.stats)
        lines += ["# HELP lorafit_adapters_loaded Adapters in memory.", "# TYPE lorafit_adapters_loaded gauge",
                  f"lorafit_adapters_loaded {len(loaded)}",
                  "# HELP lorafit_adapter_bytes Bytes of adapter weights in memory.",
                  "# TYPE lorafit_adapter_bytes gauge", f"lorafit_adapter_bytes {sum(e.nbytes for e in loaded)}",
                  "# HELP lorafit_queue_jobs Requests waiting for a batch.", "# TYPE lorafit_queue_jobs gauge",
                  f"lorafit_queue_jobs {pending}"]
        for key in ("loads", "reloads", "evictions", "unloads", "load_failures"):
            lines += [f"# TYPE lorafit_adapter_{key}_total counter", f"lorafit_adapter_{key}_total {stats[key]}"]
        return "\n".join(lines) + "\n"
