"""Mahalanobis OOD guard: separates shifted features, keeps its stated false-alarm rate,
stores compactly and reloads to the same scores."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from raycyto.errors import RaycytoError
from raycyto.referral.ood import (MahalanobisGuard, conformal_upper_threshold, energy_score,
                                fit_mahalanobis, ood_auroc)

D, RANK, C = 192, 12, 3


class World:
    """In-distribution features: C classes in a RANK-dim subspace of D dims + small noise
    (non-negative after a shift, like pooled ReLU features)."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.basis = np.linalg.qr(rng.normal(size=(D, RANK)))[0]     # [D, RANK]
        self.centres = rng.normal(size=(C, RANK)) * 3
        self.mix = rng.normal(size=(RANK, RANK)) * 0.7

    def draw(self, rng: np.random.Generator, n: int, shift: np.ndarray | None = None):
        y = rng.integers(0, C, n)
        latent = self.centres[y] + rng.normal(size=(n, RANK)) @ self.mix   # correlated
        x = latent @ self.basis.T + 0.1 * rng.normal(size=(n, D)) + 5.0
        return (x if shift is None else x + shift), y


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """2 shared cores: multi-threaded BLAS on these small matrices only oversubscribes."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def world():
    w = World()
    rng = np.random.default_rng(1)
    xtr, ytr = w.draw(rng, 800)
    xval, _ = w.draw(rng, 300)
    guard = fit_mahalanobis(xtr, ytr, pca_dim=32).calibrate(xval, 0.05)
    return w, guard


def test_shifted_features_are_told_apart(world):
    w, guard = world
    rng = np.random.default_rng(2)
    x_in, _ = w.draw(rng, 1000)
    # the other task's images: other directions of feature space, similar overall scale
    other = World(seed=99)
    x_out, _ = other.draw(rng, 1000)
    assert ood_auroc(guard.score(x_in), guard.score(x_out)) >= 0.95
    assert guard.is_ood(x_out).mean() > 0.9


def test_a_shift_outside_the_pca_subspace_needs_the_residual_term():
    w = World(seed=3)
    rng = np.random.default_rng(4)
    xtr, ytr = w.draw(rng, 800)
    direction = rng.normal(size=D)
    direction -= w.basis @ (w.basis.T @ direction)              # orthogonal to the data subspace
    shift = 3.0 * direction / np.linalg.norm(direction)
    x_in, _ = w.draw(rng, 500)
    x_out, _ = w.draw(rng, 500, shift=shift)
    with_r = fit_mahalanobis(xtr, ytr, pca_dim=RANK, residual=True)
    without = fit_mahalanobis(xtr, ytr, pca_dim=RANK, residual=False)
    assert ood_auroc(with_r.score(x_in), with_r.score(x_out)) >= 0.95
    assert ood_auroc(without.score(x_in), without.score(x_out)) < 0.75


def test_false_alarm_rate_on_held_out_in_distribution_data_is_the_stated_rate(world):
    """Recalibrating on 100 fresh validation sets of 300: mean false alarms on fresh
    in-distribution data = 1 - ceil(301 * 0.95) / 301 = 0.0498 within 4 standard errors."""
    w, guard = world
    rng = np.random.default_rng(5)
    rates = []
    for _ in range(100):
        xval, _ = w.draw(rng, 300)
        xnew, _ = w.draw(rng, 500)
        g = MahalanobisGuard.from_parts(guard.meta(), guard.arrays()).calibrate(xval, 0.05)
        rates.append(g.is_ood(xnew).mean())
    k = math.ceil(301 * 0.95)
    expected = 1 - k / 301
    var = k * (301 - k) / (301 ** 2 * 302) + expected * (1 - expected) / 500
    assert abs(np.mean(rates) - expected) <= 4 * math.sqrt(var / 100), np.mean(rates)


def test_stored_form_is_compact_json_plus_float32_and_reloads(tmp_path, world):
    w, guard = world
    rng = np.random.default_rng(6)
    x, _ = w.draw(rng, 50)
    meta = json.loads(json.dumps(guard.meta(), allow_nan=False))
    back = MahalanobisGuard.from_parts(meta, guard.arrays())
    np.testing.assert_allclose(back.score(x), guard.score(x), rtol=1e-3)
    assert back.threshold == pytest.approx(guard.threshold, rel=1e-6)
    loaded = MahalanobisGuard.load(guard.save(tmp_path / "ood.npz"))
    np.testing.assert_array_equal(loaded.score(x), back.score(x))
    # D = 1280 with K = 128: under 1 MB of float32 (a full precision matrix is 6.5 MB)
    big = fit_mahalanobis(rng.normal(size=(300, 1280)), rng.integers(0, 2, 300), pca_dim=128)
    assert sum(a.nbytes for a in big.arrays().values()) < 1_000_000
    assert big.meta()["threshold"] is None                  # not calibrated yet


def test_energy_score_and_threshold_helpers():
    logits = np.array([[10.0, 0.0], [0.1, 0.0]])
    e = energy_score(logits)
    assert e[0] < e[1]                                       # confident = lower energy
    assert e[0] == pytest.approx(-np.log(np.exp(10) + 1))
    assert conformal_upper_threshold(np.arange(19.0), 0.05) == 18.0
    assert math.isinf(conformal_upper_threshold(np.arange(10.0), 0.05))
    with pytest.raises(RaycytoError, match="false alarm"):
        conformal_upper_threshold(np.arange(10.0), 5)
    with pytest.raises(RaycytoError, match=r"\[N, 192\]"):
        fit_mahalanobis(np.ones((10, D)) + np.arange(10)[:, None], np.zeros(10, int)).score(np.ones((2, 3)))


# ----------------------------------------------------------------------------- shifted images


def _karyogram_like(seed: int, size: int = 48) -> np.ndarray:
    """A light background with dark banded bars (a karyogram's look), uint8 RGB."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 215, np.float32) + rng.normal(0, 3, (size, size, 3))
    for x in range(4, size - 4, 8):
        top, bottom = rng.integers(3, 10), rng.integers(size - 12, size - 3)
        img[top:bottom, x:x + 4] = 90 + 40 * (np.arange(bottom - top)[:, None, None] // 3 % 2)
    return np.clip(img, 0, 255).astype(np.uint8)


def test_shifts_are_deterministic_and_keep_the_image_shape():
    from raycyto.data.shift import MILD, SHIFTS, get_shift, shifted_copy
    from raycyto.errors import ConfigError

    img = _karyogram_like(0)
    assert set(MILD) <= set(SHIFTS) and {"jpeg", "blur", "contrast", "rotate", "rescale", "colour"} <= set(SHIFTS)
    for name, fn in SHIFTS.items():
        a = fn(img, np.random.default_rng(7))
        b = fn(img.copy(), np.random.default_rng(7))
        assert a.dtype == np.uint8 and a.shape == img.shape, name
        np.testing.assert_array_equal(a, b, err_msg=name)
        np.testing.assert_array_equal(shifted_copy(img, name, 3, copy=1), shifted_copy(img, name, 3, copy=1))
        assert not np.array_equal(a, img), name                          # it does shift
        # different copies draw different parameters (at least one of three differs)
        assert any(not np.array_equal(shifted_copy(img, name, 3, copy=0), shifted_copy(img, name, 3, copy=c))
                   for c in (1, 2, 3)), name
    with pytest.raises(ConfigError, match="unknown shift"):
        get_shift("sepia")


def test_pooled_conformal_threshold_generalises_the_one_copy_rule():
    from raycyto.referral.ood import pooled_conformal_threshold

    s = np.random.default_rng(0).normal(size=50)
    assert pooled_conformal_threshold(s, 0.1) == conformal_upper_threshold(s, 0.1)
    assert pooled_conformal_threshold(s[:, None], 0.1) == conformal_upper_threshold(s, 0.1)
    assert math.isinf(pooled_conformal_threshold(np.ones((10, 4)), 0.05))
    # a new image (a random copy of it) is flagged at most at the stated rate
    rng = np.random.default_rng(1)
    rates = []
    for _ in range(200):
        base = rng.normal(size=(41, 1))                                 # image effect
        scores = base + 0.5 * rng.normal(size=(41, 5))                  # 5 copies each
        t = pooled_conformal_threshold(scores[:40], 0.1)
        rates.append(np.mean(scores[40] > t))
    assert np.mean(rates) <= 0.1 + 3 * 0.3 / math.sqrt(200)


@pytest.fixture(scope="module")
def tiny_model():
    """Frozen ImageNet EfficientNet-Lite0 at 64 px (a bundle's model + model.json preprocess)."""
    from raycyto.models.classifier import build_classifier
    from raycyto.models.preprocessing import Preprocess

    model = build_classifier("efficientnet_lite0", "a", 2, pretrained=True).eval()
    return model, {"preprocess": Preprocess.build(model.spec, 64, 64).to_dict()}


def _karyograms(first: int, n: int) -> tuple[list[np.ndarray], np.ndarray]:
    """n karyogram-like images (class 1: an extra dark bar), seeds first..first+n-1."""
    imgs, labels = [], []
    for seed in range(first, first + n):
        img = _karyogram_like(seed, 64)
        if seed % 2:
            img[40:56, 26:30] = 70
        imgs.append(img)
        labels.append(seed % 2)
    return imgs, np.array(labels)


def test_guard_calibrated_on_scanner_copies_keeps_shifted_images_and_refers_other_images(tiny_model, leuk_dir):
    """Fitted on 40 images, calibrated on 30 others and their scanner copies: mildly shifted new
    images (each family) are rarely flagged, blood smears and noise always; calibrated on the
    originals alone, the same guard flags most shifted images (issue 19)."""
    import copy

    import cv2

    from raycyto.data.shift import MILD, shifted_copy
    from raycyto.referral.ood import calibrate_on_images, pooled_image_features

    model, meta = tiny_model
    train, y = _karyograms(0, 40)
    cal, _ = _karyograms(100, 30)
    new, _ = _karyograms(200, 20)
    guard = fit_mahalanobis(pooled_image_features(model, meta, train), y, pca_dim=16, normalize=True)  # as the sweep
    old = calibrate_on_images(copy.deepcopy(guard), model, meta, cal, 0.1, shifts=())
    guard = calibrate_on_images(guard, model, meta, cal, 0.1)
    meta_out = json.loads(json.dumps(guard.meta()))
    assert meta_out["n_calibration"] == 30 and meta_out["calibration"]["copies"] == ["original", "scanner#1", "scanner#2"]
    assert "30 images" in meta_out["calibrated_by"]
    shifted = [shifted_copy(img, fam, 7, copy=i) for i, img in enumerate(new) for fam in MILD]
    s_new = guard.score(pooled_image_features(model, meta, new))
    s_shift = guard.score(pooled_image_features(model, meta, shifted))
    others = [cv2.imread(str(p))[..., ::-1].copy() for p in sorted(leuk_dir.rglob("*.png"))]
    rng = np.random.default_rng(0)
    others += [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    others += [np.full((64, 64, 3), v, np.uint8) for v in (0, 255)]
    s_out = guard.score(pooled_image_features(model, meta, others))
    assert np.mean(s_shift > guard.threshold) <= 0.15
    assert np.mean(s_new > guard.threshold) <= 0.15
    assert np.all(s_out > guard.threshold)
    assert ood_auroc(np.r_[s_new, s_shift], s_out) >= 0.95
    assert np.mean(s_shift > old.threshold) >= 0.5                # the originals-only threshold


def test_fewer_training_images_than_dimensions_turn_the_residual_off():
    """With n - 1 PCA directions the basis spans the training images: their residual is
    rounding noise, which must not become the scale every new image is divided by."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(12, 64)).astype(np.float32)
    y = np.arange(12) % 2
    guard = fit_mahalanobis(x, y, pca_dim=128)
    assert guard.residual_var == 0.0
    new = rng.normal(size=(20, 64)).astype(np.float32)
    assert np.median(guard.score(new)) < 1e6 * np.median(guard.score(x)) + 1e6   # no 1e15 blow-up
