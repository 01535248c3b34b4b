"""Split-conformal prediction sets (LAC and APS), calibrated on validation predictions only.

A prediction set is the list of classes the model cannot rule out at a stated level: with
calibration and test cases exchangeable, the set holds the true class for at least
``level`` of the cases (Vovk et al. 2005; Angelopoulos & Bates 2021, "A gentle
introduction to conformal prediction").

Scores (a larger score = a less plausible label), for probabilities ``p`` ``[C]``:

- ``lac`` (least ambiguous set-valued classifier, Sadinle et al. 2019): ``s(x, y) = 1 - p_y``;
  the set is ``{k : 1 - p_k <= q_k}``. Smallest sets on average.
- ``aps`` (adaptive prediction sets, Romano et al. 2020): ``s(x, y) = above_y + u p_y`` with
  ``above_y`` the probability mass of the classes more probable than ``y`` and ``u`` uniform on
  [0, 1]. Randomized (the default of :func:`calibrate_conformal`): one ``u`` per image, drawn
  from the SHA-256 of the image's bytes (:func:`image_uniform`), for calibration and
  prediction alike; the set is ``{k : above_k + u p_k <= q_k}``, so one image always gets the
  same set and coverage is ``level`` on average, not more (the set may then be empty: no class
  is plausible, and the ``set`` rule refers it). Non-randomized (``randomized=False``, bundles
  exported before this option): ``{k : above_k <= q_k}``, the last class always enters (MAPIE
  1.x ``include_last_label=True``), which covers 0.98-0.99 at a 0.90 level on these tasks.

The threshold ``q`` is the ``ceil((n + 1) * level)``-th smallest calibration score (the
split-conformal order statistic, as ``mapie.utils._compute_classification_quantile``);
when ``ceil((n + 1) * level) > n`` it is infinite: too few calibration cases for that
level, every class is in the set. With ``mondrian=True`` each class k gets its own
threshold from the calibration cases of class k, so coverage holds for each class
separately (e.g. the abnormal class), not only on average.

Why not MAPIE's ``SplitConformalClassifier`` itself: it wants an sklearn estimator (we hold
probability arrays, so it would need a dummy estimator), keeps its thresholds in private
attributes, has no class-conditional mode in 1.x, and a fitted object is a pickle, not
the plain JSON a model bundle stores and Serve applies to one image. The few lines below
follow the same definitions; ``tests/test_analysis_conformal.py`` checks them against MAPIE.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from raycyto.config import CONFORMAL_SCORES
from raycyto.errors import RaycytoError

SCORES = CONFORMAL_SCORES   # owned by raycyto.config (mc.conformal_score)
DEFAULT_LEVELS = (0.90, 0.95)


def _check_probs(probs: np.ndarray) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise RaycytoError(f"probabilities must be [N, C] with C >= 2; got shape {p.shape}")
    return p


def _check_levels(levels: Iterable[float]) -> tuple[float, ...]:
    out = tuple(float(v) for v in levels)
    bad = [v for v in out if not 0 < v < 1]
    if not out or bad:
        raise RaycytoError(f"conformal levels must be in (0, 1), e.g. 0.9; got {list(out)}")
    return out


def _check_scores(scores: Iterable[str]) -> tuple[str, ...]:
    out = tuple(scores)
    bad = [s for s in out if s not in SCORES]
    if not out or bad:
        raise RaycytoError(f"conformal score {bad or out} unknown; choose from {list(SCORES)}")
    return out


def image_uniform(data: bytes) -> float:
    """The APS randomisation of one image: a uniform on [0, 1) from the SHA-256 of its bytes
    (the same image always gets the same draw, and so the same prediction set)."""
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big") / 2.0 ** 64


def mass_above(probs: np.ndarray) -> np.ndarray:
    """Probability mass of the strictly more probable classes, per class.

    Args:
        probs: [N, C].

    Returns:
        [N, C]: ``above[i, k] = sum_j p[i, j] for p[i, j] > p[i, k]`` (ties do not count).
    """
    p = _check_probs(probs)
    order = np.argsort(-p, axis=1, kind="stable")            # [N, C] descending
    sorted_p = np.take_along_axis(p, order, axis=1)           # [N, C]
    before = np.cumsum(sorted_p, axis=1) - sorted_p           # mass of earlier positions
    # tied classes share the mass before the first of them
    first = np.maximum.accumulate(
        np.where(np.diff(sorted_p, axis=1, prepend=np.inf) != 0,
                 np.arange(p.shape[1])[None, :], 0), axis=1)  # [N, C] start of each tie run
    before = np.take_along_axis(before, first, axis=1)
    above = np.empty_like(p)
    np.put_along_axis(above, order, before, axis=1)
    return above


def conformity_scores(probs: np.ndarray, labels: np.ndarray, score: str,
                      u: np.ndarray | None = None) -> np.ndarray:
    """Calibration scores of the true labels (larger = less conforming).

    Args:
        probs: [N, C]; labels: [N] ints.
        score: ``"lac"`` or ``"aps"``.
        u: [N] uniforms for ``aps``: the score is ``above_y + u p_y``; None: ``u = 0``, the
            mass strictly above ``y`` (the non-randomized score that matches sets which always
            take the class crossing the threshold: ``y`` is in the set exactly when its score
            is within the threshold).

    Returns:
        [N] scores.
    """
    p = _check_probs(probs)
    y = np.asarray(labels, dtype=int)
    rows = np.arange(len(y))
    if score == "lac":
        return 1.0 - p[rows, y]
    if score == "aps":
        u = np.zeros(len(y)) if u is None else np.asarray(u, dtype=float)
        return mass_above(p)[rows, y] + u * p[rows, y]
    raise RaycytoError(f"conformal score {score!r} unknown; choose from {list(SCORES)}")


def inclusion_statistic(probs: np.ndarray, score: str, u: np.ndarray | None = None) -> np.ndarray:
    """The per-class statistic compared with the threshold: class k is in the set when
    ``stat[:, k] <= q_k``.

    Args:
        probs: [N, C].
        u: [N] uniforms (randomized APS: ``above_k + u p_k``); None: the mass above each class.

    Returns:
        [N, C]: ``1 - p`` for ``lac``; for ``aps`` the mass above each class, plus ``u p_k``
        when randomized.
    """
    p = _check_probs(probs)
    if score == "lac":
        return 1.0 - p
    if score == "aps":
        above = mass_above(p)
        return above if u is None else above + np.asarray(u, dtype=float)[:, None] * p
    raise RaycytoError(f"conformal score {score!r} unknown; choose from {list(SCORES)}")


def conformal_quantile(scores: np.ndarray, level: float) -> float:
    """The split-conformal threshold: the ``ceil((n + 1) * level)``-th smallest score.

    Args:
        scores: [n] calibration scores.
        level: target coverage in (0, 1).

    Returns:
        The threshold; ``inf`` when ``ceil((n + 1) * level) > n`` (too few cases).
    """
    s = np.sort(np.asarray(scores, dtype=float))
    n = len(s)
    k = math.ceil((n + 1) * level - 1e-9)   # guard 0.9 * 10 == 9.000000000000002
    return float(s[k - 1]) if 1 <= k <= n else math.inf


def _level_key(level: float) -> str:
    return f"{float(level):g}"


@dataclass(frozen=True)
class ConformalCalibration:
    """Thresholds of a calibrated split-conformal predictor; plain JSON via :meth:`to_json`.

    Attributes:
        num_classes: C.
        levels: calibrated coverage levels.
        scores: calibrated scores (``lac``, ``aps``).
        mondrian: one threshold per class (class-conditional coverage) when true.
        thresholds: ``{score: {level key: [C] thresholds}}``; all C equal unless mondrian;
            ``inf`` = too few calibration cases (that class is always in the set).
        n_calibration: calibration cases.
        class_counts: [C] calibration cases per class.
        randomized: APS sets are randomized by each image's own uniform (:func:`image_uniform`);
            False: the last class always enters (conservative; bundles from before the option).
    """

    num_classes: int
    levels: tuple[float, ...]
    scores: tuple[str, ...]
    mondrian: bool
    thresholds: dict[str, dict[str, list[float]]]
    n_calibration: int
    class_counts: list[int]
    randomized: bool = False
    source: str = field(default="", compare=False)

    def threshold(self, score: str, level: float) -> np.ndarray:
        """[C] thresholds for ``score`` at ``level``.

        Raises:
            RaycytoError: score or level not calibrated.
        """
        if score not in self.thresholds:
            raise RaycytoError(f"conformal score {score!r} not calibrated; "
                               f"have {list(self.scores)}")
        by_level = self.thresholds[score]
        key = _level_key(level)
        if key not in by_level:
            raise RaycytoError(f"conformal level {level} not calibrated; have {list(self.levels)}")
        return np.asarray(by_level[key], dtype=float)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON: thresholds as lists of floats, ``None`` for infinite ones."""
        return {
            "method": "split_conformal", "version": 1,
            "num_classes": self.num_classes, "levels": list(self.levels),
            "scores": list(self.scores), "mondrian": self.mondrian,
            "thresholds": {s: {k: [None if math.isinf(t) else float(t) for t in ts]
                               for k, ts in by_level.items()}
                           for s, by_level in self.thresholds.items()},
            "n_calibration": self.n_calibration, "class_counts": list(self.class_counts),
            "randomized": self.randomized, "source": self.source,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "ConformalCalibration":
        """Inverse of :meth:`to_json` (a model.json entry)."""
        if doc.get("method") != "split_conformal":
            raise RaycytoError(f"not a split-conformal calibration: method={doc.get('method')!r}")
        return cls(
            num_classes=int(doc["num_classes"]), levels=tuple(float(v) for v in doc["levels"]),
            scores=tuple(doc["scores"]), mondrian=bool(doc["mondrian"]),
            thresholds={s: {k: [math.inf if t is None else float(t) for t in ts]
                            for k, ts in by_level.items()}
                        for s, by_level in doc["thresholds"].items()},
            n_calibration=int(doc["n_calibration"]), class_counts=list(doc["class_counts"]),
            randomized=bool(doc.get("randomized", False)), source=str(doc.get("source", "")))


def calibrate_conformal(probs: np.ndarray, labels: np.ndarray,
                        levels: Sequence[float] = DEFAULT_LEVELS,
                        scores: Sequence[str] = SCORES, mondrian: bool = False,
                        u: np.ndarray | None = None, source: str = "") -> ConformalCalibration:
    """Calibrate split-conformal thresholds on held-out predictions: rows that took no part in
    training, early stopping, temperature fitting or selection (:mod:`raycyto.referral.fit`).

    Args:
        probs: [N, C] class probabilities of the calibration cases.
        labels: [N] true classes.
        levels: coverage levels, e.g. (0.9, 0.95).
        scores: among ``SCORES``.
        mondrian: per-class thresholds (class-conditional coverage).
        u: [N] the calibration images' uniforms (:func:`image_uniform`): randomized APS; None:
            the non-randomized, conservative APS.
        source: free text recorded with the thresholds (e.g. which probabilities).

    Returns:
        ConformalCalibration.
    """
    p = _check_probs(probs)
    y = np.asarray(labels, dtype=int)
    c = p.shape[1]
    if len(y) != len(p) or (len(y) and (y.min() < 0 or y.max() >= c)):
        raise RaycytoError(f"labels must be [N] ints in 0..{c - 1} for {len(p)} rows")
    levels, scores = _check_levels(levels), _check_scores(scores)
    if u is not None and len(np.asarray(u)) != len(y):
        raise RaycytoError(f"u must hold one uniform per calibration row ({len(y)}); got {len(np.asarray(u))}")
    thresholds: dict[str, dict[str, list[float]]] = {}
    for score in scores:
        s = conformity_scores(p, y, score, u if score == "aps" else None)   # [N]
        thresholds[score] = {}
        for level in levels:
            if mondrian:
                ts = [conformal_quantile(s[y == k], level) for k in range(c)]
            else:
                ts = [conformal_quantile(s, level)] * c
            thresholds[score][_level_key(level)] = ts
    return ConformalCalibration(c, levels, scores, mondrian, thresholds, len(y),
                                np.bincount(y, minlength=c).tolist(), u is not None, source)


def prediction_sets(probs: np.ndarray, calibration: ConformalCalibration, score: str = "lac",
                    level: float = 0.9, u: np.ndarray | None = None) -> np.ndarray:
    """Prediction sets as a membership mask.

    Args:
        probs: [N, C] probabilities (the same kind the calibration used).
        calibration: from :func:`calibrate_conformal` (or ``from_json``).
        score, level: which calibrated threshold to apply.
        u: [N] the images' uniforms (:func:`image_uniform`); required for randomized APS.

    Returns:
        [N, C] bool, True where the class is in the set.
    """
    p = _check_probs(probs)
    if p.shape[1] != calibration.num_classes:
        raise RaycytoError(f"probabilities have {p.shape[1]} classes, the calibration "
                           f"{calibration.num_classes}")
    q = calibration.threshold(score, level)                   # [C]
    randomized = score == "aps" and calibration.randomized
    if randomized and u is None:
        raise RaycytoError("randomized APS sets need each image's uniform (image_uniform of its bytes)")
    return inclusion_statistic(p, score, u if randomized else None) <= q[None, :]


def prediction_set(probs: Sequence[float], calibration: ConformalCalibration,
                   score: str = "lac", level: float = 0.9, u: float | None = None) -> list[int]:
    """The prediction set of one image (what Serve returns).

    Args:
        probs: [C] probabilities of one image.
        u: the image's uniform (:func:`image_uniform` of its bytes; randomized APS).

    Returns:
        Class indices in the set, most probable first (empty: no class is plausible).
    """
    p = np.asarray(probs, dtype=np.float64)[None, :]
    member = prediction_sets(p, calibration, score, level, None if u is None else np.array([u]))[0]
    return [int(k) for k in np.argsort(-p[0], kind="stable") if member[k]]


def set_metrics(sets: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Coverage and size of prediction sets.

    Args:
        sets: [N, C] bool membership; labels: [N].

    Returns:
        coverage, set_size_mean, singleton_rate, empty_rate, n, and ``coverage_class<k>``
        (coverage among the cases of class k; NaN when absent).
    """
    sets = np.asarray(sets, dtype=bool)
    y = np.asarray(labels, dtype=int)
    n = len(y)
    if n == 0:
        nan = float("nan")
        return {"coverage": nan, "set_size_mean": nan, "singleton_rate": nan, "empty_rate": nan,
                "n": 0, **{f"coverage_class{k}": nan for k in range(sets.shape[1])}}
    covered = sets[np.arange(n), y]
    size = sets.sum(axis=1)
    out = {"coverage": float(covered.mean()), "set_size_mean": float(size.mean()),
           "singleton_rate": float(np.mean(size == 1)), "empty_rate": float(np.mean(size == 0)),
           "n": n}
    for k in range(sets.shape[1]):
        of_k = covered[y == k]
        out[f"coverage_class{k}"] = float(of_k.mean()) if len(of_k) else float("nan")
    return out


def conformal_folds(predictions: pd.DataFrame, prob_columns: Sequence[str],
                    levels: Sequence[float] = DEFAULT_LEVELS, scores: Sequence[str] = SCORES,
                    mondrian: bool = False, by: Sequence[str] = ("trial_id",),
                    u_column: str | None = "u") -> pd.DataFrame:
    """Cross-fitted sets: for each fold k of each group, calibrate on the *other* folds' test
    rows (out-of-fold predictions: each by the model that never trained, stopped or was
    chosen on it) and measure on fold k's test rows. Validation rows are never read.

    Args:
        predictions: predictions.parquet rows: ``by`` columns, fold, split, label, prob columns,
            and ``u_column`` (each image's uniform; absent or None: non-randomized APS).
        prob_columns: the C probability columns, in class order (``prob_*`` or ``mc_mean_*``).
        levels, scores, mondrian: as :func:`calibrate_conformal`.
        by: one model family per group (a trial: its K fold models).

    Returns:
        One row per (group, fold, score, level): the ``by`` columns, fold, score, level,
        n_calibration, threshold (class 0's; all classes' in ``thresholds``), coverage,
        set_size_mean, singleton_rate, empty_rate, n (test cases), coverage_class<k>.
    """
    cols = list(prob_columns)
    rows = []
    oof = predictions[predictions["split"] == "test"]
    has_u = u_column is not None and u_column in oof.columns
    for key, g in oof.groupby(list(by), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        for fold in sorted(g["fold"].unique()):
            cal_rows, test = g[g["fold"] != fold], g[g["fold"] == fold]
            if cal_rows.empty or test.empty:
                continue
            cal = calibrate_conformal(cal_rows[cols].to_numpy(dtype=float), cal_rows["label"].to_numpy(),
                                      levels, scores, mondrian,
                                      cal_rows[u_column].to_numpy(dtype=float) if has_u else None)
            p_test = test[cols].to_numpy(dtype=float)
            u_test = test[u_column].to_numpy(dtype=float) if has_u else None
            for score in cal.scores:
                for level in cal.levels:
                    q = cal.threshold(score, level)
                    sets = prediction_sets(p_test, cal, score, level, u_test)
                    rows.append({**dict(zip(by, key)), "fold": int(fold), "score": score, "level": level,
                                 "n_calibration": cal.n_calibration, "threshold": float(q[0]),
                                 "thresholds": [float(t) for t in q],
                                 **set_metrics(sets, test["label"].to_numpy())})
    return pd.DataFrame(rows)


def conformal_summary(folds: pd.DataFrame, by: Sequence[str] = ("trial_id",)) -> pd.DataFrame:
    """Fold means of :func:`conformal_folds` per (``by``, score, level): the conformal.csv shape.

    Args:
        folds: output of :func:`conformal_folds`.
        by: grouping columns besides score and level (e.g. trial_id, or config after a merge).

    Returns:
        ``by`` columns, level, score, coverage_mean, coverage_std (sample std over folds),
        set_size_mean, singleton_rate, empty_rate, coverage_class<k>_mean, folds.
    """
    keys = [*by, "level", "score"]
    class_cols = sorted(c for c in folds.columns if c.startswith("coverage_class"))
    if folds.empty:
        return pd.DataFrame(columns=[*keys, "coverage_mean", "coverage_std", "set_size_mean",
                                     "singleton_rate", "empty_rate",
                                     *[f"{c}_mean" for c in class_cols], "folds"])
    g = folds.groupby(keys, sort=True)
    out = g.agg(coverage_mean=("coverage", "mean"), coverage_std=("coverage", "std"),
                set_size_mean=("set_size_mean", "mean"), singleton_rate=("singleton_rate", "mean"),
                empty_rate=("empty_rate", "mean"), folds=("coverage", "size"))
    for c in class_cols:
        out[f"{c}_mean"] = g[c].mean()
    cols = [c for c in out.columns if c != "folds"] + ["folds"]
    return out[cols].reset_index()
