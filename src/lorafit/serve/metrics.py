"""One server's Prometheus metrics, kept by prometheus_client in a registry of the server's own."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# a label per value a client can choose would let clients add series without end
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
ADAPTER_COUNTS = ("loads", "reloads", "evictions", "unloads", "load_failures")


class Metrics:
    """The metrics of one app. ``registry`` is private to it (not prometheus_client's global one), so
    several apps in one process keep separate counts. It is also the collector ``registry`` reads:
    it drops the ``_created`` series prometheus_client adds to counters and histograms (a second
    series per label set that nobody here reads) and reads the adapter registry's counts at scrape time."""

    def __init__(self) -> None:
        self.requests = Counter("lorafit_requests", "HTTP requests by method, route and status.",
                                ("method", "route", "status"), registry=None)
        self.latency = Histogram("lorafit_request_seconds", "Request latency.", ("route",),
                                 buckets=LATENCY_BUCKETS, registry=None)
        self.batch_rows = Histogram("lorafit_batch_rows", "Rows per batched forward.", buckets=BATCH_BUCKETS,
                                    registry=None)
        self.cancelled = {
            "stream": Counter("lorafit_streams_cancelled", "Streams whose client left before the end.",
                              registry=None),
            "request": Counter("lorafit_requests_cancelled", "Requests whose client left before the answer.",
                               registry=None),
        }
        self.adapters_loaded = Gauge("lorafit_adapters_loaded", "Adapters in memory.", registry=None)
        self.adapter_bytes = Gauge("lorafit_adapter_bytes", "Bytes of adapter weights in memory.", registry=None)
        self.queue_jobs = Gauge("lorafit_queue_jobs", "Requests waiting for a batch.", registry=None)
        self._stats: Callable[[], dict] = lambda: dict.fromkeys(ADAPTER_COUNTS, 0)
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def watch(self, adapters, pending: Callable[[], int]) -> None:
        """Read the adapter registry ``adapters`` and the batch queue's length ``pending`` at each scrape."""
        self.adapters_loaded.set_function(lambda: len(adapters.loaded()))
        self.adapter_bytes.set_function(lambda: sum(e.nbytes for e in adapters.loaded()))
        self.queue_jobs.set_function(pending)
        self._stats = lambda: dict(adapters.stats)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """``route`` is a route's template (or "unmatched"), never a raw path."""
        self.requests.labels(method if method in METHODS else "other", route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_batch(self, rows: int) -> None:
        self.batch_rows.observe(rows)

    def observe_cancelled(self, kind: str) -> None:
        """A client left before its answer: ``stream`` (an event stream closed) or ``request``."""
        self.cancelled[kind].inc()

    def collect(self):
        for metric in (self.requests, self.latency, self.batch_rows, *self.cancelled.values(),
                       self.adapters_loaded, self.adapter_bytes, self.queue_jobs):
            for family in metric.collect():
                family.samples = [s for s in family.samples if s.name != family.name + "_created"]
                yield family
        stats = self._stats()
        for key in ADAPTER_COUNTS:
            # counted by the adapter registry itself: read, not mirrored
            yield CounterMetricFamily(f"lorafit_adapter_{key}", f"Adapter {key.replace('_', ' ')}.", value=stats[key])
