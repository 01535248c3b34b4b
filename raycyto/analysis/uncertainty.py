"""Calibration and referral: ECE, reliability bins, referral curves, recall-targeted thresholds.

Calibration is top-label: the confidence of a prediction is the probability it gives its
predicted class, and it is right or wrong (Guo et al. 2017). Bins come from
``sklearn.calibration.calibration_curve(strategy="uniform")``; the per-bin counts use the
same bin assignment, so ECE = sum_b n_b / N * |accuracy_b - confidence_b| over populated bins.

Referral: a case is kept when its MC confidence (share of passes voting for the MC label)
is >= the threshold and referred to a human otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from raycyto.analysis.metrics import recall_of


def reliability_bins(correct: np.ndarray, confidence: np.ndarray, n_bins: int = 10) -> pd.DataFrame:
    """Populated reliability bins.

    Args:
        correct: [N] bool, prediction right.
        confidence: [N] in [0, 1], probability of the predicted class.
        n_bins: uniform bins over [0, 1].

    Returns:
        DataFrame (one row per populated bin): bin, confidence (mean), accuracy, count.
    """
    from sklearn.calibration import calibration_curve

    correct = np.asarray(correct, dtype=int)
    confidence = np.clip(np.asarray(confidence, dtype=float), 0.0, 1.0)
    if len(correct) == 0:
        return pd.DataFrame(columns=["bin", "confidence", "accuracy", "count"])
    prob_true, prob_pred = calibration_curve(correct, confidence, n_bins=n_bins,
                                             strategy="uniform", pos_label=1)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    binids = np.searchsorted(edges[1:-1], confidence)   # same assignment as calibration_curve
    counts = np.bincount(binids, minlength=n_bins)
    populated = np.flatnonzero(counts)
    return pd.DataFrame({"bin": populated, "confidence": prob_pred, "accuracy": prob_true,
                         "count": counts[populated]})


def expected_calibration_error(correct: np.ndarray, confidence: np.ndarray, n_bins: int = 10) -> float:
    """ECE over uniform bins (NaN for no cases)."""
    bins = reliability_bins(correct, confidence, n_bins)
    if bins.empty:
        return float("nan")
    w = bins["count"].to_numpy() / bins["count"].sum()
    return float(np.sum(w * np.abs(bins["accuracy"].to_numpy() - bins["confidence"].to_numpy())))


def top_label(probs: np.ndarray, y_true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(correct [N] bool, confidence [N]) for probabilities [N, C] against labels [N]."""
    probs = np.asarray(probs, dtype=float)
    pred = probs.argmax(axis=1)
    return pred == np.asarray(y_true), probs.max(axis=1)


def referral_at(y_true: np.ndarray, mc_label: np.ndarray, refer: np.ndarray) -> tuple[float, float]:
    """(referral rate, accuracy of mc_label on the kept cases; NaN if none kept)."""
    refer = np.asarray(refer, dtype=bool)
    if len(refer) == 0:
        return float("nan"), float("nan")
    kept = ~refer
    acc = float(np.mean(np.asarray(y_true)[kept] == np.asarray(mc_label)[kept])) if kept.any() \
        else float("nan")
    return float(refer.mean()), acc


def referral_curve(y_true: np.ndarray, mc_label: np.ndarray, confidence: np.ndarray,
                   num_classes: int, positive: int | None) -> pd.DataFrame:
    """Accuracy and recall on kept cases as the confidence threshold varies.

    Thresholds are 0 and every distinct confidence value, so each row is one reachable
    operating point.

    Returns:
        DataFrame: threshold, kept_share, referral_rate, accuracy_kept, recall_kept
        (recall of the positive class, or macro recall without one), ascending threshold.
    """
    y_true = np.asarray(y_true)
    mc_label = np.asarray(mc_label)
    confidence = np.asarray(confidence, dtype=float)
    rows = []
    for t in np.unique(np.concatenate([[0.0], confidence])):
        kept = confidence >= t
        n = int(kept.sum())
        rows.append({
            "threshold": float(t),
            "kept_share": n / len(confidence) if len(confidence) else float("nan"),
            "referral_rate": 1 - n / len(confidence) if len(confidence) else float("nan"),
            "accuracy_kept": float(np.mean(y_true[kept] == mc_label[kept])) if n else float("nan"),
            "recall_kept": recall_of(y_true[kept], mc_label[kept], num_classes, positive),
        })
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class ThresholdChoice:
    """The smallest threshold reaching a recall target, and what it costs."""

    target: float
    threshold: float          # NaN when the target cannot be reached
    referral_rate: float      # share referred at that threshold (on the data it was chosen on)
    recall_kept: float
    accuracy_kept: float

    @property
    def reached(self) -> bool:
        return not np.isnan(self.threshold)


def smallest_threshold_for_recall(y_true: np.ndarray, mc_label: np.ndarray, confidence: np.ndarray,
                                  target: float, num_classes: int,
                                  positive: int | None) -> ThresholdChoice:
    """Smallest confidence threshold whose kept cases reach ``target`` recall.

    Args:
        y_true, mc_label: [N] ints; confidence: [N] MC confidence.
        target: recall to reach, in (0, 1].
        num_classes: C; positive: positive class (None -> macro recall).

    Returns:
        ThresholdChoice (threshold NaN when no threshold reaches the target).
    """
    curve = referral_curve(y_true, mc_label, confidence, num_classes, positive)
    ok = curve[curve["recall_kept"] >= target - 1e-12]
    if ok.empty:
        return ThresholdChoice(target, float("nan"), float("nan"), float("nan"), float("nan"))
    row = ok.iloc[0]   # curve is ascending in threshold
    return ThresholdChoice(target, float(row["threshold"]), float(row["referral_rate"]),
                           float(row["recall_kept"]), float(row["accuracy_kept"]))


def apply_threshold(y_true: np.ndarray, mc_label: np.ndarray, confidence: np.ndarray,
                    threshold: float, num_classes: int, positive: int | None) -> dict[str, float]:
    """Referral rate, recall and accuracy on kept cases at a fixed threshold (e.g. on test)."""
    y_true = np.asarray(y_true)
    mc_label = np.asarray(mc_label)
    kept = np.asarray(confidence, dtype=float) >= threshold
    n = len(kept)
    return {
        "referral_rate": 1 - kept.mean() if n else float("nan"),
        "recall_kept": recall_of(y_true[kept], mc_label[kept], num_classes, positive),
        "accuracy_kept": float(np.mean(y_true[kept] == mc_label[kept])) if kept.any() else float("nan"),
    }
