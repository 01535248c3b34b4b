"""Risk-coverage curves and AURC against brute-force definitions."""

from __future__ import annotations

from itertools import permutations

import numpy as np
import pandas as pd
import pytest

from raycyto.analysis.selective import (SCORE_NAMES, aurc, aurc_optimal, excess_aurc,
                                        risk_coverage, selective_curves, selective_folds,
                                        selective_scores, selective_summary)


def brute_aurc(correct: np.ndarray, confidence: np.ndarray) -> float:
    """Mean over every order that sorts confidence descending of mean_k errors(top k) / k."""
    err = ~np.asarray(correct, bool)
    conf = np.asarray(confidence, float)
    vals = []
    for perm in permutations(range(len(conf))):
        c = conf[list(perm)]
        if np.all(np.diff(c) <= 0):
            e = err[list(perm)]
            vals.append(np.mean(np.cumsum(e) / np.arange(1, len(e) + 1)))
    return float(np.mean(vals))


@pytest.mark.parametrize("seed", range(6))
def test_aurc_equals_the_average_over_tie_orders(seed):
    rng = np.random.default_rng(seed)
    n = 7
    conf = rng.choice([0.6, 0.8, 1.0], size=n)               # heavy ties, like MC votes
    correct = rng.uniform(size=n) < 0.6
    assert aurc(correct, conf) == pytest.approx(brute_aurc(correct, conf), abs=1e-12)


def test_without_ties_aurc_is_the_sorted_definition():
    rng = np.random.default_rng(10)
    conf = rng.uniform(size=300)
    correct = rng.uniform(size=300) < conf                   # informative score
    e = ~correct[np.argsort(-conf)]
    assert aurc(correct, conf) == pytest.approx(np.mean(np.cumsum(e) / np.arange(1, 301)))


def test_risk_coverage_matches_thresholding_by_hand():
    rng = np.random.default_rng(11)
    conf = rng.choice([0.5, 0.7, 0.9, 1.0], size=50)
    correct = rng.uniform(size=50) < 0.7
    rc = risk_coverage(correct, conf)
    assert rc["coverage"].is_monotonic_increasing and rc["coverage"].iloc[-1] == 1.0
    for row in rc.itertuples():
        kept = conf >= row.threshold
        assert row.coverage == pytest.approx(kept.mean())
        assert row.risk == pytest.approx(np.mean(~correct[kept]))


def test_a_perfect_ranking_has_zero_excess_and_a_reversed_one_the_most():
    rng = np.random.default_rng(12)
    correct = rng.uniform(size=200) < 0.8
    perfect = correct.astype(float) + rng.uniform(0, 0.1, 200)
    reverse = -perfect
    noise = rng.uniform(size=200)
    assert excess_aurc(correct, perfect) == pytest.approx(0.0, abs=1e-12)
    assert aurc(correct, perfect) == pytest.approx(aurc_optimal(correct))
    assert aurc(correct, perfect) < aurc(correct, noise) < aurc(correct, reverse)
    # an uninformative constant score: the risk at every coverage is the error rate
    assert aurc(correct, np.ones(200)) == pytest.approx(np.mean(~correct))


def test_scores_and_binary_temperature_scaling_keeps_the_ranking():
    rng = np.random.default_rng(13)
    n = 400
    p1 = rng.uniform(size=n)
    probs = np.stack([1 - p1, p1], 1)
    y = (rng.uniform(size=n) < p1).astype(int)
    pred = probs.argmax(1)
    mc_mean = np.clip(probs + rng.normal(0, 0.05, (n, 1)) * [[1, -1]], 0, 1)
    mc_conf = np.round(rng.uniform(0.5, 1, n), 2)
    s = selective_scores(y, pred, probs, mc_label=mc_mean.argmax(1), mc_confidence=mc_conf,
                         mc_mean=mc_mean, temperature=2.0, set_size=rng.integers(1, 3, n))
    assert list(s) == [k for k in SCORE_NAMES if k != "max logit"]
    assert aurc(*s["temperature-scaled softmax"]) == pytest.approx(aurc(*s["softmax"]))
    only = selective_scores(y, pred, probs)
    assert list(only) == ["softmax"]
    summary = selective_summary(s)
    assert list(summary.columns) == ["score", "aurc", "e_aurc", "risk", "n"] and len(summary) == 6
    curves = selective_curves(s)
    assert set(curves["score"]) == set(s) and curves["coverage"].between(0, 1).all()


def test_selective_folds_scores_test_rows_with_validation_fitted_scores():
    rng = np.random.default_rng(14)
    rows = []
    for fold in range(2):
        for split, n in (("val", 60), ("test", 90)):
            z = rng.normal(size=(n, 3)) * 2
            p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
            y = (p.cumsum(1) > rng.uniform(size=(n, 1))).argmax(1)
            rows.append(pd.DataFrame({"trial_id": "00000007", "fold": fold, "split": split,
                                      "label": y, "pred": p.argmax(1), "prob_a": p[:, 0],
                                      "prob_b": p[:, 1], "prob_c": p[:, 2], "mc_label": p.argmax(1),
                                      "mc_confidence": 1.0, "mc_mean_a": p[:, 0],
                                      "mc_mean_b": p[:, 1], "mc_mean_c": p[:, 2]}))
    df = pd.concat(rows, ignore_index=True)
    long = selective_folds(df, ["prob_a", "prob_b", "prob_c"], ["mc_mean_a", "mc_mean_b", "mc_mean_c"])
    assert len(long) == 2 * 90 * 6                                # folds x test rows x scores
    per = long.groupby(["fold", "score"]).apply(
        lambda g: aurc(g["correct"].to_numpy(), g["confidence"].to_numpy()), include_groups=False)
    assert per.notna().all()
    # a constant MC vote confidence (no dropout) cannot rank: AURC = error rate
    g = long[(long["fold"] == 0) & (long["score"] == "MC vote confidence")]
    assert per[(0, "MC vote confidence")] == pytest.approx(np.mean(~g["correct"].to_numpy(bool)))
