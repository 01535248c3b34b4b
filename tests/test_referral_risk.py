"""Risk-controlled referral: the learn-then-test threshold keeps its recall promise."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from raycyto.referral.risk import DEFAULT_GRID, RecallGuarantee, recall_tests, risk_controlled_threshold
from raycyto.errors import RaycytoError

POS = 1


LEVELS = np.round(np.arange(10, 21) / 20, 10)           # MC-vote-like confidence k/20, k >= 10


def draw(rng: np.random.Generator, n: int, continuous: bool = False
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(y, pred, confidence): 40% positives, confidence uniform on {0.5, 0.55, ..., 1.0}
    (or U(0.5, 1)), a case misread with probability 2.4 (1 - c)^2."""
    y = (rng.uniform(size=n) < 0.4).astype(int)
    c = rng.uniform(0.5, 1.0, size=n) if continuous else rng.choice(LEVELS, size=n)
    wrong = rng.uniform(size=n) < 2.4 * (1 - c) ** 2
    return y, np.where(wrong, 1 - y, y), c


def true_recall_kept(t: float) -> float:
    """Population recall among kept positives at threshold t (discrete confidence)."""
    kept = LEVELS[LEVELS >= t - 1e-12]
    return float(1 - np.mean(2.4 * (1 - kept) ** 2)) if len(kept) else float("nan")


def test_the_guarantee_holds_in_at_least_1_minus_delta_of_repetitions():
    """Over 200 validation sets, the certified threshold's population recall on kept
    positives reaches the target in >= 90% of them (binomial tolerance); choosing the
    threshold by its empirical recall alone fails far more often."""
    rng = np.random.default_rng(0)
    target, delta, reps = 0.95, 0.1, 200
    fail, certified, naive_fail = 0, 0, 0
    for _ in range(reps):
        y, pred, c = draw(rng, 1500)
        g = risk_controlled_threshold(y, pred, c, POS, target, delta)
        if g.certified:
            certified += 1
            fail += true_recall_kept(g.threshold) < target
        tests = recall_tests(y, pred, c, POS, target)       # empirical recall per threshold
        reached = tests["threshold"][tests["recall_kept"] >= target]
        naive_fail += true_recall_kept(reached.min()) < target
    tol = 3 * math.sqrt(delta * (1 - delta) / reps)
    assert fail / reps <= delta + tol, fail
    assert certified >= 0.75 * reps, certified                  # and it has power here
    assert naive_fail / reps > delta + tol, naive_fail        # the check can tell


def test_continuous_scores_need_a_start_that_keeps_cases():
    """U(0.5, 1) confidence never reaches the grid's first threshold 1.0: one start stops
    there; several starts (delta split) certify a threshold."""
    rng = np.random.default_rng(3)
    y, pred, c = draw(rng, 3000, continuous=True)
    assert not risk_controlled_threshold(y, pred, c, POS, 0.95, 0.1).certified
    g = risk_controlled_threshold(y, pred, c, POS, 0.95, 0.1, n_starts=5)
    assert g.certified and g.n_starts == 5 and 0.75 <= g.threshold < 1.0


def test_fixed_sequence_stops_at_the_first_threshold_it_cannot_certify():
    y = np.array([1] * 100 + [0] * 100)
    c = np.concatenate([np.full(60, 0.95), np.full(40, 0.55), np.full(100, 0.9)])
    pred = y.copy()
    pred[60:80] = 0                                          # misses only at low confidence
    g = risk_controlled_threshold(y, pred, c, POS, 0.95, 0.1, grid=[1.0, 0.9, 0.5])
    assert not g.certified                                    # 1.0 keeps no case: p = 1, stop
    g = risk_controlled_threshold(y, pred, c, POS, 0.95, 0.1, grid=[0.9, 0.5, 0.0])
    assert g.certified and g.threshold == 0.9 and g.recall_kept == 1.0
    assert g.n_positive_kept == 60 and g.referral_rate == pytest.approx(0.2)


def test_recall_tests_count_kept_positives_and_misses_by_hand():
    y = np.array([1, 1, 1, 0, 1])
    pred = np.array([1, 0, 1, 0, 0])
    c = np.array([0.9, 0.6, 1.0, 0.7, 0.8])
    t = recall_tests(y, pred, c, POS, 0.9, grid=[1.0, 0.8, 0.6, 0.0])
    assert t["n_positive_kept"].tolist() == [1, 3, 4, 4]
    assert t["misses"].tolist() == [0, 1, 2, 2]
    np.testing.assert_allclose(t["referral_rate"], [0.8, 0.4, 0.0, 0.0])
    np.testing.assert_allclose(t["recall_kept"], [1.0, 2 / 3, 0.5, 0.5])
    assert (np.diff(t["p_value"]) >= 0).all()


def test_p_values_equal_mapie_binary_classification_controller():
    """Our p-values are those of MAPIE's controller given a 'refer = NaN' predict function
    and the recall-among-kept risk (multi-dimensional parameters, so Bonferroni-Holm)."""
    from mapie.risk_control import BinaryClassificationController, BinaryRisk

    rng = np.random.default_rng(1)
    y, pred, c = draw(rng, 800)
    grid = np.round(np.linspace(0.95, 0.5, 10), 10)        # every threshold keeps positives
    X = np.stack([c, pred], 1)

    def predict(X, t):
        return np.where(X[:, 0] >= t, (X[:, 1] == POS).astype(float), np.nan)

    recall_kept = BinaryRisk(risk_occurrence=lambda yt, yp: yp == 1,
                             risk_condition=lambda yt, yp: (yt == 1) & ~np.isnan(yp),
                             higher_is_better=True)
    ctl = BinaryClassificationController(predict, recall_kept, 0.95, confidence_level=0.9,
                                         best_predict_param_choice=recall_kept,
                                         list_predict_params=grid[:, None])
    ctl.calibrate(X, (y == POS).astype(int))
    t = recall_tests(y, pred, c, POS, 0.95, grid)
    ours, theirs = t["p_value"], np.ravel(ctl.p_values)
    # equal, except where MAPIE's ceil(n * float risk) rounds a whole count up (more conservative)
    n, m = t["n_positive_kept"], t["misses"]
    rounded_up = np.ceil(n * (1 - (n - m) / n)) != m
    np.testing.assert_allclose(ours[~rounded_up], theirs[~rounded_up], rtol=1e-12)
    assert (ours[rounded_up] < theirs[rounded_up]).all()
    assert (~rounded_up).sum() >= 5


def test_hb_p_value_counts_exactly_where_float_risk_would_round_up():
    from scipy.stats import binom

    from raycyto.referral.risk import binomial_hb_p_value

    p = binomial_hb_p_value(np.array([7]), np.array([140]), 0.05)[0]
    assert p <= binom.cdf(7, 140, 0.05) + 1e-15           # not cdf(8, ...)


def test_guarantee_round_trips_through_json_and_states_itself():
    rng = np.random.default_rng(2)
    y, pred, c = draw(rng, 1500)
    g = risk_controlled_threshold(y, pred, c, POS, 0.95, 0.1)
    assert g.certified
    doc = json.loads(json.dumps(g.to_json(), allow_nan=False))
    assert RecallGuarantee.from_json(doc) == g
    s = g.statement("abnormal")
    assert "abnormal recall is >= 95% with 90% confidence" in s and f"{g.threshold:g}" in s
    none = risk_controlled_threshold(y[:20], pred[:20], c[:20], POS, 0.99, 0.05)
    assert not none.certified and none.referral_rate == 1.0
    assert json.loads(json.dumps(none.to_json(), allow_nan=False))["threshold"] is None
    back = RecallGuarantee.from_json(none.to_json())
    assert back.to_json() == none.to_json() and back.statement().startswith("No threshold")


def test_bad_target_or_delta_raise():
    with pytest.raises(RaycytoError, match="target"):
        risk_controlled_threshold([1], [1], [1.0], POS, target=95)
    with pytest.raises(RaycytoError, match="delta"):
        risk_controlled_threshold([1], [1], [1.0], POS, delta=0)


def fixed_sequence_certified(p_values: np.ndarray, delta: float, n_starts: int = 1) -> list[int]:
    """Brute force, independent of MAPIE: the indices fixed-sequence testing certifies. Each of
    ``n_starts`` equally spaced starts (``i * (G // n_starts)``) tests at ``delta / n_starts`` and
    walks on while it rejects; the certified set is the union of the walks."""
    g = len(p_values)
    k = min(n_starts, g)
    level = delta / k
    certified: set[int] = set()
    for start in range(0, k * (g // k), g // k):
        i = start
        while i < g and p_values[i] <= level:
            certified.add(i)
            i += 1
    return sorted(certified)


def test_the_rule_uses_the_loosest_certified_threshold_known_by_hand():
    """Several thresholds are certified (1.0, 0.9, 0.8: no miss among their kept positives); the
    rule uses the loosest one, 0.8 (least referral), not the strictest, 1.0. Thresholds 0.7 and
    0.6 keep 10 misses in 160 positives (recall 0.9375 < 0.95) and stop the sequence, so 0.5 and
    0.0, whose p-values pass again (10 misses in 560), are not certified."""
    target, delta = 0.95, 0.1
    grid = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.0]
    # positives: 60 at 1.0, 40 at 0.9, 40 at 0.8 (all right), 20 at 0.7 (10 missed), 400 at 0.5 (right)
    c_pos = np.repeat([1.0, 0.9, 0.8, 0.7, 0.5], [60, 40, 40, 20, 400])
    miss = np.zeros(len(c_pos), bool)
    miss[140:150] = True
    c_neg = np.repeat([0.95, 0.75, 0.3], 100)               # negatives: all called negative
    y = np.concatenate([np.ones(len(c_pos), int), np.zeros(len(c_neg), int)])
    pred = np.concatenate([np.where(miss, 0, 1), np.zeros(len(c_neg), int)])
    c = np.concatenate([c_pos, c_neg])

    tests = recall_tests(y, pred, c, POS, target, grid)
    p = tests["p_value"]
    assert tests["n_positive_kept"].tolist() == [60, 100, 140, 160, 160, 560, 560]
    assert tests["misses"].tolist() == [0, 0, 0, 10, 10, 10, 10]
    assert (p[:3] <= delta).all() and (p[3:5] > delta).all() and (p[5:] <= delta).all()
    certified = fixed_sequence_certified(p, delta)
    assert [grid[i] for i in certified] == [1.0, 0.9, 0.8]

    g = risk_controlled_threshold(y, pred, c, POS, target, delta, grid=grid)
    assert g.threshold == 0.8 == min(grid[i] for i in certified)     # the loosest, by hand and brute force
    assert g.n_positive_kept == 140 and g.recall_kept == 1.0 and g.p_value == p[2]
    kept = 140 + 100                                              # positives >= 0.8, negatives at 0.95
    assert g.referral_rate == pytest.approx(1 - kept / len(y))
    assert g.referral_rate < tests["referral_rate"][0]              # the strictest would refer more


@pytest.mark.parametrize("n_starts", [1, 4])
def test_the_threshold_is_the_loosest_of_every_certified_one_brute_force(n_starts):
    """On random validation sets: the threshold used is the loosest of the certified ones that
    fixed-sequence testing gives on the p-values of recall_tests (computed here, without MAPIE);
    in most sets several thresholds are certified, so loosest and strictest differ."""
    rng = np.random.default_rng(5)
    several = 0
    grid = DEFAULT_GRID if n_starts == 1 else np.round(np.linspace(0.99, 0.5, 50), 10)
    for _ in range(20):
        y, pred, c = draw(rng, 1500 if n_starts == 1 else 3000)  # delta / n_starts per start: more cases
        p = recall_tests(y, pred, c, POS, 0.95, grid)["p_value"]
        certified = fixed_sequence_certified(p, 0.1, n_starts)
        g = risk_controlled_threshold(y, pred, c, POS, 0.95, 0.1, grid=grid, n_starts=n_starts)
        if not certified:
            assert not g.certified
            continue
        assert g.threshold == min(grid[i] for i in certified)
        several += len(certified) > 1
    assert several >= 15, several
