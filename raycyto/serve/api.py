"""The HTTP API (FastAPI): ``/predict``, Open Inference Protocol v2, a model index, auth, errors.

:func:`build_api` wires the module-level routes below to a :class:`Backend` (the Serve
ingress, or anything that can predict a decoded image), so the same API runs on Serve and
in tests. Several models (name + version) can sit behind one API; :class:`ModelIndex`
resolves a request's model. Errors are always JSON ``{"error", "message", "status"}``
(under ``/v2`` ``error`` holds the message, as OIP clients print it); nothing a client
sends produces a 5xx.

OIP v2 specifics (``raycyto.serve.oip``): the binary tensor data extension for the BYTES
image input and for any output, JSON BYTES elements as strings (an image in JSON is its
base64 text), per-name and per-version metadata and readiness, the repository index.

A clean stop (:class:`DrainMiddleware`): asked to drain, the API answers every new request 503
and finishes the ones in flight; ``raycyto serve`` asks on SIGTERM / SIGINT, waits for them,
then shuts Serve and Ray down.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import hmac
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from raycyto.referral.conformal import image_uniform
from raycyto.serve import oip
from raycyto.serve.validation import (
    IMAGE_CONTENT_TYPES,
    BodyLimitMiddleware,
    ClientError,
    check_content_type,
    decode_upload,
    error_body,
)

log = logging.getLogger(__name__)
MAX_SEED = 2**31 - 1
MAX_FAN_OUT = 64
DRAIN_TOKEN_ENV = "RAYCYTO_DRAIN_TOKEN"
DRAIN_PATH = "/-/raycyto/drain"
DRAIN_HEADER = "x-raycyto-drain"


class ServiceUnavailable(Exception):
    """The backend cannot answer right now (e.g. replicas restarting); maps to 503 + Retry-After."""


# ----------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ServedModel:
    """One model version behind the API (facts read from its bundle by a replica).

    Args:
        key: the backend's id for it (the bundle location; Serve's multiplexed model id).
        name: model name (model.json ``name``); several versions may share it.
        version: version label (configured, else the first 12 hex digits of sha256).
        sha256: SHA-256 of the bundle's model.json (which pins every weight file).
        class_names: label names, index = class.
        input_size: side of the square network input in pixels.
        passes: default MC passes T.
        threshold: default refer threshold.
        scope: MC scope, "head" or "full".
        seed: default seed of the MC passes (the bundle's, ``model.json["mc"]["seed"]``).
        policy: its :class:`raycyto.serve.predict.ReferralPolicy` (None: the vote rule only).
        ood_threshold: its out-of-distribution guard's threshold (None: no guard).
        evidence: how every answer explains itself (``LoadedModel.evidence_method``: "additive"
            for map heads, from the embedding; "gradcam" for pooled heads, only with
            ``explain``); None: evidence only with ``explain``.
        layout: the bundle names chromosome slots (karyogram layout): the evidence includes
            the top 3 chromosomes.
    """

    key: str
    name: str
    version: str
    sha256: str
    class_names: tuple[str, ...]
    input_size: int
    passes: int
    threshold: float
    scope: str = "head"
    seed: int = 0
    policy: Any = field(default=None, compare=False)
    ood_threshold: float | None = None
    evidence: str | None = None
    layout: bool = False

    @property
    def info(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256}

    @property
    def provides(self) -> frozenset[str]:
        """The optional answer fields this model gives (see ``predict.build_result``)."""
        out = set()
        if self.policy is not None and self.policy.conformal is not None:
            out |= {"prediction_set", "coverage"}
        if self.policy is not None and self.policy.risk_threshold is not None:
            out |= {"risk_threshold", "guarantee"}
        if self.ood_threshold is not None:
            out |= {"out_of_distribution", "ood_score", "ood_threshold"}
        if self.layout:  # top 3 chromosomes: every answer of a map head, else with explain=true
            out.add("evidence")
        out.add("overlay_png")  # explain=true
        return frozenset(out)

    @property
    def always_explained(self) -> bool:
        """Every answer carries the evidence (a map head, from the embedding), not only with explain."""
        return self.evidence == "additive"

    def referral(self) -> dict[str, Any]:
        """How it refers, for the model index and OIP metadata."""
        p = self.policy
        out: dict[str, Any] = {"rule": p.rule if p is not None else "vote"}
        if p is not None and p.conformal is not None:
            out.update(coverage=p.level, set_score=p.score)
        if p is not None and p.risk_threshold is not None:
            out.update(risk_threshold=None if p.risk_threshold != p.risk_threshold else p.risk_threshold,
                       guarantee=p.guarantee)
        if self.ood_threshold is not None:
            out["ood_threshold"] = self.ood_threshold
        return out


class ModelIndex:
    """Models by name and version; the version listed last for a name is its default."""

    def __init__(self, models: list[ServedModel]) -> None:
        from raycyto.errors import ConfigError

        if not models:
            raise ConfigError("models", "no model to serve")
        self.models = list(models)
        self.by_name: dict[str, dict[str, ServedModel]] = {}
        for m in models:
            versions = self.by_name.setdefault(m.name, {})
            if m.version in versions:
                raise ConfigError("models", f"model {m.name!r} version {m.version!r} is listed twice")
            versions[m.version] = m
        self.default = models[0]  # what /predict answers with when no model is named

    def resolve(self, name: str | None = None, version: str | None = None) -> ServedModel:
        """The model ``name`` (default: the first listed) at ``version`` (default: its last listed).

        Raises:
            ClientError: 404 naming what is served.
        """
        if name is None:
            if version is not None:
                raise ClientError(422, "invalid_parameters", "version given without a model name")
            return self.default
        versions = self.by_name.get(name)
        if versions is None:
            raise ClientError(404, "model_not_found",
                              f"model {name!r} is not served here; available: {sorted(self.by_name)}")
        if version is None or version == "":
            return list(versions.values())[-1]
        if version not in versions:
            raise ClientError(404, "model_not_found",
                              f"model {name!r} has no version {version!r}; available: {list(versions)}")
        return versions[version]

    def describe(self, m: ServedModel) -> dict[str, Any]:
        """One row of the model index."""
        default = self.resolve(m.name)
        return {**m.info, "default": m is default, "class_names": list(m.class_names),
                "input_size": m.input_size, "passes": m.passes, "threshold": m.threshold, "seed": m.seed,
                "scope": m.scope, **m.referral(),
                "evidence": "every answer" if m.always_explained else "explain=true",
                "chromosome_evidence": m.layout,
                "predict": f"/predict?model={m.name}&version={m.version}",
                "infer": f"/v2/models/{m.name}/versions/{m.version}/infer"}


class Backend(Protocol):
    """What the API needs from whoever runs the models."""

    index: ModelIndex

    async def predict(self, model: ServedModel, image: np.ndarray, passes: int, threshold: float,
                      seed: int, fan_out: int | None = None, u: float | None = None,
                      explain: bool = False) -> dict[str, Any]:
        """Predict one uint8 ``[H, W, 3]`` image (``fan_out`` None = backend default; ``u`` the image's
        APS uniform, ``image_uniform`` of its bytes; ``explain``: the overlay PNG too); returns
        the /predict JSON."""

    async def ready(self, model: ServedModel | None = None) -> bool:
        """True when every deployment behind the API (or behind ``model``) can answer."""


@dataclass(frozen=True)
class ApiSettings:
    """Limits, auth and observers of the API.

    Args:
        max_body_bytes: request bodies over this get 413 (checked before reading them all).
        max_pixels: decoded images over this many pixels get 400 (decompression bombs).
        max_passes: upper bound of the ``passes`` parameter.
        max_batch: most images in one OIP infer request.
        token: bearer token; None = auth off.
        seed: default seed of the MC passes for every model (None: each bundle's own).
        metrics: per-replica metrics (``raycyto.serve.metrics.ServeMetrics``); None = off.
        audit: JSONL audit log (``raycyto.serve.audit.AuditLog``); None = off.
        drain_token: secret of the drain route (:class:`DrainMiddleware`); default: the
            environment's ``$RAYCYTO_DRAIN_TOKEN`` (set by ``raycyto serve`` for its own Ray);
            None: no drain route.
    """

    max_body_bytes: int = 10 * 1024 * 1024
    max_pixels: int | None = None
    max_passes: int = 1000
    max_batch: int = 16
    token: str | None = field(default=None, repr=False)
    seed: int | None = None
    metrics: Any = None
    audit: Any = None
    drain_token: str | None = field(default_factory=lambda: os.environ.get(DRAIN_TOKEN_ENV) or None, repr=False)


@dataclass(frozen=True)
class _Ctx:
    backend: Backend
    settings: ApiSettings


def _ctx(request: Request) -> _Ctx:
    return request.app.state.ctx


class PredictParams(BaseModel):
    """Optional parameters of a prediction (query string, form fields or OIP parameters)."""

    model_config = ConfigDict(extra="ignore")
    passes: int | None = Field(None, ge=1, description="stochastic MC-dropout passes T")
    threshold: float | None = Field(None, ge=0.0, le=1.0, description="refer below this confidence")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="seed of the MC passes")
    fan_out: int | None = Field(None, ge=1, le=MAX_FAN_OUT, description="chunks the passes are split into")
    explain: bool | None = Field(None, description="also overlay_png (the image with the evidence map painted "
                                                   "over it) and Grad-CAM evidence for pooled heads")


def _validation_message(errors: list[dict[str, Any]]) -> str:
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body",)) or "request"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def _params(query: dict[str, Any], extra: dict[str, Any], settings: ApiSettings) -> PredictParams:
    """Merge query and form/OIP parameters (query wins) and validate them (422 on error)."""
    given = lambda d: {k: v for k, v in d.items() if v is not None and v != ""}  # noqa: E731
    merged = {**given(extra), **given(query)}
    try:
        p = PredictParams.model_validate(merged)
    except ValidationError as e:
        raise ClientError(422, "invalid_parameters", _validation_message(e.errors())) from None
    if p.passes is not None and p.passes > settings.max_passes:
        raise ClientError(422, "invalid_parameters",
                          f"passes: {p.passes} is over the limit of {settings.max_passes}")
    return p


# ----------------------------------------------------------------------------- errors


def _error_response(request: Request, status: int, kind: str, message: str,
                    headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    """The one error shape; under /v2 ``error`` is the message itself (what OIP clients show)."""
    body = error_body(status, kind, message, **extra)
    if request.url.path.startswith("/v2"):
        body = {**body, "error": message, "kind": kind}
    return JSONResponse(body, status, headers=headers)


async def _on_client_error(request: Request, e: ClientError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return _error_response(request, e.status, e.kind, e.message, headers)


async def _on_invalid(request: Request, e: RequestValidationError) -> JSONResponse:
    from fastapi.encoders import jsonable_encoder

    # bytes in an error's "input" are not text: describe them instead of decoding them
    errors = jsonable_encoder(e.errors(), custom_encoder={
        Exception: str, bytes: lambda b: f"<{len(b)} bytes>"})
    status = 400 if any(x.get("type") == "json_invalid" for x in errors) else 422
    return _error_response(request, status, "invalid_request", _validation_message(errors), detail=errors)


async def _on_http(request: Request, e: HTTPException) -> JSONResponse:
    kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "bad_request")
    return _error_response(request, e.status_code, kind, str(e.detail), getattr(e, "headers", None))


async def _on_unavailable(request: Request, e: ServiceUnavailable) -> JSONResponse:
    return _error_response(request, 503, "unavailable", f"{e}; retry shortly", {"Retry-After": "1"})


async def _on_internal(request: Request, e: Exception) -> JSONResponse:
    ref = uuid.uuid4().hex[:12]
    log.exception("internal error %s", ref)
    return _error_response(request, 500, "internal_error", f"internal server error (ref {ref})")


ERROR_SCHEMA = {"type": "object", "required": ["error", "message", "status"], "properties": {
    "error": {"type": "string"}, "message": {"type": "string"}, "status": {"type": "integer"}}}
_ERROR_TEXT = {400: "malformed request or undecodable image", 401: "missing or wrong bearer token",
               404: "unknown model or version", 413: "request body too large",
               415: "unsupported media type or image format", 422: "invalid parameters or tensors",
               503: "overloaded or replicas unavailable; retry (Retry-After)"}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the given error statuses."""
    return {c: {"description": _ERROR_TEXT[c],
                "content": {"application/json": {"schema": ERROR_SCHEMA}}} for c in codes}


# ----------------------------------------------------------------------------- auth, labels


_bearer = HTTPBearer(auto_error=False)


async def require_token(request: Request,
                        cred: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    """401 unless auth is off or the request carries ``Authorization: Bearer <token>``."""
    token = _ctx(request).settings.token
    if token is None:
        return
    given = (cred.credentials if cred is not None else "").encode()
    if not hmac.compare_digest(given, token.encode()):
        raise ClientError(401, "unauthorized",
                          "missing or wrong bearer token: send 'Authorization: Bearer <token>'")


def _label(request: Request, **labels: str) -> None:
    """Record metric labels (route template, model) for the metrics middleware."""
    request.scope.setdefault("raycyto.labels", {}).update(labels)


async def _route_label(request: Request) -> None:
    route = request.scope.get("route")
    _label(request, route=getattr(route, "path", "unmatched"))


AUTH = [Depends(require_token)]
router = APIRouter(dependencies=[Depends(_route_label)])


async def _run_one(request: Request, model: ServedModel, data: bytes, p: PredictParams,
                   field_name: str) -> dict[str, Any]:
    """Decode, predict, then count and audit one image.

    Every answer, from ``/predict`` and from OIP v2 infer (one call per image of the batch),
    comes through here: this is the one place that writes its audit record."""
    ctx = _ctx(request)
    s = ctx.settings
    t0 = request.scope.get("raycyto.t0") or time.perf_counter()
    _label(request, model=model.name)
    image = await asyncio.to_thread(decode_upload, data, s.max_pixels, field_name)
    seed = p.seed if p.seed is not None else model.seed if s.seed is None else s.seed
    result = await ctx.backend.predict(
        model, image, p.passes or model.passes, model.threshold if p.threshold is None else p.threshold,
        seed, p.fan_out, image_uniform(data), bool(p.explain))
    if s.metrics is not None:
        s.metrics.prediction(model, result)
    if s.audit is not None:
        s.audit.write(model, hashlib.sha256(data).hexdigest(), result, route=_label_of(request, "route"),
                      latency_ms=(time.perf_counter() - t0) * 1000.0)
    return result


def _label_of(request: Request, key: str) -> str:
    return str(request.scope.get("raycyto.labels", {}).get(key, ""))


# ----------------------------------------------------------------------------- /predict


_UPLOAD_DOC = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary"},
        "passes": {"type": "integer", "minimum": 1},
        "threshold": {"type": "number", "minimum": 0, "maximum": 1},
        "seed": {"type": "integer", "minimum": 0},
        "fan_out": {"type": "integer", "minimum": 1, "maximum": MAX_FAN_OUT},
        "explain": {"type": "boolean"}}}},
    **{ct: {"schema": {"type": "string", "format": "binary"}}
       for ct in ("image/png", "image/jpeg", "image/tiff", "image/bmp")}}}}


@router.post("/predict", dependencies=AUTH, openapi_extra=_UPLOAD_DOC,
             responses=_errors(400, 401, 404, 413, 415, 422, 503),
             summary="Classify one image with an MC-dropout confidence")
async def predict(request: Request,
                  passes: int | None = Query(None, ge=1),
                  threshold: float | None = Query(None, ge=0.0, le=1.0),
                  seed: int | None = Query(None, ge=0, le=MAX_SEED),
                  fan_out: int | None = Query(None, ge=1, le=MAX_FAN_OUT),
                  explain: bool | None = Query(None, description="also overlay_png, the evidence map over "
                                                                 "the image (Grad-CAM for pooled heads)"),
                  model: str | None = Query(None, description="model name (default: the first served)"),
                  version: str | None = Query(None, description="model version (default: the name's last listed)"),
                  ) -> dict[str, Any]:
    """One image as multipart field ``file`` or as the raw body (image/png, jpeg, tiff, bmp).

    Answers carry ``evidence`` (top 3 chromosomes, karyogram bundles) and ``evidence_map``
    when the model's head gives them from the embedding (map heads); ``explain=true`` adds
    ``overlay_png`` (base64 PNG) and Grad-CAM evidence for pooled heads.

    Example: ``curl -F file=@cell.png 'localhost:8000/predict?passes=100&explain=true'``
    """
    ctx = _ctx(request)
    served = ctx.backend.index.resolve(model, version)
    query = {"passes": passes, "threshold": threshold, "seed": seed, "fan_out": fan_out, "explain": explain}
    ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=8)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            got = sorted(form.keys())
            what = "a text field, not a file" if upload is not None else "missing"
            raise ClientError(422, "missing_file",
                              f"multipart field 'file' is {what} (fields received: {got}); "
                              f"send the image as -F file=@image.png")
        extra = {k: v for k, v in form.items() if k in PredictParams.model_fields and isinstance(v, str)}
        data = await upload.read()
        await form.close()
        return await _run_one(request, served, data, _params(query, extra, ctx.settings), "file")
    if ctype not in IMAGE_CONTENT_TYPES:
        check_content_type(ctype)
    return await _run_one(request, served, await request.body(), _params(query, {}, ctx.settings), "body")


@router.get("/models", dependencies=AUTH, responses=_errors(401), summary="Index of the served models")
async def model_index(request: Request) -> dict[str, Any]:
    """Every model version served here, with its defaults and routes."""
    index = _ctx(request).backend.index
    return {"models": [index.describe(m) for m in index.models]}


# ----------------------------------------------------------------------------- OIP v2


@router.get("/v2/health/live", summary="OIP v2 liveness")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready", summary="OIP v2 readiness", responses=_errors(503))
async def ready(request: Request) -> JSONResponse:
    ok = await _ctx(request).backend.ready()
    return JSONResponse({"ready": ok}, 200 if ok else 503)


@router.get("/v2", dependencies=AUTH, responses=_errors(401), summary="OIP v2 server metadata")
async def server_metadata() -> dict[str, Any]:
    from raycyto import __version__

    return {"name": "raycyto", "version": str(__version__), "extensions": list(oip.EXTENSIONS)}


@router.post("/v2/repository/index", dependencies=AUTH, responses=_errors(401),
             summary="OIP v2 model repository index (every name and version, all READY)")
async def repository_index(request: Request) -> list[dict[str, str]]:
    return [{"name": m.name, "version": m.version, "state": "READY"}
            for m in _ctx(request).backend.index.models]


def _served(request: Request, name: str, version: str | None) -> ServedModel:
    m = _ctx(request).backend.index.resolve(name, version)
    _label(request, model=m.name)
    return m


async def _model_metadata(request: Request, name: str, version: str | None) -> dict[str, Any]:
    m = _served(request, name, version)
    versions = list(_ctx(request).backend.index.by_name[m.name])
    return oip.model_metadata(m, versions)


async def _model_ready(request: Request, name: str, version: str | None) -> JSONResponse:
    m = _served(request, name, version)
    ok = await _ctx(request).backend.ready(m)
    return JSONResponse({"name": m.name, "version": m.version, "ready": ok}, 200 if ok else 503)


async def _infer(request: Request, name: str, version: str | None) -> Response:
    ctx = _ctx(request)
    m = _served(request, name, version)
    req = oip.parse_request(await request.body(), request.headers, ctx.settings.max_body_bytes)
    images = oip.image_input(req, ctx.settings.max_batch)
    p = _params({}, {**(req.parameters or {}), **(req.inputs[0].parameters or {})}, ctx.settings)
    results = await asyncio.gather(*[_run_one(request, m, data, p, f"inputs[0][{i}]")
                                     for i, data in enumerate(images)])
    body, headers = oip.encode_response(m, req, list(results))
    if headers:
        return Response(body, 200, headers=headers, media_type="application/octet-stream")
    return Response(body, 200, media_type="application/json")


def _routes(path: str, handler: Any, method: str, summary: str, **kw: Any) -> None:
    """Register ``handler`` at ``/v2/models/{name}<path>`` and ``.../versions/{version}<path>``."""
    async def latest(request: Request, name: str) -> Any:
        return await handler(request, name, None)

    async def versioned(request: Request, name: str, version: str) -> Any:
        return await handler(request, name, version)

    router.add_api_route(f"/v2/models/{{name}}{path}", latest, methods=[method], summary=summary,
                         dependencies=AUTH, name=f"{handler.__name__.strip('_')}", **kw)
    router.add_api_route(f"/v2/models/{{name}}/versions/{{version}}{path}", versioned, methods=[method],
                         summary=f"{summary} (one version)", dependencies=AUTH,
                         name=f"{handler.__name__.strip('_')}_version", **kw)


_routes("", _model_metadata, "GET", "OIP v2 model metadata", responses=_errors(401, 404))
_routes("/ready", _model_ready, "GET", "OIP v2 model readiness", responses=_errors(401, 404, 503))
_routes("/infer", _infer, "POST", "OIP v2 inference: images as BYTES (binary extension, or base64 text in JSON)",
        responses=_errors(400, 401, 404, 413, 415, 422, 503), openapi_extra=oip.INFER_DOC)


# ----------------------------------------------------------------------------- clean stop


class DrainMiddleware:
    """ASGI middleware: stop taking requests on demand, finish the ones in flight.

    ``POST /-/raycyto/drain`` with the header ``X-Raycyto-Drain: <drain token>`` switches this
    API to draining (for good) and answers ``{"draining": true, "in_flight": n}``: the requests
    still being answered, which the caller polls until 0 (the route exists only when a token is
    configured; see :attr:`ApiSettings.drain_token`). While draining every new request gets 503
    (JSON error, ``Retry-After: 1``, ``Connection: close``), ``/v2/health/ready`` says
    ``{"ready": false, "draining": true}`` (503) and ``/v2/health/live`` stays 200.

    It also stamps each request's arrival (``scope["raycyto.t0"]``) for the audit's latency.
    """

    def __init__(self, app: Any, token: str | None) -> None:
        self.app = app
        self.token = token
        self.draining = False
        self.in_flight = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("raycyto.t0", time.perf_counter())
        path = scope.get("path", "")
        if path == DRAIN_PATH and scope.get("method") == "POST" and self._authorized(scope):
            await self._drain(scope, receive, send)
            return
        if self.draining and path != "/v2/health/live":
            await self._refuse(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    def _authorized(self, scope: dict) -> bool:
        """The drain token is configured and the request carries it (else: an ordinary 404)."""
        if self.token is None:
            return False
        given = next((v for k, v in scope.get("headers", []) if k.decode("latin-1").lower() == DRAIN_HEADER), b"")
        return hmac.compare_digest(given, self.token.encode())

    async def _drain(self, scope: dict, receive: Any, send: Any) -> None:
        if not self.draining:
            log.info("draining: new requests get 503; %d in flight finish", self.in_flight)
        self.draining = True
        await JSONResponse({"draining": True, "in_flight": self.in_flight})(scope, receive, send)

    async def _refuse(self, scope: dict, receive: Any, send: Any) -> None:
        headers = {"Retry-After": "1", "Connection": "close"}
        if scope.get("path") == "/v2/health/ready":
            await JSONResponse({"ready": False, "draining": True}, 503, headers=headers)(scope, receive, send)
            return
        message = "the server is shutting down; retry shortly (or on another replica)"
        body = error_body(503, "unavailable", message)
        if scope.get("path", "").startswith("/v2"):
            body = {**body, "error": message, "kind": "unavailable"}
        await JSONResponse(body, 503, headers=headers)(scope, receive, send)


# ----------------------------------------------------------------------------- the app


def _openapi(api: FastAPI, index: ModelIndex, settings: ApiSettings) -> dict[str, Any]:
    """FastAPI's schema plus what only the running app knows: served model names and versions
    (as enums, so a fuzzer reaches the infer routes), limits, and a real image example."""
    from fastapi.openapi.utils import get_openapi

    if api.openapi_schema is None:
        # a deep copy: the schema shares dicts with routes' openapi_extra, which are edited below
        schema = copy.deepcopy(get_openapi(title=api.title, version=api.version,
                                           description=api.description, routes=api.routes))
        names = sorted(index.by_name)
        versions = sorted({m.version for m in index.models})
        enums = {"name": names, "model": names, "version": versions}
        for item in schema.get("paths", {}).values():
            for op in item.values():
                for prm in op.get("parameters", []):
                    if prm["name"] in enums:
                        target = prm["schema"].get("anyOf", [prm["schema"]])[0]
                        target["enum"] = enums[prm["name"]]
                        prm["example"] = enums[prm["name"]][0]
                    elif prm["name"] == "passes":
                        target = prm["schema"].get("anyOf", [prm["schema"]])[0]
                        target["maximum"] = settings.max_passes
        oip.document_examples(schema, settings.max_batch)
        api.openapi_schema = schema
    return api.openapi_schema


def build_api(backend: Backend, settings: ApiSettings) -> FastAPI:
    """Build the FastAPI app: routes, error mapping, body-size limit, drain and (optional) metrics.

    Args:
        backend: runs the models (see :class:`Backend`).
        settings: limits, auth, metrics and audit.
    Returns:
        the FastAPI app.
    """
    api = FastAPI(title="raycyto", version="1",
                  description="Karyogram / blood-smear classification with MC-dropout confidence. "
                              "Several models by name and version; OIP v2 with binary tensors.")
    api.state.ctx = _Ctx(backend, settings)
    api.include_router(router)
    api.add_exception_handler(ClientError, _on_client_error)
    api.add_exception_handler(RequestValidationError, _on_invalid)
    api.add_exception_handler(HTTPException, _on_http)
    api.add_exception_handler(ServiceUnavailable, _on_unavailable)
    api.add_exception_handler(Exception, _on_internal)
    api.openapi = lambda: _openapi(api, backend.index, settings)  # type: ignore[method-assign]
    api.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    api.add_middleware(DrainMiddleware, token=settings.drain_token)  # outside the body limit: 503s read nothing
    if settings.metrics is not None:
        from raycyto.serve.metrics import MetricsMiddleware

        api.add_middleware(MetricsMiddleware, metrics=settings.metrics)  # outermost: sees 413s too
    return api
