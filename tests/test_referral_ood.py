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
