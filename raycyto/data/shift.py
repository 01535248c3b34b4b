"""Mild acquisition shifts: what a second lab's scanner does to an image the model can still read.

A shifted image is not an out-of-distribution one. These builders make the copies that the
per-image out-of-distribution guard is calibrated to tolerate
(:func:`raycyto.referral.ood.calibrate_on_images`) and measured on (``benchmarks/ood_guard.py``),
and that a drift monitor can use to build its own shifted sets.

``SHIFTS[name](image, rng) -> image``: uint8 RGB ``[H, W, 3]`` in, uint8 RGB of the same shape
out, every parameter drawn from ``rng`` (same image and same generator state, same bytes):

- ``jpeg``: re-saved as JPEG at quality 30-70 (OpenCV's encoder, 4:2:0 chroma).
- ``blur``: Gaussian blur, sigma 0.6-1.2 px (kernel of +-3 sigma).
- ``contrast``: contrast and brightness, each x[0.85, 1.15] (contrast about the image mean).
- ``rotate``: rotation about the centre by -4..4 degrees, border mirrored (reflect-101, as the
  leukemia augmentation policy warps: a replicated border streaks).
- ``rescale``: content scaled about the centre by 0.85-1.15 within the same frame (another
  magnification), border mirrored; the file keeps its size.
- ``colour``: a colour cast (per-channel gain x[0.92, 1.08]) and saturation x[0.85, 1.15],
  what another scanner's white balance or another stain batch gives.
- ``scanner``: all of them at once in acquisition order (rescale, rotate, blur, colour,
  contrast, jpeg), each parameter drawn as above: a second lab's scanner.

:func:`shifted_copy` seeds the generator from (seed, image, family, copy) exactly as the
augmentation policies do (:func:`raycyto.data.augment.copy_rng`), so a shifted set is the
same bytes wherever and in whatever order it is built.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from raycyto.errors import ConfigError

JPEG_QUALITY = (30, 70)
BLUR_SIGMA = (0.6, 1.2)
CONTRAST = (0.85, 1.15)
BRIGHTNESS = (0.85, 1.15)
ROTATION_DEG = 4.0
SCALE = (0.85, 1.15)
CHANNEL_GAIN = (0.92, 1.08)
SATURATION = (0.85, 1.15)


def _u8(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))


def jpeg(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Re-save as JPEG at a quality drawn from JPEG_QUALITY (inclusive)."""
    import cv2

    q = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, q])
    if not ok:  # pragma: no cover - OpenCV always encodes a uint8 RGB array
        raise ValueError("JPEG encoding failed")
    return np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])


def blur(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur with sigma drawn from BLUR_SIGMA."""
    import cv2

    s = float(rng.uniform(*BLUR_SIGMA))
    k = 2 * math.ceil(3 * s) + 1
    return np.ascontiguousarray(cv2.GaussianBlur(image, (k, k), sigmaX=s, sigmaY=s,
                                                 borderType=cv2.BORDER_REFLECT_101))


def contrast(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Contrast about the image mean x CONTRAST, then brightness x BRIGHTNESS."""
    c, b = float(rng.uniform(*CONTRAST)), float(rng.uniform(*BRIGHTNESS))
    x = image.astype(np.float32)
    m = x.mean()
    return _u8(((x - m) * c + m) * b)


def _warp(image: np.ndarray, angle_deg: float, scale: float) -> np.ndarray:
    import cv2

    h, w = image.shape[:2]
    m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle_deg, scale)
    return np.ascontiguousarray(cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR,
                                               borderMode=cv2.BORDER_REFLECT_101))


def rotate(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotation about the centre by an angle in [-ROTATION_DEG, ROTATION_DEG]."""
    return _warp(image, float(rng.uniform(-ROTATION_DEG, ROTATION_DEG)), 1.0)


def rescale(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Content scaled about the centre by a factor in SCALE, same frame size."""
    return _warp(image, 0.0, float(rng.uniform(*SCALE)))


def colour(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-channel gain in CHANNEL_GAIN, then saturation x SATURATION (about the grey level)."""
    gain = rng.uniform(*CHANNEL_GAIN, size=3).astype(np.float32)
    sat = float(rng.uniform(*SATURATION))
    x = image.astype(np.float32) * gain
    grey = x.mean(axis=2, keepdims=True)
    return _u8(grey + (x - grey) * sat)


def scanner(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Every family at once, in acquisition order: rescale, rotate, blur, colour, contrast, jpeg."""
    a, s = float(rng.uniform(-ROTATION_DEG, ROTATION_DEG)), float(rng.uniform(*SCALE))
    out = _warp(image, a, s)
    for fn in (blur, colour, contrast, jpeg):
        out = fn(out, rng)
    return out


Shift = Callable[[np.ndarray, np.random.Generator], np.ndarray]

SHIFTS: dict[str, Shift] = {"jpeg": jpeg, "blur": blur, "contrast": contrast, "rotate": rotate,
                            "rescale": rescale, "colour": colour, "scanner": scanner}
"""Family name -> ``fn(image uint8 [H, W, 3], rng) -> uint8 [H, W, 3]`` (see the module docstring)."""

MILD = ("jpeg", "blur", "contrast", "rotate", "rescale", "scanner")
"""The families a karyogram scanner change gives (``colour`` is the stain / white-balance one)."""


def get_shift(name: str) -> Shift:
    """Look up a shift family; unknown names raise ConfigError listing the known ones."""
    try:
        return SHIFTS[name]
    except KeyError:
        raise ConfigError("shift", f"unknown shift {name!r}; known: {sorted(SHIFTS)}") from None


def shifted_copy(image: np.ndarray, name: str, seed: int, copy: int = 0, key: str | None = None) -> np.ndarray:
    """Copy ``copy`` of ``image`` under shift family ``name``, seeded by (seed, image, name, copy).

    Args:
        image: uint8 RGB ``[H, W, 3]``.
        name: a key of :data:`SHIFTS`.
        seed: non-negative seed.
        copy: copy index (different copies draw different parameters).
        key: stable id of the image (default :func:`raycyto.data.augment.image_key`, its pixels).
    Returns:
        uint8 RGB ``[H, W, 3]``, the same bytes for the same arguments.
    """
    from raycyto.data.augment import copy_rng, image_key

    fn = get_shift(name)
    k = image_key(image) if key is None else key
    return fn(np.ascontiguousarray(image), copy_rng(seed, f"shift:{name}\x00{k}", copy))
