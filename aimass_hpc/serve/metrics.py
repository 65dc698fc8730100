"""Prometheus metrics of one replica (``GET /metrics``, text exposition format).

Each app gets its own registry (not prometheus_client's global one) so that several services
in one process -- the tests -- do not mix their numbers. Route labels are limited to the
routes the app serves; anything else counts as ``other`` so a scanner cannot blow up the
label set.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_MAX_CACHED_LABELS = 256


def cuda_memory() -> dict[str, dict[str, float]]:
    """Per visible CUDA device: allocated, reserved and max_allocated bytes of this process."""
    try:
        import torch
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    return {
        f"cuda:{i}": {
            "allocated": float(torch.cuda.memory_allocated(i)),
            "reserved": float(torch.cuda.memory_reserved(i)),
            "max_allocated": float(torch.cuda.max_memory_allocated(i)),
        }
        for i in range(torch.cuda.device_count())
    }


class _GpuMemoryCollector(Collector):
    """GPU memory held for the model per CUDA device, read at scrape time."""

    def __init__(self, owner: ServeMetrics) -> None:
        self.owner = owner

    def collect(self) -> Iterator[GaugeMetricFamily]:
        devices = self.owner.cuda_memory()
        if not devices:
            return
        fam = GaugeMetricFamily(
            "aimass_serve_gpu_memory_bytes",
            "CUDA memory held by this replica",
            labels=["device", "kind"],
        )
        for dev, kinds in devices.items():
            for kind, value in kinds.items():
                fam.add_metric([dev, kind], value)
        yield fam


class ServeMetrics:
    """Counters and histograms of one service, plus the text rendering."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, routes: frozenset[str]) -> None:
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self.routes = routes
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "aimass_serve_requests",
            "HTTP requests answered",
            ["route", "method", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "aimass_serve_request_duration_seconds",
            "Time from request start to response end",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "aimass_serve_batch_size",
            "Samples (rows) per forward pass",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_requests = Histogram(
            "aimass_serve_batch_requests",
            "Requests merged into one forward pass",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.forward_seconds = Histogram(
            "aimass_serve_forward_seconds",
            "Duration of one batched forward pass",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "aimass_serve_queue_seconds",
            "Time the oldest request of a batch waited in the queue",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.samples = Counter("aimass_serve_samples", "Samples predicted", registry=r)
        self.queue_depth = Gauge(
            "aimass_serve_queue_depth", "Requests queued or in the forward pass", registry=r
        )
        self.ready = Gauge("aimass_serve_ready", "1 when the replica takes requests", registry=r)
        self.model = Info("aimass_serve_model", "The model this replica serves", registry=r)
        # This process's CUDA memory, or the model process's once the replica sets it.
        self.cuda_memory: Callable[[], dict[str, dict[str, float]]] = cuda_memory
        r.register(_GpuMemoryCollector(self))

    @property
    def routes(self) -> frozenset[str]:
        """The paths counted under their own label (set again once the app is built)."""
        return self._routes

    @routes.setter
    def routes(self, routes: frozenset[str]) -> None:
        self._routes = routes
        self._children.clear()  # cached label children were resolved against the old set

    def route_label(self, path: str) -> str:
        """The path if it is one of the app's routes, else ``other``."""
        return path if path in self.routes else "other"

    def observe_request(self, path: str, method: str, code: int, seconds: float) -> None:
        """Count one answered request."""
        key = (path, method, code)
        children = self._children.get(key)
        if children is None:
            # labels() resolves and locks on every call: a measurable share of a small request.
            route = self.route_label(path)
            children = (self.requests.labels(route, method, str(code)), self.latency.labels(route))
            if len(self._children) < _MAX_CACHED_LABELS:  # unknown paths must not grow it
                self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def observe_batch(self, rows: int, requests: int, forward_s: float, queued_s: float) -> None:
        """Record one forward pass (the batcher's observer)."""
        self.batch_size.observe(rows)
        self.batch_requests.observe(requests)
        self.forward_seconds.observe(forward_s)
        self.queue_seconds.observe(queued_s)
        self.samples.inc(rows)

    def set_model(self, info: dict[str, Any]) -> None:
        """Publish the served model's identity as an info metric."""
        self.model.info({k: "" if v is None else str(v) for k, v in info.items()})

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware: counts every HTTP response and its latency (cheap: no copies)."""

    def __init__(self, app: Any, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.observe_request(
                scope.get("path", ""),
                scope.get("method", ""),
                status[0],
                time.perf_counter() - start,
            )
