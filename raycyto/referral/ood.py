"""Out-of-distribution guard on backbone features: class-conditional Mahalanobis distance.

Lee et al. 2018 ("A simple unified framework for detecting out-of-distribution samples"):
fit one mean per class and one shared covariance on the training features; the OOD score
of an input is its smallest Mahalanobis distance to a class mean. Here:

- PCA first (``pca_dim``, default 128): backbone features are wide (D = 1280 for
  EfficientNet-Lite) and training sets small, so the covariance lives in the top
  principal subspace (orthonormal basis V [D, K]), estimated with Ledoit-Wolf shrinkage
  (``sklearn.covariance.LedoitWolf``) on class-centred coordinates.
- What PCA drops is not ignored: ``residual=True`` adds ``||x - mu - V V^T (x - mu)||^2 /
  sigma^2`` with sigma^2 the mean training variance per discarded dimension (the
  probabilistic-PCA covariance ``V L V^T + sigma^2 (I - V V^T)``). An image unlike the
  training set often differs exactly there.
- The threshold is calibrated on held-out in-distribution (validation) features at a
  stated false-alarm rate: the ``ceil((n + 1) (1 - rate))``-th smallest validation score,
  so a new in-distribution input is flagged with probability <= rate (exchangeability).

Storage (:meth:`MahalanobisGuard.arrays`, float32): mean [D], basis [D, K], whitener
[K, K] (Cholesky factor of the precision), class_means [C, K]: for D = 1280, K = 128
about 0.7 MB instead of 6.5 MB for a full [D, D] precision. :meth:`meta` is plain JSON.

:func:`energy_score` (Liu et al. 2020) is the alternative on a head's logits; it needs
real logits (stored probabilities give a constant energy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raycyto.errors import RaycytoError

ARRAY_NAMES = ("mean", "basis", "whitener", "class_means")


def conformal_upper_threshold(scores: np.ndarray, false_alarm_rate: float) -> float:
    """The ``ceil((n + 1) (1 - rate))``-th smallest score (``inf`` if that exceeds n)."""
    if not 0 < false_alarm_rate < 1:
        raise RaycytoError(f"false alarm rate {false_alarm_rate}: must be in (0, 1), e.g. 0.05")
    s = np.sort(np.asarray(scores, dtype=float))
    k = math.ceil((len(s) + 1) * (1 - false_alarm_rate) - 1e-9)
    return float(s[k - 1]) if 1 <= k <= len(s) else math.inf


def energy_score(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Energy ``-T logsumexp(logits / T)`` [N]: higher = more out-of-distribution."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    zmax = z.max(axis=1, keepdims=True)
    return -temperature * (np.log(np.exp(z - zmax).sum(axis=1)) + zmax[:, 0])


def ood_auroc(scores_in: np.ndarray, scores_out: np.ndarray) -> float:
    """AUROC of telling shifted inputs (positive) from in-distribution ones by the score."""
    from sklearn.metrics import roc_auc_score

    s_in, s_out = np.asarray(scores_in, float), np.asarray(scores_out, float)
    y = np.r_[np.zeros(len(s_in)), np.ones(len(s_out))]
    return float(roc_auc_score(y, np.r_[s_in, s_out]))


@dataclass
class MahalanobisGuard:
    """Class-conditional Mahalanobis OOD score in a PCA subspace (+ residual term).

    Attributes:
        mean: [D] training feature mean.
        basis: [D, K] orthonormal PCA basis.
        whitener: [K, K] L with L L^T = shared precision (in PCA coordinates).
        class_means: [C, K] means of the classes present in training, in PCA coordinates.
        residual_var: sigma^2 per discarded dimension (0: residual term off).
        normalize: features are L2-normalised before everything.
        threshold: flag when score > threshold (inf until :meth:`calibrate`).
        false_alarm_rate: the rate the threshold was calibrated for.
        n_train, n_calibration: cases used.
    """

    mean: np.ndarray
    basis: np.ndarray
    whitener: np.ndarray
    class_means: np.ndarray
    residual_var: float = 0.0
    normalize: bool = False
    threshold: float = math.inf
    false_alarm_rate: float = float("nan")
    n_train: int = 0
    n_calibration: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def _prep(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise RaycytoError(f"features must be [N, {self.dim}]; got shape {x.shape}")
        if self.normalize:
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return x

    def score(self, features: np.ndarray) -> np.ndarray:
        """OOD score [N] (higher = further from every training class).

        Args:
            features: [N, D] backbone features.
        """
        x = self._prep(features) - self.mean                     # [N, D]
        z = x @ self.basis                                        # [N, K]
        w = z @ self.whitener                                     # [N, K]
        wm = self.class_means @ self.whitener                     # [C, K]
        d = ((w[:, None, :] - wm[None, :, :]) ** 2).sum(-1)        # [N, C]
        s = d.min(axis=1)
        if self.residual_var > 0:
            r2 = np.maximum((x ** 2).sum(1) - (z ** 2).sum(1), 0.0)
            s = s + r2 / self.residual_var
        return s

    def calibrate(self, features: np.ndarray, false_alarm_rate: float = 0.05) -> "MahalanobisGuard":
        """Set the threshold on held-out in-distribution features (validation).

        Args:
            features: [N, D]; false_alarm_rate: share of in-distribution inputs flagged.

        Returns:
            self.
        """
        self.threshold = conformal_upper_threshold(self.score(features), false_alarm_rate)
        self.false_alarm_rate = float(false_alarm_rate)
        self.n_calibration = int(len(features))
        return self

    def is_ood(self, features: np.ndarray) -> np.ndarray:
        """[N] bool: score above the calibrated threshold."""
        return self.score(features) > self.threshold

    def arrays(self) -> dict[str, np.ndarray]:
        """The float32 arrays to store (see module docstring for shapes)."""
        return {k: np.ascontiguousarray(getattr(self, k), dtype=np.float32) for k in ARRAY_NAMES}

    def meta(self) -> dict[str, Any]:
        """Plain-JSON settings (threshold ``None`` when not calibrated)."""
        return {"method": "mahalanobis", "version": 1, "dim": self.dim,
                "pca_dim": int(self.basis.shape[1]), "num_classes": int(self.class_means.shape[0]),
                "residual_var": float(self.residual_var), "normalize": self.normalize,
                "threshold": None if math.isinf(self.threshold) else float(self.threshold),
                "false_alarm_rate": None if math.isnan(self.false_alarm_rate)
                else self.false_alarm_rate,
                "n_train": self.n_train, "n_calibration": self.n_calibration, **self.extra}

    @classmethod
    def from_parts(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> "MahalanobisGuard":
        """Inverse of (:meth:`meta`, :meth:`arrays`)."""
        if meta.get("method") != "mahalanobis":
            raise RaycytoError(f"not a Mahalanobis guard: method={meta.get('method')!r}")
        known = {"method", "version", "dim", "pca_dim", "num_classes", "residual_var", "normalize",
                 "threshold", "false_alarm_rate", "n_train", "n_calibration"}
        guard = cls(**{k: np.asarray(arrays[k], dtype=np.float64) for k in ARRAY_NAMES},
                    residual_var=float(meta["residual_var"]), normalize=bool(meta["normalize"]),
                    threshold=math.inf if meta["threshold"] is None else float(meta["threshold"]),
                    false_alarm_rate=float("nan") if meta["false_alarm_rate"] is None
                    else float(meta["false_alarm_rate"]),
                    n_train=int(meta["n_train"]), n_calibration=int(meta["n_calibration"]),
                    extra={k: v for k, v in meta.items() if k not in known})
        if guard.dim != meta["dim"] or guard.basis.shape[1] != meta["pca_dim"]:
            raise RaycytoError("Mahalanobis guard arrays do not match their meta (dim / pca_dim)")
        return guard

    def save(self, path: str | Path) -> Path:
        """Write one ``.npz`` (arrays + meta as JSON text); load with :meth:`load`."""
        import json

        path = Path(path)
        np.savez(path, meta=np.array(json.dumps(self.meta())), **self.arrays())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "MahalanobisGuard":
        """Read a file written by :meth:`save` (no pickle)."""
        import json

        with np.load(Path(path), allow_pickle=False) as f:
            return cls.from_parts(json.loads(str(f["meta"])), {k: f[k] for k in ARRAY_NAMES})


def fit_mahalanobis(features: np.ndarray, labels: np.ndarray, pca_dim: int = 128,
                    residual: bool = True, normalize: bool = False) -> MahalanobisGuard:
    """Fit class means and a shared Ledoit-Wolf covariance on training features.

    Args:
        features: [N, D] training backbone features; labels: [N] classes 0..C-1.
        pca_dim: K, capped at min(D, N - 1); K = D keeps every dimension (no residual).
        residual: add the scaled distance to the PCA subspace.
        normalize: L2-normalise features first.

    Returns:
        MahalanobisGuard (threshold inf until :meth:`MahalanobisGuard.calibrate`).
    """
    from sklearn.covariance import LedoitWolf

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=int)
    if x.ndim != 2 or len(x) != len(y) or len(x) < 3:
        raise RaycytoError(f"features must be [N, D] with N >= 3 matching {len(y)} labels; "
                           f"got {x.shape}")
    if normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n, d = x.shape
    classes = np.unique(y)                                        # absent classes get no mean
    mean = x.mean(0)
    xc = x - mean
    k = int(min(pca_dim, d, n - 1))
    if k >= d:
        basis = np.eye(d)
    else:
        _, _, vt = np.linalg.svd(xc, full_matrices=False)
        basis = vt[:k].T                                          # [D, K]
    z = xc @ basis                                                # [N, K]
    class_means = np.stack([z[y == k].mean(0) for k in classes])      # [C, K]
    within = z - class_means[np.searchsorted(classes, y)]             # [N, K]
    cov = LedoitWolf(assume_centered=True).fit(within).covariance_
    whitener = np.linalg.cholesky(np.linalg.inv(cov))            # [K, K]
    residual_var = 0.0
    if residual and basis.shape[1] < d:
        r2 = np.maximum((xc ** 2).sum(1) - (z ** 2).sum(1), 0.0)
        residual_var = float(r2.mean() / (d - basis.shape[1]))
        residual_var = residual_var if residual_var > 0 else 0.0
    return MahalanobisGuard(mean, basis, whitener, class_means, residual_var, normalize,
                            n_train=n)
