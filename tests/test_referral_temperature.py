"""Temperature scaling: recovers a known temperature, lowers ECE, never moves the argmax."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raycyto.referral.temperature import (TemperatureScaling, fit_temperature, logits_from_probs,
                                          nll, scaled_softmax)
from raycyto.errors import RaycytoError


def overconfident(rng: np.random.Generator, n: int, c: int = 5, true_t: float = 2.5):
    """Labels drawn from softmax(z); the model reports softmax(true_t * z) (T* = true_t)."""
    z = rng.normal(size=(n, c)) * 1.5
    p_true = scaled_softmax(z, 1.0)
    y = (p_true.cumsum(1) > rng.uniform(size=(n, 1))).argmax(1)
    return scaled_softmax(z * true_t, 1.0), y


def test_recovers_the_temperature_of_an_overconfident_model_and_lowers_ece():
    rng = np.random.default_rng(0)
    probs, y = overconfident(rng, 4000)
    ts = fit_temperature(y, probs=probs)
    assert ts.temperature == pytest.approx(2.5, rel=0.1)
    assert ts.nll_after < ts.nll_before
    assert ts.ece_after < 0.5 * ts.ece_before and ts.ece_after < 0.03
    # fitted on one half, it helps on the other half too
    fit = fit_temperature(y[:2000], probs=probs[:2000])
    assert nll(logits_from_probs(probs[2000:]), y[2000:], fit.temperature) < \
        nll(logits_from_probs(probs[2000:]), y[2000:], 1.0)


def test_underconfident_model_gets_t_below_one_and_argmax_never_changes():
    rng = np.random.default_rng(1)
    probs, y = overconfident(rng, 3000, true_t=0.5)
    ts = fit_temperature(y, probs=probs)
    assert 0.4 < ts.temperature < 0.6
    scaled = ts.apply_probs(probs)
    np.testing.assert_array_equal(scaled.argmax(1), probs.argmax(1))
    np.testing.assert_allclose(scaled.sum(1), 1.0)


def test_log_probabilities_are_logits_up_to_a_constant():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(50, 3)) * 3
    y = rng.integers(0, 3, 50)
    a = fit_temperature(y, logits=z)
    b = fit_temperature(y, probs=scaled_softmax(z, 1.0))
    assert a.temperature == pytest.approx(b.temperature, rel=1e-4)
    np.testing.assert_allclose(a.apply_logits(z), b.apply_probs(scaled_softmax(z, 1.0)), atol=1e-9)


def test_json_round_trip_and_bad_inputs():
    rng = np.random.default_rng(3)
    probs, y = overconfident(rng, 200)
    ts = fit_temperature(y, probs=probs)
    assert TemperatureScaling.from_json(json.loads(json.dumps(ts.to_json(), allow_nan=False))) == ts
    empty = fit_temperature(np.array([], int), probs=np.zeros((0, 3)))
    assert empty.temperature == 1.0 and empty.n == 0
    json.dumps(empty.to_json(), allow_nan=False)
    with pytest.raises(RaycytoError, match="exactly one"):
        fit_temperature(y)
