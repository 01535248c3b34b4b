"""Augmentation policies in OpenCV/numpy, deterministic per (seed, source image, copy).

Each copy draws its parameters from a numpy Generator seeded by a SHA-256 of
(seed, key, copy), so the bytes of copy c of image k never depend on which worker,
block or batch produced them. Copy 0 is always the original image.

Policies:
- ``karyogram`` (study A): photometric only. Brightness x[0.75, 1.25], a Gaussian blur
  with sigma in [0, 1] (3x3 kernel), and salt/pepper noise on at most 5% of the pixels.
  Pixels are never moved: the position of each chromosome pair carries meaning. The blur
  is local (3x3) and the noise touches <= 5% of the pixels, so the foreground mask
  (pixels darker than the background threshold, e.g. Otsu) can differ from the
  original's only on those noisy pixels and on a one-pixel band along object edges;
  tests check exactly that bound.
- ``leukemia`` (study B): the 33-copy expansion. Copy c = (base, flip) with
  base = c // 3 and flip = c % 3 (none, horizontal, vertical). Base 0 is the original;
  bases 1..10 are two draws of each of five transforms in order (rotation <= 40 deg,
  height shift <= 40%, width shift <= 40%, shear <= 20 deg, zoom 0.7-1.3); reflect border.
  The three flips of a base share its draw (the random stream is (seed, key, base)).
  ``copies=33`` reproduces the study exactly; larger counts keep cycling the transforms.
- ``none``: every copy is the original.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from raycyto.errors import ConfigError


def copy_rng(seed: int, key: str, copy: int) -> np.random.Generator:
    """A Generator seeded from a stable hash of (seed, key, copy) (never Python's hash())."""
    digest = hashlib.sha256(f"{int(seed)}\x00{key}\x00{int(copy)}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def image_key(image: np.ndarray) -> str:
    """Stable id of a decoded source image: SHA-256 of its shape and pixels.

    Augmentation is keyed on content, not on the file's path, so the same dataset gives the
    same augmented copies wherever it lies (another folder, a manifest, an object store).
    """
    return hashlib.sha256(repr(image.shape).encode() + np.ascontiguousarray(image).tobytes()).hexdigest()


# ----------------------------------------------------------------------------- karyogram
BRIGHTNESS = (0.75, 1.25)
MAX_NOISE_FRACTION = 0.05
MAX_BLUR_SIGMA = 1.0


def _karyogram(image: np.ndarray, rng: np.random.Generator, copy: int) -> np.ndarray:
    import cv2

    factor = rng.uniform(*BRIGHTNESS)
    sigma = rng.uniform(0.0, MAX_BLUR_SIGMA)
    noise_fraction = rng.uniform(0.0, MAX_NOISE_FRACTION)
    out = np.clip(image.astype(np.float32) * factor, 0, 255)
    if sigma > 0.05:
        out = cv2.GaussianBlur(out, (3, 3), sigmaX=sigma, sigmaY=sigma,
                               borderType=cv2.BORDER_REFLECT_101)
    out = np.rint(out).astype(np.uint8)
    h, w = out.shape[:2]
    n = int(noise_fraction * h * w)
    flat = rng.choice(h * w, size=n, replace=False)  # [n] distinct pixel positions
    salt = rng.random(n) < 0.5
    out.reshape(h * w, -1)[flat] = np.where(salt, 255, 0)[:, None].astype(np.uint8)
    return out


# ----------------------------------------------------------------------------- leukemia
MAX_ROTATION_DEG = 40.0
MAX_SHIFT = 0.4
MAX_SHEAR_DEG = 20.0
ZOOM = (0.7, 1.3)


def _rotation(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    a = math.radians(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
    return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])


def _height_shift(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    return np.array([[1, 0, 0], [0, 1, rng.uniform(-MAX_SHIFT, MAX_SHIFT) * h], [0, 0, 1]])


def _width_shift(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    return np.array([[1, 0, rng.uniform(-MAX_SHIFT, MAX_SHIFT) * w], [0, 1, 0], [0, 0, 1]])


def _shear(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    s = math.radians(rng.uniform(-MAX_SHEAR_DEG, MAX_SHEAR_DEG))
    return np.array([[1, -math.sin(s), 0], [0, math.cos(s), 0], [0, 0, 1]])  # Keras' shear


def _zoom(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    zx, zy = rng.uniform(*ZOOM, size=2)
    return np.array([[zx, 0, 0], [0, zy, 0], [0, 0, 1]])


# order matters: bases 1..10 = two draws of each, in this order (study B)
LEUKEMIA_TRANSFORMS: tuple[Callable[[np.random.Generator, int, int], np.ndarray], ...] = (
    _rotation, _height_shift, _width_shift, _shear, _zoom)
FLIPS = (None, 1, 0)  # cv2.flip codes: none, horizontal (around the vertical axis), vertical


def _leukemia(image: np.ndarray, rng: np.random.Generator, copy: int) -> np.ndarray:
    import cv2

    base, flip = divmod(copy, len(FLIPS))
    out = image
    if base > 0:
        h, w = image.shape[:2]
        make = LEUKEMIA_TRANSFORMS[((base - 1) // 2) % len(LEUKEMIA_TRANSFORMS)]
        c = np.array([[1, 0, (w - 1) / 2], [0, 1, (h - 1) / 2], [0, 0, 1]])  # about the centre
        m = c @ make(rng, w, h) @ np.linalg.inv(c)  # [3, 3]
        out = cv2.warpAffine(image, m[:2], (w, h), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REFLECT_101)
    if FLIPS[flip] is not None:
        out = cv2.flip(out, FLIPS[flip])
    return np.ascontiguousarray(out)


def _identity(image: np.ndarray, rng: np.random.Generator, copy: int) -> np.ndarray:
    return image


@dataclass(frozen=True)
class AugmentPolicy:
    """A named augmentation: ``fn(image [H,W,3] uint8, rng, copy) -> [H,W,3] uint8``."""

    name: str
    fn: Callable[[np.ndarray, np.random.Generator, int], np.ndarray]
    geometric: bool  # True when pixels may move (flips, warps)
    description: str
    # which random stream a copy draws from; copies sharing a stream share parameters
    stream: Callable[[int], int] = lambda copy: copy


def _leukemia_stream(copy: int) -> int:
    return copy // len(FLIPS)  # the three flips of one base share its transform draw


POLICIES: dict[str, AugmentPolicy] = {
    p.name: p for p in (
        AugmentPolicy("karyogram", _karyogram, False,
                      "photometric only: brightness +-25%, blur sigma<=1, salt/pepper on <=5% of pixels"),
        AugmentPolicy("leukemia", _leukemia, True,
                      "study B: flips x (rotation<=40, shift<=40%, shear<=20, zoom 0.7-1.3), 33 copies",
                      stream=_leukemia_stream),
        AugmentPolicy("none", _identity, False, "no augmentation; copies are the original"),
    )
}


def get_policy(name: str) -> AugmentPolicy:
    """Look up a policy; unknown names raise ConfigError listing the known ones."""
    try:
        return POLICIES[name]
    except KeyError:
        raise ConfigError("data.policy", f"unknown policy '{name}'; known: {sorted(POLICIES)}") from None


def augment(image: np.ndarray, policy: str, seed: int, key: str, copy: int) -> np.ndarray:
    """Augmented copy ``copy`` of ``image``.

    Args:
        image: [H, W, 3] uint8 RGB.
        policy: a name in POLICIES.
        seed: run seed.
        key: stable id of the source image (the pipeline passes :func:`image_key`).
        copy: copy index; 0 returns ``image`` itself, unchanged.
    Returns:
        [H, W, 3] uint8, identical for the same (policy, seed, key, copy).
    """
    spec = get_policy(policy)
    if copy == 0:
        return image
    return spec.fn(image, copy_rng(seed, key, spec.stream(copy)), copy)
