"""Split-conformal prediction sets: coverage, set shape, JSON, validation-only calibration,
and agreement with MAPIE 1.x on the same data."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest

from raycyto.referral.conformal import (ConformalCalibration, calibrate_conformal,
                                        conformal_folds, conformal_quantile, conformity_scores,
                                        mass_above, prediction_set, prediction_sets, set_metrics)
from raycyto.errors import RaycytoError


def synthetic(rng: np.random.Generator, n: int, c: int = 4, sharp: float = 2.0,
              miscalibrated: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Exchangeable (probs [n, c], labels [n]): labels drawn from softmax(sharp * z); the
    model reports softmax(2 * sharp * z) when miscalibrated (overconfident)."""
    z = rng.normal(size=(n, c))
    true = np.exp(sharp * z)
    true /= true.sum(1, keepdims=True)
    y = (true.cumsum(1) > rng.uniform(size=(n, 1))).argmax(1)
    shown = np.exp((2 * sharp if miscalibrated else sharp) * z)
    return shown / shown.sum(1, keepdims=True), y


@pytest.mark.parametrize("score,randomized", [("lac", False), ("aps", True), ("aps", False)])
@pytest.mark.parametrize("level", [0.9, 0.95])
def test_coverage_on_exchangeable_data_is_the_split_conformal_rate(score, level, randomized):
    """Mean test coverage over 200 repetitions is ceil((n+1) level) / (n+1) within 4 standard
    deviations of the beta-binomial spread (it would not be without the (n+1) correction:
    ceil(n level) / (n+1) = 0.882 for n=50, level 0.9). LAC's continuous score and the
    randomized APS give exactly that rate, not more; the non-randomized APS (score: the mass
    above the true class; sets take the class that crosses the threshold) at least that rate,
    more where many cases tie at a score of 0."""
    rng = np.random.default_rng(0)
    n_cal, n_test, reps = 50, 200, 200
    cover = []
    for r in range(reps):
        p, y = synthetic(rng, n_cal + n_test)
        u = rng.uniform(size=n_cal + n_test) if randomized else None
        cal = calibrate_conformal(p[:n_cal], y[:n_cal], [level], [score], u=None if u is None else u[:n_cal])
        sets = prediction_sets(p[n_cal:], cal, score, level, None if u is None else u[n_cal:])
        cover.append(set_metrics(sets, y[n_cal:])["coverage"])
    k = math.ceil((n_cal + 1) * level)
    a, b = k, n_cal + 1 - k                                    # threshold rank ~ Beta(a, b)
    expected = a / (a + b)
    var = a * b / ((a + b) ** 2 * (a + b + 1)) + expected * (1 - expected) / n_test
    tol = 4 * math.sqrt(var / reps)
    assert np.mean(cover) >= expected - tol, (np.mean(cover), expected, tol)
    if score == "lac" or randomized:
        assert np.mean(cover) <= expected + tol, (np.mean(cover), expected, tol)


def test_randomized_aps_needs_the_image_uniform_and_one_image_always_gets_one_set():
    from raycyto.referral.conformal import image_uniform, prediction_set

    rng = np.random.default_rng(12)
    p, y = synthetic(rng, 300, c=5)
    u = np.array([image_uniform(bytes([i % 256, i // 256])) for i in range(300)])
    assert ((u >= 0) & (u < 1)).all() and len(set(u)) == 300
    assert image_uniform(b"same bytes") == image_uniform(b"same bytes") != image_uniform(b"other")
    cal = calibrate_conformal(p[:200], y[:200], [0.9], ["aps"], u=u[:200])
    assert cal.randomized and ConformalCalibration.from_json(cal.to_json()).randomized
    with pytest.raises(RaycytoError, match="uniform"):
        prediction_sets(p[200:], cal, "aps", 0.9)
    sets = prediction_sets(p[200:], cal, "aps", 0.9, u[200:])
    one = [prediction_set(p[200 + i], cal, "aps", 0.9, u[200 + i]) for i in range(100)]
    assert [sorted(s) for s in one] == [sorted(np.flatnonzero(r).tolist()) for r in sets]
    # a larger u takes classes out, never in: the draw only decides the boundary class
    lo, hi = prediction_sets(p[200:], cal, "aps", 0.9, np.zeros(100)), prediction_sets(p[200:], cal, "aps", 0.9, np.ones(100))
    assert (hi <= lo).all() and (hi <= sets).all() and (sets <= lo).all()


def test_mondrian_covers_each_class_including_a_rare_positive_class():
    """Class-conditional thresholds keep coverage for a 15% class where the marginal
    thresholds under-cover it."""
    rng = np.random.default_rng(1)
    level, reps = 0.9, 200
    cov_m, cov_marg = [], []
    for r in range(reps):
        n = 600
        y = (rng.uniform(size=n) < 0.15).astype(int)          # 1 = rare positive class
        logit = rng.normal(loc=np.where(y == 1, 0.3, -1.5), scale=1.0)
        p1 = 1 / (1 + np.exp(-logit))
        p = np.stack([1 - p1, p1], 1)
        cal_m = calibrate_conformal(p[:300], y[:300], [level], ["lac"], mondrian=True)
        cal = calibrate_conformal(p[:300], y[:300], [level], ["lac"])
        te = slice(300, None)
        cov_m.append(set_metrics(prediction_sets(p[te], cal_m, "lac", level), y[te])["coverage_class1"])
        cov_marg.append(set_metrics(prediction_sets(p[te], cal, "lac", level), y[te])["coverage_class1"])
    # ~45 positive calibration cases per repetition: E[coverage] = ceil(46 * .9) / 46 >= 0.9
    assert np.nanmean(cov_m) >= level - 0.01
    assert np.nanmean(cov_marg) < level - 0.05


@pytest.mark.parametrize("score", ["lac", "aps"])
def test_sets_contain_the_argmax_when_the_level_is_high_enough(score):
    rng = np.random.default_rng(2)
    p, y = synthetic(rng, 2000, c=5)
    cal = calibrate_conformal(p[:1000], y[:1000], [0.5, 0.95], [score])
    top = p[1000:].argmax(1)
    sets95 = prediction_sets(p[1000:], cal, score, 0.95)
    assert sets95[np.arange(1000), top].all()
    assert (sets95.sum(1) >= 1).all()
    # any non-empty set holds the argmax (LAC/APS sets are closed upward in probability)
    sets50 = prediction_sets(p[1000:], cal, score, 0.5)
    nonempty = sets50.any(1)
    assert sets50[np.arange(1000), top][nonempty].all()


def test_lac_sets_shrink_as_the_model_becomes_more_confident():
    rng = np.random.default_rng(3)
    p, y = synthetic(rng, 1000, c=4)
    cal = calibrate_conformal(p, y, [0.9], ["lac"])
    m = np.linspace(0.25, 1.0, 61)                             # max probability
    probs = np.stack([m, *(np.stack([(1 - m) / 3] * 3))], 1)   # [61, 4]
    size = prediction_sets(probs, cal, "lac", 0.9).sum(1)
    assert (np.diff(size) <= 0).all(), size
    assert size[0] == 4 and size[-1] == 1


def test_cross_fitted_calibration_never_reads_validation_rows_or_its_own_fold():
    """Fold k's thresholds come from the other folds' test rows only: corrupting fold k's test
    rows moves its coverage, not its thresholds; corrupting every validation row moves nothing."""
    rng = np.random.default_rng(4)
    rows = []
    for trial in ("00000123", "3e104512"):
        for fold in range(2):
            for split, n in (("val", 80), ("test", 120)):
                p, y = synthetic(rng, n, c=3)
                rows.append(pd.DataFrame({"trial_id": trial, "fold": fold, "split": split,
                                          "label": y, "prob_a": p[:, 0], "prob_b": p[:, 1],
                                          "prob_c": p[:, 2]}))
    df = pd.concat(rows, ignore_index=True)
    cols = ["prob_a", "prob_b", "prob_c"]
    before = conformal_folds(df, cols, mondrian=True)
    assert len(before) == 2 * 2 * 2 * 2                      # trials x folds x scores x levels
    bad = df.copy()
    own = (bad["split"] == "test") & (bad["fold"] == 0)
    bad.loc[own, "label"] = (bad.loc[own, "label"] + 1) % 3
    bad.loc[own, cols] = rng.dirichlet(np.ones(3), size=int(own.sum()))
    after = conformal_folds(bad, cols, mondrian=True)
    f0, f1 = (before["fold"] == 0).to_numpy(), (before["fold"] == 1).to_numpy()
    assert before.loc[f0, "thresholds"].tolist() == after.loc[f0, "thresholds"].tolist()
    assert not np.allclose(before.loc[f0, "coverage"], after.loc[f0, "coverage"])   # read to score
    assert before.loc[f1, "thresholds"].tolist() != after.loc[f1, "thresholds"].tolist()   # fold 1 calibrates on it
    bad_val = df.copy()
    val = df["split"] == "val"
    bad_val.loc[val, "label"] = (df.loc[val, "label"] + 1) % 3
    bad_val.loc[val, cols] = rng.dirichlet(np.ones(3), size=int(val.sum()))
    pd.testing.assert_frame_equal(before, conformal_folds(bad_val, cols, mondrian=True))


def test_json_round_trip_is_strict_json_and_gives_the_same_sets():
    rng = np.random.default_rng(5)
    p, y = synthetic(rng, 300, c=3)
    y[:3] = 2                                              # class 2 present but rare below
    cal = calibrate_conformal(p[:30], y[:30], [0.9, 0.95], mondrian=True, source="mc_mean")
    doc = json.loads(json.dumps(cal.to_json(), allow_nan=False))
    back = ConformalCalibration.from_json(doc)
    assert back == cal and back.source == "mc_mean"
    for score in ("lac", "aps"):
        for level in (0.9, 0.95):
            np.testing.assert_array_equal(prediction_sets(p, cal, score, level),
                                          prediction_sets(p, back, score, level))
    assert set(doc["thresholds"]) == {"lac", "aps"} and set(doc["thresholds"]["lac"]) == {"0.9", "0.95"}
    assert len(doc["thresholds"]["lac"]["0.9"]) == 3


def test_too_few_calibration_cases_give_an_infinite_threshold_and_full_sets():
    assert conformal_quantile(np.arange(9.0), 0.9) == 8.0      # k = ceil(10 * 0.9) = 9, not 10
    assert math.isinf(conformal_quantile(np.arange(5.0), 0.9))   # k = 6 > 5
    p = np.array([[0.9, 0.1], [0.6, 0.4]])
    cal = calibrate_conformal(p, [0, 0], [0.9], ["lac"])
    assert prediction_sets(p, cal, "lac", 0.9).all()
    assert cal.to_json()["thresholds"]["lac"]["0.9"] == [None, None]


def test_prediction_set_of_one_image_matches_the_batch_and_is_ordered():
    rng = np.random.default_rng(6)
    p, y = synthetic(rng, 400, c=5)
    cal = calibrate_conformal(p[:200], y[:200])
    for i in range(200, 230):
        for score in ("lac", "aps"):
            s = prediction_set(p[i].tolist(), cal, score, 0.95)
            assert sorted(s) == np.flatnonzero(prediction_sets(p[i:i + 1], cal, score, 0.95)[0]).tolist()
            assert s == sorted(s, key=lambda k: -p[i, k])


def test_mass_above_handles_ties():
    above = mass_above(np.array([[0.4, 0.2, 0.4], [0.1, 0.6, 0.3]]))
    np.testing.assert_allclose(above, [[0.0, 0.8, 0.0], [0.9, 0.0, 0.6]])


def test_bad_inputs_raise_named_errors():
    p = np.array([[0.7, 0.3]])
    with pytest.raises(RaycytoError, match="levels"):
        calibrate_conformal(p, [0], [90])
    with pytest.raises(RaycytoError, match="raps"):
        calibrate_conformal(p, [0], scores=["raps"])
    with pytest.raises(RaycytoError, match="labels"):
        calibrate_conformal(p, [2])
    cal = calibrate_conformal(p, [0], [0.9])
    with pytest.raises(RaycytoError, match="0.8"):
        prediction_sets(p, cal, "lac", 0.8)


def _identity_estimator(c: int):
    """A prefit sklearn 'classifier' whose predict_proba returns its input (probabilities)."""
    from sklearn.base import BaseEstimator, ClassifierMixin

    class Identity(ClassifierMixin, BaseEstimator):
        def fit(self, X, y=None):
            self.classes_ = np.arange(c)
            return self

        def predict_proba(self, X):
            return np.asarray(X)

        def predict(self, X):
            return np.asarray(X).argmax(1)

    return Identity().fit(None)


@pytest.mark.parametrize("score", ["lac", "aps"])
def test_agrees_with_mapie_split_conformal_classifier(score):
    """Same thresholds (LAC; APS with MAPIE's random_state) and the same sets as MAPIE 1.x
    SplitConformalClassifier(prefit=True) on the same probability arrays."""
    from mapie.classification import SplitConformalClassifier

    rng = np.random.default_rng(7)
    p, y = synthetic(rng, 900, c=4)
    levels = [0.9, 0.95]
    seed = 11
    m = SplitConformalClassifier(estimator=_identity_estimator(4), confidence_level=levels,
                                 conformity_score=score, prefit=True, random_state=seed)
    m.conformalize(p[:400], y[:400])
    _, mapie_sets = m.predict_set(p[400:])                       # [N, C, levels]
    # MAPIE randomizes the calibration score as above + (1 - u) p with u from its random_state
    # and always includes the last class when predicting: our non-randomized sets with u' = 1 - u
    u = 1.0 - np.random.RandomState(seed).uniform(size=400)
    ours = dataclasses.replace(calibrate_conformal(p[:400], y[:400], levels, [score], u=u), randomized=False)
    for i, level in enumerate(levels):
        np.testing.assert_array_equal(prediction_sets(p[400:], ours, score, level), mapie_sets[:, :, i])
    if score == "aps":   # the non-randomised score equals MAPIE's cumulated true-label mass
        from mapie.conformity_scores.sets.aps import APSConformityScore

        cum, _ = APSConformityScore().get_true_label_cumsum_proba(y[:400], p[:400], np.arange(4))
        np.testing.assert_allclose(conformity_scores(p[:400], y[:400], "aps", np.ones(400)), np.ravel(cum))


def test_optimistic_selection_rows_do_not_break_coverage_on_test_rows():
    """A fabricated trial whose validation rows are optimistic (a model that looks certain and
    right on the rows that chose it) and whose out-of-fold rows are honest: sets cross-fitted on
    out-of-fold rows still cover ~0.90 of test rows; sets calibrated on the validation rows, as
    before this change, under-cover."""
    rng = np.random.default_rng(21)
    rows = []
    for fold in range(5):
        p, y = synthetic(rng, 200, c=3, miscalibrated=True)
        rows.append(pd.DataFrame({"trial_id": "t", "fold": fold, "split": "test", "label": y,
                                  "prob_a": p[:, 0], "prob_b": p[:, 1], "prob_c": p[:, 2]}))
        yv = rng.integers(0, 3, 60)
        pv = np.full((60, 3), 0.02)
        pv[np.arange(60), yv] = 0.96                       # chosen because it looked perfect here
        rows.append(pd.DataFrame({"trial_id": "t", "fold": fold, "split": "val", "label": yv,
                                  "prob_a": pv[:, 0], "prob_b": pv[:, 1], "prob_c": pv[:, 2]}))
    df = pd.concat(rows, ignore_index=True)
    cols = ["prob_a", "prob_b", "prob_c"]
    df["u"] = rng.uniform(size=len(df))
    for score in ("lac", "aps"):
        f = conformal_folds(df, cols, [0.9], [score])
        assert abs(f["coverage"].mean() - 0.9) < 0.03, (score, f["coverage"].mean())
    val, test = df[df["split"] == "val"], df[df["split"] == "test"]
    naive = calibrate_conformal(val[cols].to_numpy(), val["label"].to_numpy(), [0.9], ["lac"])
    assert set_metrics(prediction_sets(test[cols].to_numpy(), naive, "lac", 0.9), test["label"].to_numpy())["coverage"] < 0.8


def test_conformal_summary_has_the_conformal_csv_columns():
    from raycyto.referral.conformal import conformal_summary

    rng = np.random.default_rng(8)
    rows = []
    for fold in range(3):
        for split, n in (("val", 100), ("test", 100)):
            p, y = synthetic(rng, n, c=2)
            rows.append(pd.DataFrame({"trial_id": "00000001", "fold": fold, "split": split,
                                      "label": y, "prob_n": p[:, 0], "prob_a": p[:, 1]}))
    folds = conformal_folds(pd.concat(rows, ignore_index=True), ["prob_n", "prob_a"])
    s = conformal_summary(folds)
    assert {"trial_id", "level", "score", "coverage_mean", "coverage_std", "set_size_mean",
            "singleton_rate", "coverage_class1_mean", "folds"} <= set(s.columns)
    assert len(s) == 4 and (s["folds"] == 3).all()
    one = folds[(folds["score"] == "lac") & (folds["level"] == 0.9)]
    row = s[(s["score"] == "lac") & (s["level"] == 0.9)].iloc[0]
    assert row["coverage_mean"] == pytest.approx(one["coverage"].mean())
    assert row["coverage_std"] == pytest.approx(one["coverage"].std())
    assert conformal_summary(folds.iloc[:0]).empty
