"""Metric and uncertainty functions on constructed predictions with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.calibration import calibration_curve

from raycyto.analysis.metrics import (auc_score, classification_metrics, confusion,
                                      per_class_metrics, recall_of)
from raycyto.analysis.uncertainty import (expected_calibration_error, referral_at, referral_curve,
                                          reliability_bins, smallest_threshold_for_recall,
                                          top_label)


def test_perfect_binary_classifier_scores_one_and_is_perfectly_calibrated():
    y = np.array([0, 1, 1, 0, 1, 0])
    probs = np.eye(2)[y]                                   # [6, 2] one-hot
    values, notes = classification_metrics(y, y, probs, positive=1)
    assert values == {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "auc": 1.0}
    assert notes == []
    correct, conf = top_label(probs, y)
    bins = reliability_bins(correct, conf)
    assert list(bins["count"]) == [6] and bins["accuracy"].iloc[0] == 1.0
    assert expected_calibration_error(correct, conf) == 0.0


def test_perfect_five_class_classifier_scores_one():
    y = np.repeat(np.arange(5), 3)
    values, _ = classification_metrics(y, y, np.eye(5)[y], positive=None)
    assert all(v == 1.0 for v in values.values())


def test_known_confusion_matrix_and_binary_scores():
    # actual:   0 0 0 0 1 1 1 1 1 1 ; predicted: 0 0 0 1 1 1 1 1 0 0
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    yp = np.array([0, 0, 0, 1, 1, 1, 1, 1, 0, 0])
    assert confusion(y, yp, 2).tolist() == [[3, 1], [2, 4]]
    assert np.allclose(confusion(y, yp, 2, normalize=True), [[0.75, 0.25], [2 / 6, 4 / 6]])
    probs = np.eye(2)[yp] * 0.8 + 0.1
    values, _ = classification_metrics(y, yp, probs, positive=1)
    assert values["accuracy"] == pytest.approx(0.7)
    assert values["precision"] == pytest.approx(4 / 5)
    assert values["recall"] == pytest.approx(4 / 6)
    # positive class 0 instead: precision 3/5, recall 3/4
    values0, _ = classification_metrics(y, yp, probs, positive=0)
    assert values0["precision"] == pytest.approx(3 / 5) and values0["recall"] == pytest.approx(0.75)
    pc = per_class_metrics(y, yp, ["normal", "abnormal"])
    assert pc["recall"].tolist() == pytest.approx([0.75, 4 / 6])
    assert pc["support"].tolist() == [4, 6]


def test_single_class_fold_gives_nan_auc_with_a_note_not_a_crash():
    y = np.zeros(4, int)
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]])
    values, notes = classification_metrics(y, probs.argmax(1), probs, positive=1)
    assert np.isnan(values["auc"]) and "only class [0]" in notes[0]
    assert values["accuracy"] == 0.75
    # multiclass fold missing a class
    y5 = np.array([0, 1, 2, 3, 0, 1])
    p5 = np.full((6, 5), 0.2)
    auc, note = auc_score(y5, p5, None)
    assert np.isnan(auc) and note.startswith("AUC undefined")


def test_reliability_bins_are_sklearns_calibration_curve_and_ece_is_their_weighted_gap():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.5, 1.0, 200)
    correct = rng.random(200) < conf * 0.9
    bins = reliability_bins(correct, conf, n_bins=10)
    prob_true, prob_pred = calibration_curve(correct.astype(int), conf, n_bins=10)
    assert np.allclose(bins["accuracy"], prob_true) and np.allclose(bins["confidence"], prob_pred)
    assert bins["count"].sum() == 200
    hist, _ = np.histogram(conf, bins=np.linspace(0, 1, 11))
    assert bins["count"].tolist() == hist[hist > 0].tolist()
    gap = np.abs(prob_true - prob_pred)
    assert expected_calibration_error(correct, conf) == pytest.approx(
        float(np.sum(bins["count"] / 200 * gap)), abs=1e-12)


def test_known_referral_rate_and_kept_accuracy():
    y = np.array([1, 1, 0, 0, 1])
    mc = np.array([1, 0, 0, 1, 1])
    conf = np.array([0.9, 0.6, 1.0, 0.7, 0.85])
    rate, acc = referral_at(y, mc, conf < 0.8)
    assert rate == pytest.approx(0.4) and acc == pytest.approx(1.0)
    curve = referral_curve(y, mc, conf, 2, positive=1)
    # operating points are the distinct confidences; 0.85 keeps exactly conf >= 0.8 here
    row = curve[curve["threshold"] == 0.85].iloc[0]
    assert row["referral_rate"] == pytest.approx(0.4) and row["recall_kept"] == 1.0
    # threshold 0: everything kept
    assert curve.iloc[0]["kept_share"] == 1.0 and curve.iloc[0]["accuracy_kept"] == pytest.approx(0.6)


def test_smallest_threshold_reaching_recall_and_its_cost():
    # positives (label 1) with their MC vote and confidence:
    #   conf 0.55 wrong, 0.65 right, 0.75 wrong, 0.95 right, 1.0 right; negatives at 0.9 / 0.6
    y = np.array([1, 1, 1, 1, 1, 0, 0])
    mc = np.array([0, 1, 0, 1, 1, 0, 0])
    conf = np.array([0.55, 0.65, 0.75, 0.95, 1.0, 0.9, 0.6])
    # recall of kept positives: t<=.55: 3/5; t=.6,.65: 3/4; t=.75: 2/3; t=.9,.95,1.0: 1
    c = smallest_threshold_for_recall(y, mc, conf, 0.75, 2, positive=1)
    assert c.threshold == pytest.approx(0.6) and c.referral_rate == pytest.approx(1 / 7)
    c = smallest_threshold_for_recall(y, mc, conf, 1.0, 2, positive=1)
    assert c.threshold == pytest.approx(0.9) and c.referral_rate == pytest.approx(4 / 7)
    assert c.recall_kept == 1.0
    impossible = smallest_threshold_for_recall(np.array([1, 1]), np.array([0, 0]),
                                               np.array([0.9, 1.0]), 0.5, 2, positive=1)
    assert not impossible.reached


def test_macro_recall_without_positive_class_counts_only_present_classes():
    y = np.array([0, 0, 1, 1])
    yp = np.array([0, 0, 1, 0])
    assert recall_of(y, yp, 5, None) == pytest.approx((1.0 + 0.5) / 2)
    assert recall_of(y, yp, 5, 1) == pytest.approx(0.5)
