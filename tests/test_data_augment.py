"""Augmentation policies: deterministic per (seed, key, copy); karyograms never move pixels."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from raycyto.data.augment import MAX_NOISE_FRACTION, POLICIES, augment
from raycyto.errors import ConfigError


def _karyogram_like(size: int = 96) -> np.ndarray:
    """Dark rods (chromosome-like) on a light background, asymmetric so flips show. [S,S,3]"""
    img = np.full((size, size, 3), 225, np.uint8)
    rng = np.random.default_rng(1)
    for k in range(10):
        x, y = 6 + 9 * k, 8 + (k % 3) * 25
        h = 10 + 3 * k % 17
        shade = tuple(int(v) for v in rng.integers(30, 80, 3))
        cv2.rectangle(img, (x, y), (x + 4, y + h), shade, -1)
    cv2.circle(img, (80, 80), 6, (40, 40, 40), -1)
    return img


def _mask(img: np.ndarray) -> np.ndarray:
    """Foreground = darker than the background threshold (Otsu on the gray image). [H,W] bool"""
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    _, m = cv2.threshold(gray, 0, 1, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    return m.astype(bool)


def _mask_disagreement_off_edges(orig: np.ndarray, aug: np.ndarray) -> float:
    """Share of pixels whose foreground label changed, ignoring a 1-px band along the
    original's edges (a 3x3 blur may legitimately flip those)."""
    m0, m1 = _mask(orig), _mask(aug)
    k = np.ones((3, 3), np.uint8)
    band = cv2.dilate(m0.astype(np.uint8), k).astype(bool) & ~cv2.erode(m0.astype(np.uint8), k).astype(bool)
    return float(((m0 != m1) & ~band).mean())


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_copy_zero_is_the_original_and_copies_are_deterministic(policy):
    img = _karyogram_like()
    assert augment(img, policy, seed=3, key="a.png", copy=0) is img
    a = augment(img, policy, seed=3, key="a.png", copy=5)
    b = augment(img.copy(), policy, seed=3, key="a.png", copy=5)
    assert a.dtype == np.uint8 and a.shape == img.shape
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(img, _karyogram_like())  # input untouched


@pytest.mark.parametrize("policy", ["karyogram", "leukemia"])
def test_seed_key_and_copy_each_change_the_result(policy):
    img = _karyogram_like()
    base = augment(img, policy, seed=0, key="a.png", copy=4)
    for other in (augment(img, policy, seed=1, key="a.png", copy=4),
                  augment(img, policy, seed=0, key="b.png", copy=4),
                  augment(img, policy, seed=0, key="a.png", copy=7)):
        assert not np.array_equal(base, other)


def test_karyogram_policy_keeps_the_foreground_mask_and_leukemia_does_not():
    """Photometric only: off the 1-px edge band, the foreground mask may change only on the
    noisy pixels (<= 5%). The geometric leukemia policy breaks the same bound (control)."""
    img = _karyogram_like()
    assert _mask(img).mean() > 0.1  # a real foreground to lose if pixels moved
    kary = [_mask_disagreement_off_edges(img, augment(img, "karyogram", 0, "k.png", c)) for c in range(1, 25)]
    assert max(kary) <= MAX_NOISE_FRACTION + 0.005, kary
    leuk = [_mask_disagreement_off_edges(img, augment(img, "leukemia", 0, "k.png", c)) for c in range(1, 25)]
    # a small rotation/zoom draw can stay under the bound; most moves do not
    assert np.mean(np.array(leuk) > MAX_NOISE_FRACTION + 0.005) >= 0.75, leuk


def test_karyogram_policy_changes_pixel_values_photometrically():
    img = _karyogram_like()
    outs = [augment(img, "karyogram", 0, "k.png", c) for c in range(1, 11)]
    means = [o.astype(float).mean() for o in outs]
    assert all(not np.array_equal(o, img) for o in outs)
    assert max(means) - min(means) > 5  # brightness really varies across copies
    assert all(0.7 * img.mean() - 15 < m < 1.3 * img.mean() + 15 for m in means)


def test_leukemia_policy_follows_study_b_33_copy_layout():
    img = _karyogram_like()
    # copy = 3 * base + flip; base 0 is the original, flips: none, horizontal, vertical
    np.testing.assert_array_equal(augment(img, "leukemia", 0, "k", 1), img[:, ::-1])
    np.testing.assert_array_equal(augment(img, "leukemia", 0, "k", 2), img[::-1])
    c3 = augment(img, "leukemia", 0, "k", 3)  # base 1 = a rotation draw, unflipped
    np.testing.assert_array_equal(augment(img, "leukemia", 0, "k", 4), c3[:, ::-1])
    copies = [augment(img, "leukemia", 0, "k", c).tobytes() for c in range(33)]
    assert len(set(copies)) == 33  # 33 distinct images, as study B's expansion


def test_none_policy_returns_the_original_for_every_copy():
    img = _karyogram_like()
    np.testing.assert_array_equal(augment(img, "none", 0, "k", 9), img)


def test_unknown_policy_lists_the_known_ones():
    with pytest.raises(ConfigError, match="known: \\['karyogram', 'leukemia', 'none'\\]"):
        augment(_karyogram_like(), "flipflop", 0, "k", 1)


def test_karyogram_policy_keeps_the_mask_of_synthetic_karyograms(karyo_dir):
    from raycyto.data.decode import load_image
    from raycyto.data.sources import read_source

    for path in read_source(karyo_dir).df["path"][:2]:
        img = load_image(path)
        assert _mask(img).mean() > 0.02
        worst = max(_mask_disagreement_off_edges(img, augment(img, "karyogram", 0, path, c)) for c in range(1, 9))
        assert worst <= MAX_NOISE_FRACTION + 0.005
