"""Shared pieces of the synthetic generators: the task record, seeded RNGs, drawing helpers.

Images are drawn with numpy on small local patches (one per object) and composited onto a
float canvas; cv2 is imported inside the helpers that need it so importing ``raycyto.synth``
stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

# Streams of the per-(seed, patient) RNG; fixed-length entropy so streams never collide.
_PATIENT_STREAM = 0
_IMAGE_STREAM = 1


@dataclass(frozen=True)
class SynthTask:
    """One synthetic dataset kind.

    Attributes:
        name: registry key ("karyogram", "leukemia").
        labels: every label the task can emit (sub-folder names).
        base_size: side in pixels the images are drawn at (then resized to ``size``).
        options: extra keyword options with their defaults (e.g. ``abnormal_fraction``).
        extra_columns: manifest columns beyond ``path,label,group`` (taken from the plan).
        check: validates the options, raising ``ConfigError`` naming the bad one.
        plan: ``(seed, patients, **options) -> [patient dict]``; each dict holds ``label``,
            the extra columns and whatever ``render`` needs. Drawn once per patient.
        render: ``(patient dict, rng, side) -> uint8 [side, side, 3] RGB``; one realisation.
    """

    name: str
    labels: tuple[str, ...]
    base_size: int
    plan: Callable[..., list[dict[str, Any]]]
    render: Callable[[dict[str, Any], np.random.Generator, int], np.ndarray]
    options: dict[str, Any] = field(default_factory=dict)
    extra_columns: tuple[str, ...] = ()
    check: Callable[[dict[str, Any]], None] = lambda options: None


def patient_rng(seed: int, patient: int) -> np.random.Generator:
    """RNG for the patient-level draws (karyotype, stain bias), independent of image order."""
    return np.random.default_rng([seed, patient, _PATIENT_STREAM, 0])


def image_rng(seed: int, patient: int, image: int) -> np.random.Generator:
    """RNG for one realisation (image ``image`` of patient ``patient``)."""
    return np.random.default_rng([seed, patient, _IMAGE_STREAM, image])


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation. Returns float32 [H, W]."""
    import cv2

    noise = rng.standard_normal(shape).astype(np.float32)
    if sigma > 0.3:
        noise = cv2.GaussianBlur(noise, (0, 0), sigma)
    return noise / max(float(noise.std()), 1e-6)


def coverage(sdf: np.ndarray, soft: float = 1.0) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] from a signed distance (pixels, negative inside)."""
    return np.clip(0.5 - sdf / soft, 0.0, 1.0).astype(np.float32)


def patch_grid(cx: float, cy: float, radius: float, height: int, width: int):
    """Integer window around (cx, cy) clipped to the canvas, with pixel offsets from the centre.

    Returns:
        (slices, dx, dy) where ``slices`` index the canvas ([y0:y1, x0:x1]) and dx, dy are
        float32 [h, w] offsets of each pixel centre from (cx, cy); None if fully outside.
    """
    x0, x1 = max(int(np.floor(cx - radius)), 0), min(int(np.ceil(cx + radius)) + 1, width)
    y0, y1 = max(int(np.floor(cy - radius)), 0), min(int(np.ceil(cy + radius)) + 1, height)
    if x0 >= x1 or y0 >= y1:
        return None
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    return (slice(y0, y1), slice(x0, x1)), xs - np.float32(cx), ys - np.float32(cy)


def wobbly_radius(rng: np.random.Generator, theta: np.ndarray, radius: float,
                  amount: float, orders: int = 4) -> np.ndarray:
    """Radius of a blob boundary at angles ``theta``: a circle with random low harmonics."""
    r = np.ones_like(theta)
    for k in range(2, 2 + orders):
        r += rng.normal(0.0, amount / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return radius * r


def segment_distance(dx: np.ndarray, dy: np.ndarray, ax: float, ay: float,
                     bx: float, by: float) -> np.ndarray:
    """Distance of each pixel offset (dx, dy) to the segment a-b (same frame). [h, w]"""
    vx, vy = bx - ax, by - ay
    length2 = max(vx * vx + vy * vy, 1e-6)
    t = np.clip(((dx - ax) * vx + (dy - ay) * vy) / length2, 0.0, 1.0)
    return np.hypot(dx - ax - t * vx, dy - ay - t * vy)


def resize_to(image: np.ndarray, size: int) -> np.ndarray:
    """Area-resize a square uint8 image to ``size`` x ``size`` (no-op when equal)."""
    import cv2

    if image.shape[0] == size and image.shape[1] == size:
        return image
    interp = cv2.INTER_AREA if size < image.shape[0] else cv2.INTER_CUBIC
    return cv2.resize(image, (size, size), interpolation=interp)


def encode_png(rgb: np.ndarray) -> bytes:
    """Deterministic PNG bytes of an RGB uint8 image."""
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]),
                           [cv2.IMWRITE_PNG_COMPRESSION, 6])
    if not ok:  # pragma: no cover - cv2 only fails on invalid arrays
        raise RuntimeError("cv2.imencode failed to encode a synthetic image")
    return buf.tobytes()
