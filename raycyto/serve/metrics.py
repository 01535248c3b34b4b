"""Prometheus metrics of the endpoint, through Ray Serve's custom metrics.

Ray exports them, with Serve's own ``ray_serve_*`` metrics, at every node's metrics agent:
``http://<node>:<metrics-export-port>/metrics`` (``ray start --metrics-export-port=8080``;
``raycyto serve`` prints the address). Ray prefixes each name with ``ray_`` and counters
get ``_total``; Serve adds ``application``, ``deployment`` and ``replica`` tags.

=====================================  =========  ==========================================
metric (as scraped)                     type       tags
=====================================  =========  ==========================================
ray_raycyto_requests_total              counter    route, status, model
ray_raycyto_request_latency_ms          histogram  route, model
ray_raycyto_predictions_total           counter    model, version, label
ray_raycyto_referrals_total             counter    model, version
ray_raycyto_referral_rate               gauge      model, version (share of the last 200 answers)
ray_raycyto_mc_passes_total             counter    model, version
ray_raycyto_batch_size                  histogram  model (images per backbone batch)
=====================================  =========  ==========================================

Metric objects are made inside replicas (never at import time: Ray workers import this).
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any, Awaitable, Callable

if TYPE_CHECKING:
    from raycyto.serve.api import ServedModel

LATENCY_MS = [1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 250, 500, 1000, 2500, 5000, 10000]
BATCH_SIZES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
REFERRAL_WINDOW = 200


class ServeMetrics:
    """The ingress replica's metrics: requests, latency, predictions, referrals, MC passes."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.requests = Counter("raycyto_requests", description="HTTP requests by route, status and model",
                                tag_keys=("route", "status", "model"))
        self.latency = Histogram("raycyto_request_latency_ms", description="request latency in the ingress (ms)",
                                 boundaries=LATENCY_MS, tag_keys=("route", "model"))
        self.predictions = Counter("raycyto_predictions", description="images answered, by predicted label",
                                   tag_keys=("model", "version", "label"))
        self.referrals = Counter("raycyto_referrals", description="answers referred to a human",
                                 tag_keys=("model", "version"))
        self.referral_rate = Gauge("raycyto_referral_rate",
                                   description=f"share of the last {REFERRAL_WINDOW} answers referred",
                                   tag_keys=("model", "version"))
        self.passes = Counter("raycyto_mc_passes", description="MC-dropout passes run",
                              tag_keys=("model", "version"))
        self._recent: dict[tuple[str, str], deque[bool]] = {}

    def request(self, route: str, status: int, model: str, ms: float) -> None:
        self.requests.inc(tags={"route": route, "status": str(status), "model": model})
        self.latency.observe(ms, tags={"route": route, "model": model})

    def prediction(self, model: "ServedModel", result: dict[str, Any]) -> None:
        tags = {"model": model.name, "version": model.version}
        self.predictions.inc(tags={**tags, "label": str(result["label"])})
        self.passes.inc(int(result["passes"]), tags=tags)
        refer = bool(result["refer"])
        if refer:
            self.referrals.inc(tags=tags)
        recent = self._recent.setdefault((model.name, model.version), deque(maxlen=REFERRAL_WINDOW))
        recent.append(refer)
        self.referral_rate.set(sum(recent) / len(recent), tags=tags)


class BatchMetrics:
    """The backbone replica's metric: images per dynamic batch, per model."""

    def __init__(self) -> None:
        from ray.serve.metrics import Histogram

        self.batch_size = Histogram("raycyto_batch_size", description="images per backbone batch",
                                    boundaries=BATCH_SIZES, tag_keys=("model",))

    def batch(self, model: str, size: int) -> None:
        self.batch_size.observe(size, tags={"model": model})


class MetricsMiddleware:
    """ASGI middleware: counts every HTTP request (route template, status, model) and its latency."""

    def __init__(self, app: Callable[..., Awaitable[None]], metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        labels: dict[str, str] = {}
        scope["raycyto.labels"] = labels  # the routes fill in route and model
        status = 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = labels.get("route") or getattr(scope.get("route"), "path", None) or "unrouted"
            self.metrics.request(route, status, labels.get("model", ""), (time.perf_counter() - t0) * 1000.0)
