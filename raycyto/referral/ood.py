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
- The threshold is calibrated on held-out in-distribution features at a stated false-alarm
  rate: the ``ceil((n + 1) (1 - rate))``-th smallest held-out score, so a new
  in-distribution input is flagged with probability <= rate (exchangeability).
- A shifted image of the model's own task (another lab's scanner: JPEG re-save, blur,
  contrast, a small rotation or rescale) is not out of distribution: the model still reads
  it, and a scanner change is the drift monitor's business (once per window), not a referral
  per image. Calibrated on the originals alone, the guard referred every such image (scores
  10-20x the threshold). :func:`calibrate_on_images` (what ``raycyto export`` runs, on the
  exported fold's test images) therefore scores each calibration image as the original and
  as copies from :mod:`raycyto.data.shift` (and the training augmentation when the model
  trained on copies) and takes the largest per-family threshold (:func:`set_threshold`):
  each family is flagged with probability <= rate, while other tasks' images, photographs
  and noise stay several times above it (``benchmarks/ood_guard.py``).

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
        # fewer training images than dimensions: the basis spans them and r2 is rounding
        # noise (1e-16), which would blow every new image's score up by 1e15; no residual then
        meaningful = r2.mean() > 1e-9 * max(float((xc ** 2).sum(1).mean()), 1e-300)
        residual_var = float(r2.mean() / (d - basis.shape[1])) if meaningful else 0.0
    return MahalanobisGuard(mean, basis, whitener, class_means, residual_var, normalize,
                            n_train=n)


# ----------------------------------------------------------------------------- images

GUARD_SHIFTS: tuple[str, ...] = ("scanner", "scanner")
"""Shift copies per calibration image (:data:`raycyto.data.shift.SHIFTS` families; a repeated
family gives independent draws). The ``scanner`` composite (rescale, rotation, blur, colour,
contrast, JPEG at once) scores above the single families: on the karyogram demo two scanner
copies and six single-family copies give the same threshold within noise (worst family flagged
0.054 / 0.050, margin to the closest other image 5.8x / 5.8x, ``benchmarks/ood_guard.py
--variants``) at a third of the embedding cost."""
GUARD_POLICY_COPIES = 1
"""Copies of the training augmentation policy per calibration image, when the sweep trained on
copies (``data.copies > 1``); none otherwise (the model never saw them)."""
GUARD_SEED = 0


def copy_family(name: str) -> str:
    """``"scanner#2" -> "scanner"``, ``"karyogram#1" -> "karyogram"``, ``"original" -> "original"``."""
    return name.split("#", 1)[0]


def pooled_conformal_threshold(scores: np.ndarray, false_alarm_rate: float) -> float:
    """Threshold from ``n`` calibration images with ``m`` copies each (scores ``[n, m]``).

    The ``ceil((1 - rate) (1 + 1/n) n m)``-th smallest of the pooled scores (``inf`` if that
    exceeds ``n m``): the average of the images' empirical CDFs reaches ``(1 - rate)(n + 1)/n``
    there, so with a new image's CDF added it still reaches ``1 - rate``, and by the images'
    exchangeability a new image, shown as a copy drawn uniformly from the same families, is
    flagged with probability <= rate (the pooled-CDF argument of Dunn, Wasserman & Ramdas
    2022). With ``m = 1`` this is :func:`conformal_upper_threshold`.
    """
    s = np.asarray(scores, dtype=float)
    s = s[:, None] if s.ndim == 1 else s
    if s.ndim != 2 or s.size == 0:
        raise RaycytoError(f"scores must be [n images, m copies]; got shape {s.shape}")
    if not 0 < false_alarm_rate < 1:
        raise RaycytoError(f"false alarm rate {false_alarm_rate}: must be in (0, 1), e.g. 0.05")
    n, m = s.shape
    k = math.ceil((1 - false_alarm_rate) * (n + 1) * m - 1e-9)
    flat = np.sort(s.ravel())
    return float(flat[k - 1]) if 1 <= k <= n * m else math.inf


def family_thresholds(scores: np.ndarray, names: list[str], false_alarm_rate: float) -> dict[str, float]:
    """Per copy family (:func:`copy_family` of ``names``), the pooled conformal threshold of its
    columns of ``scores`` ``[n, m]``. Their maximum flags a new image shown under *any* one of
    the families with probability <= rate (each family's own guarantee; a higher threshold
    only flags less)."""
    s = np.asarray(scores, dtype=float)
    if s.ndim != 2 or s.shape[1] != len(names):
        raise RaycytoError(f"scores must be [n images, {len(names)} copies]; got shape {s.shape}")
    fams = list(dict.fromkeys(copy_family(c) for c in names))
    return {f: pooled_conformal_threshold(s[:, [copy_family(c) == f for c in names]], false_alarm_rate)
            for f in fams}


def pooled_image_features(model: Any, meta: dict, images: list[np.ndarray], batch: int = 16) -> np.ndarray:
    """Pooled backbone features ``[N, D]`` of decoded images, exactly as Serve scores them.

    The bundle's preprocessing (:meth:`raycyto.models.preprocessing.Preprocess.from_bundle`),
    one deterministic backbone forward (``model.features``, eval mode) and spatial maps
    averaged over positions (:func:`raycyto.serve.predict.pooled_features`).

    Args:
        model: a loaded bundle's classifier; meta: its model.json; images: uint8 RGB ``[H, W, 3]``.
    """
    import torch

    from raycyto.models.preprocessing import Preprocess
    from raycyto.serve.predict import pooled_features

    pre = Preprocess.from_bundle(meta, model.spec)
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            feats = model.features(pre(images[i:i + batch]).to(device))
            out.append(pooled_features(feats.detach().cpu().numpy()))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def calibration_copies(images: list[np.ndarray], shifts: tuple[str, ...] = (), policy: str | None = None,
                       policy_copies: int = 0, seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """The copies a guard is calibrated on: per image, the original, ``policy_copies`` copies
    of the training augmentation ``policy`` (copy indices drawn in 1..32) and one copy per entry
    of ``shifts`` (:data:`raycyto.data.shift.SHIFTS`; a repeated family draws again);
    deterministic given ``seed`` and the pixels.

    Returns:
        ``(copies, names)``: ``len(images) * m`` images, image-major (image i's copies are
        ``copies[i*m:(i+1)*m]``), and the ``m`` copy names (``original``, ``karyogram#1``,
        ``scanner#1``, ``scanner#2``...).
    """
    from raycyto.data.augment import augment, copy_rng, image_key
    from raycyto.data.shift import get_shift, shifted_copy

    for name in shifts:
        get_shift(name)
    draws: list[tuple[str, int]] = []
    for name in shifts:
        draws.append((name, sum(1 for d in draws if d[0] == name) + 1))
    names = (["original"] + [f"{policy}#{c}" for c in range(1, policy_copies + 1)]
             + [f"{name}#{c}" for name, c in draws])
    out = []
    for img in images:
        key = image_key(img)
        out.append(img)
        for c in range(1, policy_copies + 1):  # a copy index drawn in 1..32 (the leukemia policy's
            index = int(copy_rng(seed, f"calibration\x00{key}", c).integers(1, 33))  # 33-copy cycle)
            out.append(augment(img, policy, seed, key, index))
        out += [shifted_copy(img, name, seed, copy=c, key=key) for name, c in draws]
    return out, names


def set_threshold(guard: MahalanobisGuard, scores: np.ndarray, names: list[str],
                  false_alarm_rate: float = 0.05, source: str = "images",
                  settings: dict[str, Any] | None = None) -> MahalanobisGuard:
    """Threshold ``guard`` at the largest per-family conformal threshold of calibration scores.

    Args:
        scores: ``[n images, m copies]`` guard scores; names: the ``m`` copy names
            (:func:`calibration_copies`).
        source: what the images are, for the record; settings: how the copies were made.

    Returns:
        ``guard``, changed in place: threshold (max of :func:`family_thresholds`, or the largest
        score when the images are too few for the rate: the rate recorded is then
        ``1 / (n + 1)``), false_alarm_rate, n_calibration (images), and in its meta
        ``calibrated_by`` (text) and ``calibration`` (images, copies, per-family thresholds).
    """
    s = np.asarray(scores, dtype=float)
    n = int(s.shape[0])
    per_family = family_thresholds(s, names, false_alarm_rate)
    threshold, achieved = max(per_family.values()), float(false_alarm_rate)
    if not math.isfinite(threshold):
        threshold, achieved = float(s.max()), 1.0 / (n + 1)
    guard.threshold, guard.false_alarm_rate, guard.n_calibration = float(threshold), achieved, n
    fams = ", ".join(f"{f} x{sum(copy_family(c) == f for c in names)}" for f in per_family)
    what = f"{n} {source}, each as {fams}: the largest per-family conformal threshold"
    guard.extra["calibrated_by"] = (what if achieved == false_alarm_rate else
                                    f"{what}; too few images for a {false_alarm_rate:g} false-alarm "
                                    f"rate: largest score, rate {achieved:.3g}")
    guard.extra["calibration"] = {
        "images": n, "copies_per_image": len(names), "copies": list(names), "source": source,
        "rule": "max over families of the pooled conformal threshold",
        "family_thresholds": {f: (None if math.isinf(t) else float(t)) for f, t in per_family.items()},
        **(settings or {})}
    return guard


def calibrate_on_images(guard: MahalanobisGuard, model: Any, meta: dict, images: list[np.ndarray],
                        false_alarm_rate: float = 0.05, shifts: tuple[str, ...] = GUARD_SHIFTS,
                        policy: str | None = None, policy_copies: int = 0, seed: int = GUARD_SEED,
                        source: str = "images") -> MahalanobisGuard:
    """Threshold ``guard`` on decoded in-distribution images and the copies the model tolerates.

    A mildly shifted image of the model's own task (another scanner) is not out of distribution:
    each image is scored as the original, ``policy_copies`` copies of the training augmentation
    ``policy`` and one copy per entry of ``shifts`` (:func:`calibration_copies`), through the
    bundle exactly as Serve scores it (:func:`pooled_image_features`), and the threshold is the
    largest per-family conformal threshold (:func:`set_threshold`): a new in-distribution image
    under any one of those families is flagged with probability <= ``false_alarm_rate``. The
    images must have chosen nothing (no training, early-stopping or selection image: the
    exported fold's test images).

    Returns:
        ``guard``, changed in place (see :func:`set_threshold`).
    """
    if len(images) < 2:
        raise RaycytoError(f"calibrating the guard needs at least 2 images; got {len(images)}")
    copies, names = calibration_copies(images, tuple(shifts), policy, policy_copies, seed)
    scores = guard.score(pooled_image_features(model, meta, copies)).reshape(len(images), len(names))
    return set_threshold(guard, scores, names, false_alarm_rate, source,
                         {"seed": int(seed), "shifts": list(shifts), "policy": policy,
                          "policy_copies": int(policy_copies)})
