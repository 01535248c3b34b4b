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
ray_raycyto_drift                       gauge      model, version, statistic (see below)
=====================================  =========  ==========================================

``ray_raycyto_drift`` compares the last :data:`DRIFT_WINDOW` answers of each model version with
the validation reference its bundle stores (``model.json["reference"]``, written by ``raycyto
export``), every :data:`DRIFT_EVERY` answers once the window is full, with the tests of
``raycyto monitor`` (:class:`raycyto.monitor.drift.DriftWatch`): ``-log10 p`` per ``statistic``
(``class_mix``, ``referral_rate``, ``ood_rate``, ``confidence``, ``ood_score``) and
``statistic="window"``, ``-log10`` of the Bonferroni-adjusted smallest of them. Alert on
``ray_raycyto_drift{statistic="window"} > 1.3`` (p < 0.05 for that window: each evaluation of a
clean stream alarms with probability <= 0.05; use 3, p < 0.001, for fewer alarms over time).
A bundle exported without a reference (or read from a model.json that is not the one served)
has no drift gauge; ``raycyto monitor`` says to re-export it.

Metric objects are made inside replicas (never at import time: Ray workers import this).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Optional

from raycyto.monitor.drift import DEFAULT_WINDOW, BundleReferenceError, DriftWatch, answer_of, load_reference

if TYPE_CHECKING:
    from raycyto.serve.api import ServedModel

LATENCY_MS = [1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 250, 500, 1000, 2500, 5000, 10000]
BATCH_SIZES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
REFERRAL_WINDOW = 200
DRIFT_WINDOW = DEFAULT_WINDOW
DRIFT_EVERY = 50
log = logging.getLogger(__name__)


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
        self.drift = Gauge("raycyto_drift",
                           description=f"-log10 p of the last {DRIFT_WINDOW} answers against the model's "
                                       "validation reference, per statistic (window: Bonferroni over them)",
                           tag_keys=("model", "version", "statistic"))
        self._recent: dict[tuple[str, str], deque[bool]] = {}
        self._drift: dict[tuple[str, str], Optional[DriftWatch]] = {}

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
        self._drift_answer(model, result, tags)

    def _drift_answer(self, model: "ServedModel", result: dict[str, Any], tags: dict[str, str]) -> None:
        """Feed the model version's drift window; set the gauge when it compares (never fails a request)."""
        key = (model.name, model.version)
        if key not in self._drift:  # lazily, once per version: read its bundle's reference
            try:
                self._drift[key] = DriftWatch(load_reference(model.key, model.sha256), DRIFT_WINDOW, DRIFT_EVERY)
            except (BundleReferenceError, ValueError) as e:
                log.warning("no drift gauge for %s %s: %s", model.name, model.version, e)
                self._drift[key] = None
        watch = self._drift[key]
        if watch is None:
            return
        try:
            levels = watch.add(answer_of(result))
        except Exception:  # a drift bug must not fail an answer
            log.exception("drift gauge of %s %s disabled", model.name, model.version)
            self._drift[key] = None
            return
        for statistic, value in (levels or {}).items():
            self.drift.set(value, tags={**tags, "statistic": statistic})


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
