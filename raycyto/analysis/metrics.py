"""Pure classification metrics, each a thin wrapper over scikit-learn.

Conventions (so every number can be recomputed from predictions.parquet):
- binary tasks (C == 2): precision / recall / F1 of the positive class
  (``average="binary", pos_label=positive``); AUC = ``roc_auc_score(y == positive, p_positive)``.
- multiclass: macro averages over all C classes (``labels=range(C)``); AUC =
  ``roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=range(C))``.
- ``zero_division=0`` everywhere: a class never predicted has precision 0, not a crash.
- An undefined AUC (a fold with one class) is NaN with a note, never an exception.
"""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
import pandas as pd

SUMMARY_METRICS = ("accuracy", "precision", "recall", "f1", "auc")


def _prf(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int,
         positive: int | None) -> tuple[float, float, float]:
    """(precision, recall, F1): positive class when binary, macro otherwise."""
    from sklearn.metrics import precision_recall_fscore_support

    if num_classes == 2:
        p, r, f, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=[0, 1], pos_label=positive, average="binary", zero_division=0)
    else:
        p, r, f, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=list(range(num_classes)), average="macro", zero_division=0)
    return float(p), float(r), float(f)


def auc_score(y_true: np.ndarray, probs: np.ndarray, positive: int | None) -> tuple[float, str]:
    """ROC AUC; binary on the positive column, multiclass one-vs-rest macro.

    Args:
        y_true: [N] int labels.
        probs: [N, C] class probabilities.
        positive: positive class index (used when C == 2).

    Returns:
        (auc, note): auc is NaN and note says why when AUC is undefined.
    """
    from sklearn.metrics import roc_auc_score

    num_classes = probs.shape[1]
    present = np.unique(y_true)
    if len(present) < 2:
        return float("nan"), f"AUC undefined: only class {present.tolist()} present"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if num_classes == 2:
                auc = roc_auc_score(y_true == positive, probs[:, positive])
            else:
                auc = roc_auc_score(y_true, probs, multi_class="ovr", average="macro",
                                    labels=list(range(num_classes)))
    except ValueError as exc:
        return float("nan"), f"AUC undefined: {exc}"
    if np.isnan(auc):
        return float("nan"), "AUC undefined: a class is absent from this fold"
    return float(auc), ""


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, probs: np.ndarray,
                           positive: int | None) -> tuple[dict[str, float], list[str]]:
    """accuracy, precision, recall, f1, auc of one set of predictions.

    Args:
        y_true: [N] int labels; y_pred: [N] int predictions; probs: [N, C].
        positive: positive class index (binary tasks).

    Returns:
        ({metric: value}, notes).
    """
    from sklearn.metrics import accuracy_score

    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    probs = np.asarray(probs, dtype=float)
    num_classes = probs.shape[1]
    p, r, f = _prf(y_true, y_pred, num_classes, positive)
    auc, note = auc_score(y_true, probs, positive)
    values = {"accuracy": float(accuracy_score(y_true, y_pred)), "precision": p,
              "recall": r, "f1": f, "auc": auc}
    return values, [note] if note else []


def per_class_metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    """Per class precision / recall / F1 / support.

    Returns:
        DataFrame with columns class, precision, recall, f1, support (one row per class).
    """
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, s = precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(len(class_names))), average=None, zero_division=0)
    return pd.DataFrame({"class": class_names, "precision": p, "recall": r, "f1": f,
                         "support": s})


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int,
              normalize: bool = False) -> np.ndarray:
    """Confusion matrix [C, C] (rows = actual, columns = predicted); row-normalised on request.

    Rows of classes absent from y_true are 0 when normalised (not NaN).
    """
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(y_true, y_pred, labels=list(range(num_classes)))
    if not normalize:
        return cm
    rows = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)


def recall_of(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int,
              positive: int | None) -> float:
    """Positive-class recall when a positive class is given, else macro recall (NaN if empty)."""
    from sklearn.metrics import recall_score

    if len(y_true) == 0:
        return float("nan")
    if positive is not None:
        if not (np.asarray(y_true) == positive).any():
            return float("nan")
        return float(recall_score(np.asarray(y_true) == positive, np.asarray(y_pred) == positive,
                                  zero_division=0))
    # Macro over the classes present among these cases: a class absent from a kept subset
    # has no recall to speak of (sklearn would count it as 0 with labels=range(C)).
    return float(recall_score(y_true, y_pred, labels=np.unique(y_true), average="macro",
                              zero_division=0))


def _accuracy(y, yp, probs, positive) -> float:
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(y, yp))


def _balanced_accuracy(y, yp, probs, positive) -> float:
    """Mean recall over the classes present in ``y`` (scikit-learn's balanced accuracy)."""
    from sklearn.metrics import balanced_accuracy_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true"
        return float(balanced_accuracy_score(y, yp))


def specificity(y_true: np.ndarray, y_pred: np.ndarray, positive: int | None) -> float:
    """Binary tasks: recall of the negative class (TN / (TN + FP)); NaN without a positive class
    or without negative cases."""
    if positive is None:
        return float("nan")
    neg = np.asarray(y_true) != positive
    if not neg.any():
        return float("nan")
    return float(np.mean(np.asarray(y_pred)[neg] != positive))


def log_loss_of(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Cross-entropy of probabilities [N, C] (rows renormalised, clipped at 1e-7); NaN if empty."""
    from sklearn.metrics import log_loss

    probs = np.asarray(probs, dtype=np.float64)
    if len(probs) == 0:
        return float("nan")
    probs = np.clip(probs, 1e-7, None)
    probs = probs / probs.sum(1, keepdims=True)
    return float(log_loss(np.asarray(y_true), probs, labels=list(range(probs.shape[1]))))


def brier_of(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Multiclass Brier score: mean over rows of ``sum_k (p_k - [y == k])^2``; NaN if empty."""
    probs = np.asarray(probs, dtype=np.float64)
    if len(probs) == 0:
        return float("nan")
    onehot = np.eye(probs.shape[1])[np.asarray(y_true, dtype=int)]
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def _prf_one(index: int) -> Callable:
    return lambda y, yp, probs, positive: _prf(y, yp, probs.shape[1], positive)[index]


# Metric registry for selection: name -> (fn(y [N], pred [N], probs [N, C], positive) -> float,
# higher_is_better). Used by raycyto.analysis.selection (one rule for report and export).
SelectFn = Callable[[np.ndarray, np.ndarray, np.ndarray, "int | None"], float]
SELECT_METRICS: dict[str, tuple[SelectFn, bool]] = {
    "accuracy": (_accuracy, True),
    "balanced_accuracy": (_balanced_accuracy, True),
    "precision": (_prf_one(0), True),
    "recall": (_prf_one(1), True),
    "specificity": (lambda y, yp, probs, positive: specificity(y, yp, positive), True),
    "f1": (_prf_one(2), True),
    "auc": (lambda y, yp, probs, positive: auc_score(y, probs, positive)[0], True),
    "loss": (lambda y, yp, probs, positive: log_loss_of(y, probs), False),
    "brier": (lambda y, yp, probs, positive: brier_of(y, probs), False),
}
