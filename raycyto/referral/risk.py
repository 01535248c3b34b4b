"""Risk-controlled referral for binary tasks: a confidence threshold with a recall guarantee.

A case is kept (decided by the model) when its confidence is ``>= threshold`` and referred
to a human otherwise. We want: among the positive (e.g. abnormal) cases that are kept,
the share the model calls positive -- recall on kept cases -- is at least ``target``,
and we want that to hold with probability ``1 - delta`` over the draw of the calibration
cases the threshold was chosen on.

Learn-then-Test (Angelopoulos, Bates, Candès, Jordan & Lei 2021), as MAPIE's
``BinaryClassificationController``: for every threshold ``t`` of a grid fixed in advance,
test H_t "miss rate among kept positives > 1 - target" with the binomial
Hoeffding-Bentkus p-value of the misses among the kept positives (LTT section 3.2;
MAPIE's ``compute_hoeffding_bentkus_p_value(..., binary=True)``), then control the
family-wise error with fixed-sequence testing (``mapie.risk_control.control_fwer``) from
the strictest threshold (most referral) down: every threshold reached before the first
non-rejection is certified, and we use the loosest of them (least referral). The
guarantee therefore covers the threshold actually used, not only the empirical recall.

The p-value is computed here from integer counts: MAPIE's takes the risk as a float and
rounds ``ceil(n * risk)``, which for e.g. 7 misses in 140 gives 8 (0.05 * 140 =
7.000000000000001), one count too conservative; otherwise the two agree (tested).

Why not the controller object itself: it thresholds ``predict_proba`` into a label and
has no third outcome, "refer"; a custom multi-dimensional ``predict_function`` returning
NaN for referred cases works (a test uses it to check our p-values) but MAPIE then
refuses fixed-sequence testing and picks the direction of the sequence from the data.
Here the order is fixed in advance, which is what fixed-sequence testing needs.

The strictest thresholds must keep some positives, or the sequence stops at once: the
default grid suits the MC vote confidence (T passes give k/T, and 1.0 = unanimous is
common). For a continuous score (max softmax) pass a grid whose first threshold keeps
cases, or ``n_starts > 1`` (multi-start fixed sequence, Bauer 1991: delta split evenly
over equally spaced starts; MAPIE's ``FWERFixedSequenceTesting``).

Recall among kept positives >= target implies that at most ``1 - target`` of *all*
positives are kept and called negative (kept positives are a subset of all positives).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from raycyto.errors import RaycytoError

DEFAULT_GRID = np.round(np.linspace(1.0, 0.0, 101), 10)   # descending, fixed in advance


@dataclass(frozen=True)
class RecallGuarantee:
    """A referral threshold and the guarantee that comes with it.

    Attributes:
        target: recall to guarantee among kept positive cases.
        delta: allowed probability that the guarantee fails (confidence = 1 - delta).
        threshold: keep a case when confidence >= threshold; NaN when no threshold of the
            grid is certified (then every case is referred).
        positive: the positive class index.
        referral_rate, recall_kept: at the threshold, on the calibration cases (out-of-fold rows, :mod:`raycyto.referral.fit`).
        n, n_positive, n_positive_kept: calibration cases, positives, positives kept.
        p_value: p-value of the chosen threshold (of the first tested one if none).
        method: how it was chosen.
        n_starts: fixed-sequence starts.
    """

    target: float
    delta: float
    threshold: float
    positive: int
    referral_rate: float
    recall_kept: float
    n: int
    n_positive: int
    n_positive_kept: int
    p_value: float
    method: str = "learn-then-test, binomial Hoeffding-Bentkus p-values, fixed-sequence"
    n_starts: int = 1

    @property
    def certified(self) -> bool:
        """True when a threshold reaches the target with the stated confidence."""
        return not math.isnan(self.threshold)

    def statement(self, positive_name: str = "positive") -> str:
        """The guarantee in one sentence."""
        conf = f"{1 - self.delta:.0%}"
        if not self.certified:
            return (f"No threshold guarantees {positive_name} recall >= {self.target:.0%} among "
                    f"non-referred cases with {conf} confidence on these {self.n} calibration "
                    f"cases ({self.n_positive} {positive_name}): refer every case, or lower "
                    "the target.")
        return (f"Among cases not referred (confidence >= {self.threshold:g}), {positive_name} "
                f"recall is >= {self.target:.0%} with {conf} confidence (learn-then-test on "
                f"{self.n} calibration cases, {self.n_positive} {positive_name}); "
                f"{self.referral_rate:.0%} of calibration cases were referred.")

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (threshold ``None`` when not certified)."""
        d = asdict(self)
        d["threshold"] = None if not self.certified else float(self.threshold)
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "RecallGuarantee":
        """Inverse of :meth:`to_json`."""
        nan = float("nan")
        return cls(**{k: (nan if v is None and k not in ("positive", "method", "n_starts") else v)
                      for k, v in doc.items()})


def binomial_hb_p_value(misses: np.ndarray, n: np.ndarray, alpha: float) -> np.ndarray:
    """Hoeffding-Bentkus p-value of H: "miss rate > alpha" for a binary loss (LTT 3.2).

    Args:
        misses: [G] observed misses; n: [G] trials (> 0); alpha: the tolerated miss rate.

    Returns:
        [G] ``min(exp(-n h(min(r, alpha), alpha)), P(Binom(n, alpha) <= misses))`` with
        ``r = misses / n`` and ``h(a, b) = a log(a/b) + (1-a) log((1-a)/(1-b))``.
    """
    from scipy.stats import binom

    misses = np.asarray(misses, dtype=float)
    n = np.asarray(n, dtype=float)
    r = np.minimum(misses / np.maximum(n, 1), alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = np.where(r > 0, r * np.log(r / alpha), 0.0) + (1 - r) * np.log((1 - r) / (1 - alpha))
    return np.minimum(np.exp(-n * h), binom.cdf(misses, n, alpha))


def recall_tests(y_true: np.ndarray, y_pred: np.ndarray, confidence: np.ndarray, positive: int,
                 target: float, grid: Sequence[float] = DEFAULT_GRID) -> dict[str, np.ndarray]:
    """Per threshold of the grid: kept positives, misses among them, and the p-value of
    H_t "recall among kept positives < target".

    Args:
        y_true, y_pred: [N] class indices; confidence: [N] (kept when >= threshold).
        positive: positive class; target: recall in (0, 1).
        grid: [G] thresholds in testing order.

    Returns:
        dict of [G] arrays: threshold, n_positive_kept, misses, recall_kept (NaN when no
        positive is kept), referral_rate, p_value (1 when no positive is kept).
    """
    y = np.asarray(y_true) == positive                       # [N]
    called = np.asarray(y_pred) == positive                  # [N]
    conf = np.asarray(confidence, dtype=float)
    t = np.asarray(grid, dtype=float)                          # [G]
    kept = conf[None, :] >= t[:, None]                         # [G, N]
    n_pos = (kept & y).sum(1)                                  # [G]
    misses = (kept & y & ~called).sum(1)                       # [G]
    risk = misses / np.maximum(n_pos, 1)
    p = np.where(n_pos > 0, binomial_hb_p_value(misses, n_pos, 1.0 - target), 1.0)
    return {"threshold": t, "n_positive_kept": n_pos, "misses": misses,
            "recall_kept": np.where(n_pos > 0, 1.0 - risk, np.nan),
            "referral_rate": 1.0 - kept.mean(1) if len(conf) else np.full(len(t), np.nan),
            "p_value": p}


def risk_controlled_threshold(y_true: np.ndarray, y_pred: np.ndarray, confidence: np.ndarray,
                              positive: int, target: float = 0.95, delta: float = 0.1,
                              grid: Sequence[float] = DEFAULT_GRID,
                              n_starts: int = 1) -> RecallGuarantee:
    """The loosest threshold certified to keep positive-class recall among kept cases
    >= ``target`` with probability ``1 - delta`` (learn-then-test, fixed sequence).

    Args:
        y_true: [N] true classes of the calibration cases.
        y_pred: [N] the model's label (e.g. the MC vote).
        confidence: [N] the score thresholded (e.g. MC vote confidence, max softmax).
        positive: the positive class index.
        target: recall in (0, 1); delta: in (0, 1).
        grid: thresholds, tested in the given order (strictest first); fixed in advance.
        n_starts: fixed-sequence starts (delta split evenly over them).

    Returns:
        RecallGuarantee (threshold NaN when nothing is certified).
    """
    from mapie.risk_control import FWERFixedSequenceTesting, control_fwer

    if not 0 < target < 1:
        raise RaycytoError(f"target recall {target}: must be in (0, 1)")
    if not 0 < delta < 1:
        raise RaycytoError(f"delta {delta}: must be in (0, 1), e.g. 0.1 for 90% confidence")
    tests = recall_tests(y_true, y_pred, confidence, positive, target, grid)
    valid = control_fwer(tests["p_value"], delta,
                         fwer_method=FWERFixedSequenceTesting(n_starts=n_starts))
    n, n_positive = len(np.asarray(y_true)), int(np.sum(np.asarray(y_true) == positive))
    if len(valid) == 0:
        return RecallGuarantee(target, delta, float("nan"), positive, 1.0, float("nan"), n,
                               n_positive, 0, float(tests["p_value"][0]), n_starts=n_starts)
    # certified thresholds: keep the one that refers least, the loosest among equals (with
    # several starts the certified set need not be one prefix)
    valid = np.asarray(valid)
    i = int(valid[np.lexsort((tests["threshold"][valid], tests["referral_rate"][valid]))[0]])
    return RecallGuarantee(target, delta, float(tests["threshold"][i]), positive,
                           float(tests["referral_rate"][i]), float(tests["recall_kept"][i]), n,
                           n_positive, int(tests["n_positive_kept"][i]), float(tests["p_value"][i]),
                           n_starts=n_starts)


#: Recall targets searched for the highest certifiable one (fixed in advance).
CERTIFIABLE_TARGETS = tuple(np.round(np.arange(0.50, 0.995, 0.01), 2))


def certifiable_recall(y_true: np.ndarray, y_pred: np.ndarray, confidence: np.ndarray,
                       positive: int, delta: float = 0.1,
                       targets: Sequence[float] = CERTIFIABLE_TARGETS) -> RecallGuarantee | None:
    """The highest recall target of ``targets`` that learn-then-test certifies at ``delta``,
    with the loosest threshold that certifies it (None: not even the lowest target).

    When 0.95 cannot be certified, this says what can: e.g. "recall >= 0.91 with 90%
    confidence, referring 12%". Each target's statement holds at ``delta`` on its own.
    """
    best = None
    for target in sorted(float(t) for t in targets):
        g = risk_controlled_threshold(y_true, y_pred, confidence, positive, target, delta)
        if not g.certified:
            break   # a higher target only needs more: it cannot be certified either
        best = g
    return best
