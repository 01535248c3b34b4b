"""Ray Serve application: typed builder + three deployments.

Graph (``import_path: raycyto.serve.app:build_app`` in the Serve YAML)::

    Ingress (FastAPI: validation, auth, OIP v2)
      -> Backbone  (preprocess + backbone, dynamic batching with @serve.batch; GPUs if given)
      -> MCHead x R (the T passes of a request split into chunks, sent concurrently)

Head scope: the backbone returns features ``[D]``; each MC chunk runs the dropout head.
Full scope (``mc.scope == "full"``): the backbone deployment only preprocesses and each MC
chunk runs the whole network. Chunk i of a request is seeded from (seed, chunks, i), so a
response is deterministic given its seed, whichever replicas served it.

This module deliberately has no ``from __future__ import annotations``: Serve inspects
the builder's parameter annotation as a class to validate the YAML ``args``.
"""

import asyncio
import logging
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from raycyto.device import worker_device
from raycyto.serve.api import ApiSettings, ServiceUnavailable, build_api
from raycyto.serve.predict import DEFAULT_MC_REPLICAS, LoadedModel, build_result, chunk_plan, resolve_fan_out

log = logging.getLogger(__name__)
MODEL_DIR_ENV = "RAYCYTO_MODEL_DIR"


class AppArgs(BaseModel):
    """Arguments of :func:`build_app` (the ``args:`` block of a Serve YAML application)."""

    model_config = ConfigDict(extra="forbid")

    model_dir: str = Field("runs/demo/model", description=f"exported bundle; env {MODEL_DIR_ENV} overrides")
    passes: Optional[int] = Field(None, ge=1, description="default MC passes T (None: model.json)")
    threshold: Optional[float] = Field(None, ge=0.0, le=1.0, description="default refer threshold")
    fan_out: Optional[int] = Field(None, ge=1, description="chunks per request (None: 1 head / R full)")
    seed: int = Field(0, ge=0, description="default seed of the MC passes")
    max_passes: int = Field(1000, ge=1)
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_pixels: Optional[int] = Field(None, ge=1, description="decompression-bomb pixel limit")
    max_infer_batch: int = Field(16, ge=1, description="most images per OIP infer request")
    auth_token_env: Optional[str] = Field(None, description="env var holding the bearer token")
    auth_token_file: Optional[str] = Field(None, description="file holding the bearer token")
    backbone_replicas: int = Field(1, ge=1)
    backbone_num_cpus: float = Field(1.0, ge=0)
    backbone_num_gpus: float = Field(0.0, ge=0)
    max_batch_size: int = Field(8, ge=1, description="@serve.batch size of the backbone")
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    mc_replicas: int = Field(DEFAULT_MC_REPLICAS, ge=1)
    mc_num_cpus: float = Field(0.5, ge=0)
    ingress_num_cpus: float = Field(0.25, ge=0)
    max_ongoing_requests: int = Field(16, ge=1, description="ingress: per-replica concurrency")
    max_queued_requests: int = Field(64, ge=-1, description="ingress: queue bound; excess -> 503")
    chunk_retries: int = Field(2, ge=0, description="retries of a chunk whose replica died")


def _threads_for_replica() -> None:
    """One torch thread per whole CPU assigned to this replica (at least one)."""
    import ray
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    torch.set_num_threads(max(1, int(cpus)))


@serve.deployment(name="Backbone", max_ongoing_requests=32, health_check_period_s=10)
class Backbone:
    """Preprocess + backbone with dynamic batching; returns what the MC replicas need."""

    def __init__(self, model_dir: str, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        import threading

        _threads_for_replica()
        self.model = LoadedModel(model_dir, device=worker_device())
        self.lock = threading.Lock()
        self.embed.set_max_batch_size(max_batch_size)
        self.embed.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def describe(self) -> dict[str, Any]:
        """Model facts the ingress needs (name, sha256, classes, defaults, scope)."""
        m = self.model
        return {"info": m.info, "class_names": m.class_names, "scope": m.scope,
                "passes": m.default_passes, "threshold": m.default_threshold,
                "input_size": int(m.meta.get("input_size") or m.model.spec.input_size)}

    def ping(self) -> bool:
        return True

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def embed(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Batch of uint8 ``[H, W, 3]`` images -> features ``[D]`` or pixels ``[3, S, S]`` each."""
        def run() -> list[np.ndarray]:
            with self.lock:
                return self.model.embed(images)

        return await asyncio.to_thread(run)

    def check_health(self) -> None:
        if self.model is None:
            raise RuntimeError("model not loaded")


@serve.deployment(name="MCHead", num_replicas=DEFAULT_MC_REPLICAS, max_ongoing_requests=8,
                  health_check_period_s=10)
class MCHead:
    """Runs one chunk of stochastic passes (head only, or the full network for full scope)."""

    def __init__(self, model_dir: str) -> None:
        import threading

        _threads_for_replica()
        self.model = LoadedModel(model_dir, device=worker_device())
        self.replica_id = serve.get_replica_context().replica_tag
        self.lock = threading.Lock()  # seeded passes must not interleave

    def ping(self) -> bool:
        return True

    async def run(self, x: np.ndarray, n: int, seed: int) -> dict[str, Any]:
        """``n`` passes seeded with ``seed`` on embedded image ``x``; probs ``[n, C]`` + replica id."""
        def work() -> np.ndarray:
            with self.lock:
                return self.model.run_chunk(x, n, seed)

        return {"probs": await asyncio.to_thread(work), "replica": self.replica_id}

    def check_health(self) -> None:
        if self.model is None:
            raise RuntimeError("model not loaded")


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
    """FastAPI ingress: validates input, fans the MC passes out, aggregates the answer."""

    async def __init__(self, backbone: DeploymentHandle, mc: DeploymentHandle, args: dict) -> None:
        self.args = AppArgs.model_validate(args)
        self.backbone = backbone
        self.mc = mc
        # Secrets are read here, in the replica, so they never travel in the app config.
        self.token = read_token(self.args.auth_token_env, self.args.auth_token_file)
        d = await self._call(self.backbone.describe)
        self.model_info: dict[str, str] = d["info"]
        self.class_names: list[str] = d["class_names"]
        self.input_size: int = d["input_size"]
        self.default_passes: int = self.args.passes or d["passes"]
        self.default_threshold: float = d["threshold"] if self.args.threshold is None else self.args.threshold
        self.fan_out = resolve_fan_out(self.args.fan_out, d["scope"], self.args.mc_replicas)

    def __serve_build_asgi_app__(self) -> Any:
        a = self.args
        return build_api(self, ApiSettings(max_body_bytes=a.max_body_bytes, max_pixels=a.max_pixels,
                                           max_passes=a.max_passes, max_batch=a.max_infer_batch,
                                           token=self.token, seed=a.seed))

    async def _call(self, method: Any, *args: Any) -> Any:
        """Call a deployment method, retrying when the replica died under the request."""
        from ray.exceptions import ActorUnavailableError, RayActorError

        last: Exception | None = None
        for attempt in range(self.args.chunk_retries + 1):
            try:
                return await method.remote(*args)
            except (RayActorError, ActorUnavailableError) as e:
                last = e
                log.warning("replica failed (attempt %d): %s", attempt + 1, type(e).__name__)
                await asyncio.sleep(0.05 * 2**attempt)
        raise ServiceUnavailable(f"model replicas unavailable ({type(last).__name__})")

    async def predict(self, image: np.ndarray, passes: int, threshold: float, seed: int,
                      fan_out: Optional[int] = None) -> dict[str, Any]:
        """Embed once, run the passes' chunks concurrently on MC replicas, summarise."""
        x = await self._call(self.backbone.embed, image)
        plan = chunk_plan(passes, fan_out or self.fan_out, seed)
        outs = await asyncio.gather(*[self._call(self.mc.run, x, n, s) for n, s in plan])
        probs = np.concatenate([o["probs"] for o in outs])  # [T, C], chunk order
        ids = sorted({o["replica"] for o in outs})
        return build_result(probs, threshold, self.class_names, self.model_info,
                            {"count": len(ids), "chunks": len(plan), "ids": ids})

    async def ready(self) -> bool:
        try:
            await asyncio.wait_for(asyncio.gather(self.backbone.ping.remote(), self.mc.ping.remote()), 5.0)
            return True
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            return False

    def check_health(self) -> None:
        if self.backbone is None or self.mc is None:
            raise RuntimeError("deployment handles missing")


def resolve_model_dir(model_dir: str) -> str:
    """``$RAYCYTO_MODEL_DIR`` if set, else ``model_dir``; absolute (or a URI); must hold model.json.

    A URI (``s3://bucket/models/x``) is kept: every replica, on whichever node, copies the
    bundle from there and verifies it.
    """
    from raycyto.data.decode import is_uri
    from raycyto.errors import ConfigError
    from raycyto.storage import is_file

    chosen = os.environ.get(MODEL_DIR_ENV) or model_dir
    where = chosen.rstrip("/") if is_uri(chosen) else str(Path(chosen).expanduser().resolve())
    try:
        found = is_file(f"{where}/model.json")
    except (OSError, ValueError) as exc:  # unreachable bucket, no credentials
        raise ConfigError("model_dir", f"{where}: cannot read ({exc})") from None
    if not found:
        raise ConfigError("model_dir", f"{where} holds no model.json; export one with "
                                       f"`raycyto export EXP_DIR --out {where}`")
    return where


def build_app(args: AppArgs) -> Application:
    """Typed application builder named in the Serve YAML.

    Args:
        args: validated :class:`AppArgs` (Serve converts the YAML ``args`` dict).
    Returns:
        the bound Ingress -> Backbone -> MCHead application.

    Example: ``serve run raycyto.serve.app:build_app model_dir=runs/demo/model``
    """
    if isinstance(args, dict):  # called directly from Python with a dict
        args = AppArgs.model_validate(args)
    model_dir = resolve_model_dir(args.model_dir)
    args = args.model_copy(update={"model_dir": model_dir})
    backbone = Backbone.options(
        num_replicas=args.backbone_replicas,
        max_ongoing_requests=max(32, 2 * args.max_batch_size),
        ray_actor_options={"num_cpus": args.backbone_num_cpus, "num_gpus": args.backbone_num_gpus},
    ).bind(model_dir, args.max_batch_size, args.batch_wait_timeout_s)
    mc = MCHead.options(num_replicas=args.mc_replicas,
                        ray_actor_options={"num_cpus": args.mc_num_cpus}).bind(model_dir)
    return Ingress.options(
        max_ongoing_requests=args.max_ongoing_requests, max_queued_requests=args.max_queued_requests,
        ray_actor_options={"num_cpus": args.ingress_num_cpus},
    ).bind(backbone, mc, args.model_dump())
