"""Temperature scaling (Guo et al. 2017) fitted on validation predictions, with ECE before/after.

One scalar T > 0 divides the logits: ``softmax(z / T)``. T > 1 softens an overconfident
model, T < 1 sharpens an underconfident one; the argmax never changes. T minimises the
negative log-likelihood of the validation labels (a 1-D bounded search on log T with
``scipy.optimize.minimize_scalar``).

Logits: our heads output logits but predictions.parquet stores probabilities.
``log(p)`` equals the logits up to a per-row constant, which softmax ignores, so
``softmax(log(p) / T)`` is exactly the temperature-scaled softmax (head "b" returns
log-probabilities already). Probabilities are clipped at ``EPS`` before the log.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from raycyto.analysis.uncertainty import expected_calibration_error, top_label
from raycyto.errors import RaycytoError

EPS = 1e-12
LOG_T_BOUNDS = (math.log(0.05), math.log(20.0))


def logits_from_probs(probs: np.ndarray) -> np.ndarray:
    """log-probabilities [N, C]: valid logits up to a per-row constant."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), EPS, 1.0))


def scaled_softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(logits / T)`` [N, C], numerically stable."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / T)``."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    y = np.asarray(labels, dtype=int)
    zmax = z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z - zmax).sum(axis=1)) + zmax[:, 0]
    return float(np.mean(lse - z[np.arange(len(y)), y])) if len(y) else float("nan")


@dataclass(frozen=True)
class TemperatureScaling:
    """A fitted temperature and what it does on the data it was fitted on.

    Attributes:
        temperature: T (> 0); 1.0 = unchanged.
        nll_before, nll_after: mean NLL at T = 1 and at T.
        ece_before, ece_after: top-label ECE (uniform 10 bins) at T = 1 and at T.
        n: cases it was fitted on.
    """

    temperature: float
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    n: int

    def apply_probs(self, probs: np.ndarray) -> np.ndarray:
        """Temperature-scaled probabilities [N, C] from probabilities [N, C]."""
        return scaled_softmax(logits_from_probs(probs), self.temperature)

    def apply_logits(self, logits: np.ndarray) -> np.ndarray:
        """Temperature-scaled probabilities [N, C] from logits [N, C]."""
        return scaled_softmax(logits, self.temperature)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (NaN -> None)."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v)
                for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "TemperatureScaling":
        return cls(**{k: (float("nan") if v is None else v) for k, v in doc.items()})


def _ece(probs: np.ndarray, labels: np.ndarray) -> float:
    correct, conf = top_label(probs, labels)
    return expected_calibration_error(correct, conf)


def fit_temperature(labels: np.ndarray, probs: np.ndarray | None = None,
                    logits: np.ndarray | None = None) -> TemperatureScaling:
    """Fit T on validation predictions by minimising NLL.

    Args:
        labels: [N] true classes.
        probs: [N, C] probabilities (their logs are used as logits), or
        logits: [N, C] logits.

    Returns:
        TemperatureScaling (T = 1 and NaN scores when there are no cases).
    """
    from scipy.optimize import minimize_scalar

    if (probs is None) == (logits is None):
        raise RaycytoError("fit_temperature needs exactly one of probs or logits")
    z = logits_from_probs(probs) if probs is not None else np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=int)
    if z.ndim != 2 or len(z) != len(y):
        raise RaycytoError(f"logits/probs must be [N, C] for {len(y)} labels; got {z.shape}")
    if len(y) == 0:
        nan = float("nan")
        return TemperatureScaling(1.0, nan, nan, nan, nan, 0)
    res = minimize_scalar(lambda log_t: nll(z, y, math.exp(log_t)), bounds=LOG_T_BOUNDS,
                          method="bounded", options={"xatol": 1e-6})
    t = float(math.exp(res.x))
    if nll(z, y, t) > nll(z, y, 1.0):        # never worse than leaving it alone
        t = 1.0
    return TemperatureScaling(t, nll(z, y, 1.0), nll(z, y, t), _ece(scaled_softmax(z, 1.0), y),
                              _ece(scaled_softmax(z, t), y), len(y))
