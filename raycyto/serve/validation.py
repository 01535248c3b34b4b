"""Strict request handling for the HTTP API: size cap, format sniffing, decoding, errors.

Every problem a client can cause becomes a :class:`ClientError` with an HTTP status
(400, 413, 415, 422) and a message; :func:`error_body` is the one JSON shape all
errors use: ``{"error": <kind>, "message": <text>, "status": <code>}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import numpy as np

# Content types accepted for a raw-body upload (and as a multipart part's declared type).
IMAGE_CONTENT_TYPES: dict[str, str] = {
    "image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg", "image/pjpeg": "jpeg",
    "image/tiff": "tiff", "image/tif": "tiff", "image/bmp": "bmp", "image/x-ms-bmp": "bmp",
    "image/x-bmp": "bmp",
}
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024


class ClientError(Exception):
    """A request the client got wrong; carries the HTTP status and a message.

    Args:
        status: 400, 401, 404, 413, 415 or 422.
        kind: short machine-readable name (``payload_too_large``).
        message: what was wrong and what to do.
    """

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


def error_body(status: int, kind: str, message: str, **extra: Any) -> dict[str, Any]:
    """The JSON body of every error response."""
    return {"error": kind, "message": message, "status": status, **extra}


def check_content_type(content_type: str | None) -> None:
    """Refuse (415) a raw-body upload whose Content-Type is not an accepted image type."""
    base = (content_type or "").split(";")[0].strip().lower()
    if base not in IMAGE_CONTENT_TYPES:
        raise ClientError(
            415, "unsupported_media_type",
            f"Content-Type {base or '(none)'!r} is not accepted: send the image as multipart "
            f"form field 'file' or as a raw body with one of {sorted(IMAGE_CONTENT_TYPES)}")


def decode_upload(data: bytes, max_pixels: int | None = None, field: str = "file") -> np.ndarray:
    """Validate and decode one uploaded image.

    Args:
        data: the raw bytes of the image.
        max_pixels: pixel-count limit (decompression bombs); default ``raycyto.data.decode.MAX_PIXELS``.
        field: name of the request field, used in messages.
    Returns:
        uint8 RGB array ``[H, W, 3]``.
    Raises:
        ClientError: 400 for empty, truncated, undecodable or too-large images; 415 for a
            format outside PNG/JPEG/TIFF/BMP.
    """
    from raycyto.data.decode import MAX_PIXELS, DecodeError, decode_image, sniff_format

    if len(data) == 0:
        raise ClientError(400, "empty_image", f"{field}: the image is empty (0 bytes)")
    try:  # the data pipeline's own sniffer: one list of accepted formats for files and uploads
        fmt = sniff_format(data)
    except DecodeError as e:  # not PNG/JPEG/TIFF/BMP; the reason names the format when known
        raise ClientError(415, "unsupported_media_type",
                          f"{field}: {e.reason}; send PNG, JPEG, TIFF or BMP") from None
    try:
        image = decode_image(data, max_pixels=max_pixels or MAX_PIXELS)
    except DecodeError as e:
        reason = getattr(e, "reason", "") or str(e)
        raise ClientError(400, "undecodable_image", f"{field}: cannot use this {fmt} image: {reason}") from None
    except (ValueError, OSError, MemoryError) as e:  # decoder libraries on hostile input
        raise ClientError(400, "undecodable_image", f"{field}: cannot decode this {fmt} image: {e}") from None
    return image


# ---------------------------------------------------------------------------- body size


@dataclass
class BodyLimitMiddleware:
    """ASGI middleware: 413 (JSON) for bodies over ``max_body_bytes``, decided early.

    A declared ``Content-Length`` over the limit is refused before a byte of the body is
    read; otherwise the body is read chunk by chunk and refused as soon as the running
    total passes the limit. The accepted body is replayed to the app unchanged.
    """

    app: Callable[..., Awaitable[None]]
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await _send_json(send, 400, error_body(
                    400, "bad_content_length", f"Content-Length {declared!r} is not a number"))
                return
            if int(declared) > self.max_body_bytes:
                await _send_json(send, 413, self._too_large(int(declared)))
                return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_body_bytes:
                await _send_json(send, 413, self._too_large(total, streamed=True))
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay_receive() -> dict:
            return replay.pop() if replay else await receive()

        await self.app(scope, replay_receive, send)

    def _too_large(self, size: int, streamed: bool = False) -> dict[str, Any]:
        what = f"more than {size} bytes received" if streamed else f"Content-Length {size}"
        return error_body(413, "payload_too_large",
                          f"request body too large ({what}); the limit is {self.max_body_bytes} bytes")


async def _send_json(send: Callable, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})
