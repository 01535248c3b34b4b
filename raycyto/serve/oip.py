"""Open Inference Protocol v2 (KServe / Triton) encoding: requests in, tensors out.

* JSON: an infer request is a JSON object; a BYTES element in JSON is a string, so an image
  sent as JSON is its base64 text.
* Binary tensor data extension: the header ``Inference-Header-Content-Length: N`` says the
  first N bytes of the body are the JSON; an input with ``parameters.binary_data_size``
  takes its bytes from what follows, in input order. A BYTES element in binary is a 4-byte
  little-endian length followed by that many bytes (raw PNG/JPEG/TIFF/BMP here). Outputs
  asked for with ``parameters.binary_data`` (or all of them with the request parameter
  ``binary_data_output``) come back the same way, each output's JSON carrying
  ``parameters.binary_data_size`` instead of ``data``.

:data:`OUTPUTS` is the one table of output tensors: name -> datatype and how to read the
values of one image from a ``build_result`` dict. Metadata and responses derive from it.
Optional rows (the prediction set, the out-of-distribution guard) appear only for models
whose bundle has them. ``prediction_set`` is a BOOL ``[n, C]`` membership mask (the class
names are in the response parameters); ``refer_reason`` is ``""`` when not referred.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
import uuid
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from raycyto.serve.validation import ClientError

if TYPE_CHECKING:
    from raycyto.serve.api import ServedModel

EXTENSIONS = ("binary_tensor_data",)
INPUT_NAME = "image"
HEADER_LENGTH = "Inference-Header-Content-Length"
DATATYPES = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32",
                    "INT64", "FP16", "FP32", "FP64", "BYTES"]


@dataclass(frozen=True)
class Output:
    """An output tensor: ``datatype`` and the values of one image (1, or one per class).

    ``optional``: the answer has this field only when the bundle supports it (a conformal
    calibration, a guard); a model without it does not list the output.
    """

    datatype: str
    values: Callable[[dict[str, Any], Sequence[str]], list[Any]]
    per_class: bool = False
    optional: bool = False


def _one(key: str) -> Callable[[dict[str, Any], Sequence[str]], list[Any]]:
    return lambda r, classes: [r[key]]


def _per_class(key: str) -> Callable[[dict[str, Any], Sequence[str]], list[Any]]:
    return lambda r, classes: [r[key][c] for c in classes]


def _text(key: str) -> Callable[[dict[str, Any], Sequence[str]], list[Any]]:
    return lambda r, classes: ["" if r[key] is None else str(r[key])]


def _json(key: str) -> Callable[[dict[str, Any], Sequence[str]], list[Any]]:
    import json

    return lambda r, classes: [json.dumps(r[key])]   # e.g. evidence: '[{"chromosome": "21", "score": 0.83}, ...]'


def _members(key: str) -> Callable[[dict[str, Any], Sequence[str]], list[Any]]:
    return lambda r, classes: [c in r[key] for c in classes]   # set membership per class


# One row per output; a new field of build_result's JSON is one more row.
OUTPUTS: dict[str, Output] = {
    "label": Output("BYTES", _one("label")),
    "confidence": Output("FP64", _one("confidence")),
    "refer": Output("BOOL", _one("refer")),
    "probabilities": Output("FP64", _per_class("probabilities"), per_class=True),
    "std": Output("FP64", _per_class("std"), per_class=True),
    "entropy": Output("FP64", _one("entropy")),
    "mutual_information": Output("FP64", _one("mutual_information")),
    "rule": Output("BYTES", _text("rule")),
    "refer_reason": Output("BYTES", _text("refer_reason")),  # "" when not referred
    "prediction_set": Output("BOOL", _members("prediction_set"), per_class=True, optional=True),
    "coverage": Output("FP64", _one("coverage"), optional=True),
    "out_of_distribution": Output("BOOL", _one("out_of_distribution"), optional=True),
    "ood_score": Output("FP64", _one("ood_score"), optional=True),
    # the top 3 chromosomes as JSON text (karyogram bundles with a layout; ServedModel.provides says when)
    "evidence": Output("BYTES", _json("evidence"), optional=True),
    # base64 PNG of the image with the evidence map over it (request parameter explain=true)
    "overlay_png": Output("BYTES", _one("overlay_png"), optional=True),
}


def outputs_of(model: "ServedModel") -> list[str]:
    """The outputs ``model`` gives: every required one, optional ones it provides."""
    return [k for k, o in OUTPUTS.items() if not o.optional or k in model.provides]
_NUMPY = {"FP64": "<f8", "FP32": "<f4", "INT64": "<i8", "INT32": "<i4"}


# ----------------------------------------------------------------------------- requests


class InferTensor(BaseModel):
    """An OIP v2 request input."""

    name: str
    shape: list[int] = Field(..., min_length=1)
    datatype: DATATYPES
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class RequestedOutput(BaseModel):
    """An OIP v2 requested output (``parameters.binary_data`` asks for binary)."""

    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    """OIP v2 inference request (the JSON part)."""

    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferTensor] = Field(..., min_length=1, max_length=1)
    outputs: list[RequestedOutput] | None = None
    binary: bytes = b""  # what followed the JSON header (binary extension)


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """gzip/deflate request bodies (tritonclient's request compression), capped at ``limit``."""
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding)
    if wbits is None:
        raise ClientError(415, "unsupported_encoding",
                          f"Content-Encoding {encoding!r} is not supported; send identity, gzip or deflate")
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as e:
        raise ClientError(400, "invalid_encoding", f"the {encoding} body cannot be decompressed: {e}") from None
    if len(out) > limit:
        raise ClientError(413, "payload_too_large", f"the decompressed body is over the limit of {limit} bytes")
    return out


def parse_request(body: bytes, headers: Mapping[str, str], max_bytes: int) -> InferRequest:
    """Split and validate an infer body (JSON, or JSON + binary tensors).

    Raises:
        ClientError: 400 for a malformed body or header, 413/415 for compression, 422 for
            a JSON that is not an inference request.
    """
    encoding = (headers.get("content-encoding") or "identity").strip().lower()
    if encoding not in ("", "identity"):
        body = _decompress(body, encoding, max_bytes)
    declared = headers.get(HEADER_LENGTH.lower())
    binary = b""
    if declared is not None:
        if not declared.strip().isdigit() or int(declared) > len(body):
            raise ClientError(400, "invalid_header",
                              f"{HEADER_LENGTH} {declared!r} must be a byte count within the "
                              f"{len(body)}-byte body")
        n = int(declared)
        body, binary = body[:n], body[n:]
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        hint = "" if declared is not None else f" (binary tensors need the {HEADER_LENGTH} header)"
        raise ClientError(400, "invalid_json", f"the request JSON cannot be parsed: {e}{hint}") from None
    if not isinstance(doc, dict):
        raise ClientError(400, "invalid_json", "the request JSON must be an object with 'inputs'")
    try:
        req = InferRequest.model_validate(doc)
    except ValidationError as e:
        from raycyto.serve.api import _validation_message

        raise ClientError(422, "invalid_request", _validation_message(e.errors())) from None
    return req.model_copy(update={"binary": binary})


def _flatten(data: list[Any]) -> list[Any]:
    out: list[Any] = []
    for x in data:
        out.extend(_flatten(x) if isinstance(x, list) else [x])
    return out


def split_bytes(buf: bytes, field: str) -> list[bytes]:
    """Binary BYTES tensor -> its elements (4-byte little-endian length + bytes, repeated)."""
    items, pos = [], 0
    while pos < len(buf):
        if pos + 4 > len(buf):
            raise ClientError(400, "invalid_binary_data",
                              f"{field}: {len(buf) - pos} stray bytes where a 4-byte length prefix should be")
        (n,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if pos + n > len(buf):
            raise ClientError(400, "invalid_binary_data",
                              f"{field}: element {len(items)} declares {n} bytes but {len(buf) - pos} remain")
        items.append(buf[pos:pos + n])
        pos += n
    return items


def _b64(item: Any, field: str) -> bytes:
    if not isinstance(item, str):
        raise ClientError(422, "invalid_input",
                          f"{field} must be a string (the image's base64 text) in JSON; "
                          f"raw bytes go in the binary extension")
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError(400, "invalid_base64", f"{field} is not valid base64") from None


def image_input(req: InferRequest, max_batch: int) -> list[bytes]:
    """The encoded images of the ``image`` input, from binary data or JSON base64 strings.

    Raises:
        ClientError: wrong name/datatype/shape, bad base64, inconsistent binary sizes.
    """
    t = req.inputs[0]
    if t.name != INPUT_NAME or t.datatype != "BYTES":
        raise ClientError(422, "invalid_input",
                          f"inputs[0] is {t.name!r} ({t.datatype}); this model has one input "
                          f"{INPUT_NAME!r} of datatype BYTES (encoded images)")
    if any(d < 0 for d in t.shape):
        raise ClientError(422, "invalid_input", f"inputs[0].shape {t.shape} has a negative dimension")
    size = (t.parameters or {}).get("binary_data_size")
    if size is not None:
        if t.data is not None:
            raise ClientError(400, "invalid_input", "inputs[0] has both 'data' and binary_data_size")
        if not isinstance(size, int) or isinstance(size, bool) or size != len(req.binary):
            raise ClientError(400, "invalid_binary_data",
                              f"inputs[0].parameters.binary_data_size {size!r} must equal the "
                              f"{len(req.binary)} bytes after the JSON header")
        items = split_bytes(req.binary, "inputs[0]")
    else:
        if req.binary:
            raise ClientError(400, "invalid_binary_data",
                              f"{len(req.binary)} binary bytes follow the JSON but no input declares binary_data_size")
        if t.data is None:
            raise ClientError(422, "invalid_input", "inputs[0] has no 'data' and no binary_data_size")
        items = [_b64(x, f"inputs[0].data[{i}]") for i, x in enumerate(_flatten(t.data))]
    if math.prod(t.shape) != len(items) or not 1 <= len(items) <= max_batch:
        raise ClientError(422, "invalid_input",
                          f"inputs[0]: shape {t.shape} must match the {len(items)} images sent "
                          f"and hold 1..{max_batch} of them")
    return items


# ----------------------------------------------------------------------------- responses


def _binary(datatype: str, values: list[Any]) -> bytes:
    if datatype == "BYTES":
        raw = [str(v).encode() for v in values]
        return b"".join(struct.pack("<I", len(b)) + b for b in raw)
    if datatype == "BOOL":
        return bytes(int(bool(v)) for v in values)
    return np.asarray(values, dtype=_NUMPY[datatype]).tobytes()


def _wanted(req: InferRequest, available: list[str]) -> list[tuple[str, bool]]:
    """(output name, binary?) in response order; 400 for an output this model does not give."""
    everything = bool((req.parameters or {}).get("binary_data_output", False))
    if not req.outputs:
        return [(name, everything) for name in available]
    out = []
    for o in req.outputs:
        if o.name not in available:
            why = "unknown" if o.name not in OUTPUTS else "not given by this model here (its bundle has no " \
                "conformal calibration, out-of-distribution guard or chromosome layout; overlay_png and the " \
                "evidence of pooled heads come with the parameter explain=true)"
            raise ClientError(400, "unknown_output", f"output {o.name!r} {why}; outputs: {available}")
        out.append((o.name, bool((o.parameters or {}).get("binary_data", everything))))
    return out


def encode_response(model: "ServedModel", req: InferRequest,
                    results: list[dict[str, Any]]) -> tuple[bytes, dict[str, str]]:
    """OIP v2 infer response for ``results`` (one ``build_result`` dict per image).

    Returns:
        (body, headers): JSON only (no headers), or JSON + binary outputs with
        ``Inference-Header-Content-Length``.
    """
    classes, n = list(model.class_names), len(results)
    outputs, blobs = [], []
    available = [k for k in outputs_of(model) if all(k in r for r in results)]
    for name, binary in _wanted(req, available):
        spec = OUTPUTS[name]
        values = [v for r in results for v in spec.values(r, classes)]
        tensor: dict[str, Any] = {"name": name, "datatype": spec.datatype,
                                  "shape": [n, len(classes)] if spec.per_class else [n]}
        if binary:
            blob = _binary(spec.datatype, values)
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = values
        outputs.append(tensor)
    header = json.dumps({
        "model_name": model.name, "model_version": model.version, "id": req.id or uuid.uuid4().hex,
        "parameters": {"passes": [r["passes"] for r in results], "class_names": classes,
                       "replicas": [r["replicas"] for r in results], "sha256": model.sha256},
        "outputs": outputs}).encode()
    if not blobs:
        return header, {}
    return header + b"".join(blobs), {HEADER_LENGTH: str(len(header))}


def model_metadata(model: "ServedModel", versions: list[str]) -> dict[str, Any]:
    """OIP v2 model metadata of one model version (outputs from :data:`OUTPUTS`)."""
    c = len(model.class_names)
    return {
        "name": model.name,
        "versions": versions,
        "platform": "pytorch",
        "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": k, "datatype": OUTPUTS[k].datatype, "shape": [-1, c] if OUTPUTS[k].per_class else [-1]}
                    for k in outputs_of(model)],
        "parameters": {"version": model.version, "sha256": model.sha256, "class_names": list(model.class_names),
                       "input_size": model.input_size, "passes": model.passes, "threshold": model.threshold,
                       "seed": model.seed, "scope": model.scope, **model.referral()},
    }


# ----------------------------------------------------------------------------- OpenAPI


_TENSOR = {"type": "object", "required": ["name", "shape", "datatype"], "properties": {
    "name": {"type": "string", "enum": [INPUT_NAME]},
    "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
    "datatype": {"type": "string", "enum": ["BYTES"]},
    "parameters": {"type": "object", "properties": {
        "binary_data_size": {"type": "integer", "minimum": 0},
        "passes": {"type": "integer", "minimum": 1},
        "threshold": {"type": "number", "minimum": 0, "maximum": 1}}},
    "data": {"type": "array", "items": {"type": "string", "description": "base64 of a PNG/JPEG/TIFF/BMP"}}}}
INFER_DOC: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object", "properties": {
            "passes": {"type": "integer", "minimum": 1}, "seed": {"type": "integer", "minimum": 0},
            "threshold": {"type": "number", "minimum": 0, "maximum": 1},
            "binary_data_output": {"type": "boolean"}}},
        "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": _TENSOR},
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string", "enum": list(OUTPUTS)},
            "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"}}}}}}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}, "description": (
        f"binary tensor data extension: the JSON request (its length in the {HEADER_LENGTH} "
        "header) followed by each image as a 4-byte little-endian length and its bytes")}}}}


def _tiny_png() -> str:
    import cv2

    img = np.zeros((8, 8, 3), np.uint8)
    img[::2, ::2] = 200
    return base64.b64encode(cv2.imencode(".png", img)[1].tobytes()).decode()


def document_examples(schema: dict[str, Any], max_batch: int) -> None:
    """Give every infer route a working example (a real 8x8 PNG) and the batch limit."""
    example = {"id": "example", "parameters": {"passes": 10},
               "inputs": [{"name": INPUT_NAME, "shape": [1], "datatype": "BYTES", "data": [_tiny_png()]}]}
    for path, item in schema.get("paths", {}).items():
        if path.endswith("/infer") and "post" in item:
            media = item["post"]["requestBody"]["content"]["application/json"]
            media["example"] = example
            media["schema"]["properties"]["inputs"]["items"]["properties"]["data"]["maxItems"] = max_batch
