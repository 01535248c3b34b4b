"""The HTTP API (FastAPI): ``/predict``, Open Inference Protocol v2, auth, error mapping.

:func:`build_api` wires routes to a :class:`Backend` (the Serve ingress, or anything that
can predict a decoded image), so the same API runs on Serve and in tests. Errors are
always JSON ``{"error", "message", "status"}``; nothing a client sends produces a 5xx.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

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
OIP_DATATYPES = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32",
                        "INT64", "FP16", "FP32", "FP64", "BYTES"]


class ServiceUnavailable(Exception):
    """The backend cannot answer right now (e.g. replicas restarting); maps to 503 + Retry-After."""


class Backend(Protocol):
    """What the API needs from whoever runs the model."""

    model_info: dict[str, str]       # {"name", "sha256"}
    class_names: list[str]
    input_size: int
    default_passes: int
    default_threshold: float

    async def predict(self, image: np.ndarray, passes: int, threshold: float, seed: int,
                      fan_out: int | None = None) -> dict[str, Any]:
        """Predict one uint8 ``[H, W, 3]`` image (``fan_out`` None = backend default); returns the /predict JSON."""

    async def ready(self) -> bool:
        """True when every deployment behind the API can answer."""


@dataclass(frozen=True)
class ApiSettings:
    """Limits and auth of the API.

    Args:
        max_body_bytes: request bodies over this get 413 (checked before reading them all).
        max_pixels: decoded images over this many pixels get 400 (decompression bombs).
        max_passes: upper bound of the ``passes`` parameter.
        max_batch: most images in one OIP infer request.
        token: bearer token; None = auth off.
        seed: default seed of the MC passes.
    """

    max_body_bytes: int = 10 * 1024 * 1024
    max_pixels: int | None = None
    max_passes: int = 1000
    max_batch: int = 16
    token: str | None = field(default=None, repr=False)
    seed: int = 0


class PredictParams(BaseModel):
    """Optional parameters of a prediction (query string, form fields or OIP parameters)."""

    model_config = ConfigDict(extra="ignore")
    passes: int | None = Field(None, ge=1, description="stochastic MC-dropout passes T")
    threshold: float | None = Field(None, ge=0.0, le=1.0, description="refer below this confidence")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="seed of the MC passes")
    fan_out: int | None = Field(None, ge=1, le=MAX_FAN_OUT, description="chunks the passes are split into")


class InferTensor(BaseModel):
    """An OIP v2 request input: the images as base64 BYTES."""

    name: str
    shape: list[int] = Field(..., min_length=1)
    datatype: OIP_DATATYPES
    parameters: dict[str, Any] | None = None
    data: list[Any]


class InferRequest(BaseModel):
    """OIP v2 inference request."""

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferTensor] = Field(..., min_length=1, max_length=1)
    outputs: list[dict[str, Any]] | None = None


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


def build_api(backend: Backend, settings: ApiSettings) -> FastAPI:
    """Build the FastAPI app (wrapped in the body-size middleware).

    Args:
        backend: runs the model (see :class:`Backend`).
        settings: limits and auth.
    Returns:
        the FastAPI app (body-size middleware installed).
    """
    api = FastAPI(title="raycyto", version="1",
                  description="Karyogram / blood-smear classification with MC-dropout confidence.")
    bearer = HTTPBearer(auto_error=False)

    # ------------------------------------------------------------------ errors
    @api.exception_handler(ClientError)
    async def _client_error(_: Request, e: ClientError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(error_body(e.status, e.kind, e.message), e.status, headers=headers)

    @api.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        from fastapi.encoders import jsonable_encoder

        errors = jsonable_encoder(e.errors(), custom_encoder={Exception: str})
        status = 400 if any(x.get("type") == "json_invalid" for x in errors) else 422
        return JSONResponse(error_body(status, "invalid_request", _validation_message(errors),
                                       detail=errors), status)

    @api.exception_handler(HTTPException)
    async def _http(_: Request, e: HTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "bad_request")
        return JSONResponse(error_body(e.status_code, kind, str(e.detail)), e.status_code,
                            headers=getattr(e, "headers", None))

    @api.exception_handler(ServiceUnavailable)
    async def _unavailable(_: Request, e: ServiceUnavailable) -> JSONResponse:
        return JSONResponse(error_body(503, "unavailable", f"{e}; retry shortly"), 503,
                            headers={"Retry-After": "1"})

    @api.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        ref = uuid.uuid4().hex[:12]
        log.exception("internal error %s", ref)
        return JSONResponse(error_body(500, "internal_error", f"internal server error (ref {ref})"), 500)

    # ------------------------------------------------------------------ auth
    async def require_token(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if settings.token is None:
            return
        given = (cred.credentials if cred is not None else "").encode()
        if not hmac.compare_digest(given, settings.token.encode()):
            raise ClientError(401, "unauthorized",
                              "missing or wrong bearer token: send 'Authorization: Bearer <token>'")

    auth = [Depends(require_token)]

    async def run_one(data: bytes, p: PredictParams, field_name: str) -> dict[str, Any]:
        image = await asyncio.to_thread(decode_upload, data, settings.max_pixels, field_name)
        return await backend.predict(
            image, p.passes or backend.default_passes,
            backend.default_threshold if p.threshold is None else p.threshold,
            settings.seed if p.seed is None else p.seed, p.fan_out)

    # ------------------------------------------------------------------ /predict
    upload_doc = {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
            "file": {"type": "string", "format": "binary"},
            "passes": {"type": "integer", "minimum": 1},
            "threshold": {"type": "number", "minimum": 0, "maximum": 1},
            "seed": {"type": "integer", "minimum": 0},
            "fan_out": {"type": "integer", "minimum": 1, "maximum": MAX_FAN_OUT}}}},
        **{ct: {"schema": {"type": "string", "format": "binary"}}
           for ct in ("image/png", "image/jpeg", "image/tiff", "image/bmp")}}}}

    @api.post("/predict", dependencies=auth, openapi_extra=upload_doc,
              summary="Classify one image with an MC-dropout confidence")
    async def predict(request: Request,
                      passes: int | None = Query(None, ge=1, le=settings.max_passes),
                      threshold: float | None = Query(None, ge=0.0, le=1.0),
                      seed: int | None = Query(None, ge=0, le=MAX_SEED),
                      fan_out: int | None = Query(None, ge=1, le=MAX_FAN_OUT)) -> dict[str, Any]:
        """One image as multipart field ``file`` or as the raw body (image/png, jpeg, tiff, bmp).

        Example: ``curl -F file=@cell.png 'localhost:8000/predict?passes=100'``
        """
        query = {"passes": passes, "threshold": threshold, "seed": seed, "fan_out": fan_out}
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
            return await run_one(data, _params(query, extra, settings), "file")
        if ctype == "" or ctype not in IMAGE_CONTENT_TYPES:
            check_content_type(ctype)
        return await run_one(await request.body(), _params(query, {}, settings), "body")

    # ------------------------------------------------------------------ OIP v2
    @api.get("/v2/health/live", summary="OIP v2 liveness")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @api.get("/v2/health/ready", summary="OIP v2 readiness", responses={503: {"description": "not ready"}})
    async def ready() -> JSONResponse:
        ok = await backend.ready()
        return JSONResponse({"ready": ok}, 200 if ok else 503)

    @api.get("/v2", dependencies=auth, summary="OIP v2 server metadata")
    async def server_metadata() -> dict[str, Any]:
        from raycyto import __version__

        return {"name": "raycyto", "version": str(__version__), "extensions": []}

    def check_model(name: str) -> None:
        if name != backend.model_info["name"]:
            raise ClientError(404, "model_not_found",
                              f"model {name!r} is not served here; available: [{backend.model_info['name']!r}]")

    def metadata() -> dict[str, Any]:
        c = len(backend.class_names)
        return {
            "name": backend.model_info["name"],
            "versions": [backend.model_info["sha256"][:12]],
            "platform": "pytorch",
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [
                {"name": "label", "datatype": "BYTES", "shape": [-1]},
                {"name": "confidence", "datatype": "FP64", "shape": [-1]},
                {"name": "refer", "datatype": "BOOL", "shape": [-1]},
                {"name": "probabilities", "datatype": "FP64", "shape": [-1, c]},
                {"name": "std", "datatype": "FP64", "shape": [-1, c]},
                {"name": "entropy", "datatype": "FP64", "shape": [-1]},
                {"name": "mutual_information", "datatype": "FP64", "shape": [-1]},
            ],
            "parameters": {"class_names": list(backend.class_names), "input_size": backend.input_size,
                           "passes": backend.default_passes, "threshold": backend.default_threshold,
                           "sha256": backend.model_info["sha256"]},
        }

    @api.get("/v2/models/{name}", dependencies=auth, summary="OIP v2 model metadata")
    async def model_metadata(name: str) -> dict[str, Any]:
        check_model(name)
        return metadata()

    @api.get("/v2/models/{name}/ready", dependencies=auth, summary="OIP v2 model readiness")
    async def model_ready(name: str) -> JSONResponse:
        check_model(name)
        ok = await backend.ready()
        return JSONResponse({"name": name, "ready": ok}, 200 if ok else 503)

    @api.post("/v2/models/{name}/infer", dependencies=auth, summary="OIP v2 inference (images as base64 BYTES)")
    async def infer(name: str, req: InferRequest) -> dict[str, Any]:
        check_model(name)
        tensor = req.inputs[0]
        if tensor.datatype != "BYTES":
            raise ClientError(422, "invalid_input",
                              f"inputs[0].datatype is {tensor.datatype!r}; send the images as BYTES (base64)")
        items = _flatten(tensor.data)
        if int(np.prod(tensor.shape)) != len(items) or not 1 <= len(items) <= settings.max_batch:
            raise ClientError(422, "invalid_input",
                              f"inputs[0]: shape {tensor.shape} must match the {len(items)} data "
                              f"items and hold 1..{settings.max_batch} images")
        p = _params({}, {**(req.parameters or {}), **(tensor.parameters or {})}, settings)
        images = [_b64(item, i) for i, item in enumerate(items)]
        results = [await run_one(data, p, f"inputs[0].data[{i}]") for i, data in enumerate(images)]
        return _oip_response(backend.model_info, req.id, results, backend.class_names)

    api.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    return api


def _flatten(data: list[Any]) -> list[Any]:
    out: list[Any] = []
    for x in data:
        out.extend(_flatten(x) if isinstance(x, list) else [x])
    return out


def _b64(item: Any, i: int) -> bytes:
    if not isinstance(item, str):
        raise ClientError(422, "invalid_input", f"inputs[0].data[{i}] must be a base64 string")
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError(400, "invalid_base64", f"inputs[0].data[{i}] is not valid base64") from None


def _oip_response(info: dict[str, str], req_id: str | None, results: list[dict[str, Any]],
                  class_names: list[str]) -> dict[str, Any]:
    """OIP v2 infer response: one output tensor per field, batch dimension first."""
    n, c = len(results), len(class_names)

    def out(name: str, datatype: str, shape: list[int], data: list[Any]) -> dict[str, Any]:
        return {"name": name, "datatype": datatype, "shape": shape, "data": data}

    return {
        "model_name": info["name"],
        "model_version": info["sha256"][:12],
        "id": req_id or uuid.uuid4().hex,
        "parameters": {"passes": [r["passes"] for r in results], "class_names": list(class_names),
                       "replicas": [r["replicas"] for r in results], "sha256": info["sha256"]},
        "outputs": [
            out("label", "BYTES", [n], [r["label"] for r in results]),
            out("confidence", "FP64", [n], [r["confidence"] for r in results]),
            out("refer", "BOOL", [n], [r["refer"] for r in results]),
            out("probabilities", "FP64", [n, c], [r["probabilities"][k] for r in results for k in class_names]),
            out("std", "FP64", [n, c], [r["std"][k] for r in results for k in class_names]),
            out("entropy", "FP64", [n], [r["entropy"] for r in results]),
            out("mutual_information", "FP64", [n], [r["mutual_information"] for r in results]),
        ],
    }
