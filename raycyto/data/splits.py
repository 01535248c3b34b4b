"""Leakage-proof splits: group-aware stratified k-fold with a grouped inner validation split.

All images of one group (patient, slide, source image) - and therefore every augmented
copy of them - land on one side of every split, by construction: both the outer folds and
the inner train/validation split are scikit-learn ``StratifiedGroupKFold`` splits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raycyto.errors import DataError


@dataclass(frozen=True)
class Split:
    """One outer fold; arrays are sorted indices into SourceTable.df (source images)."""

    fold: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def _group_codes(groups) -> np.ndarray:
    return np.unique(np.asarray(groups).astype(str), return_inverse=True)[1]  # [N] int


def _inner_split(labels: np.ndarray, groups: np.ndarray, idx: np.ndarray, val_fraction: float,
                 seed: int, fold: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import StratifiedGroupKFold

    if val_fraction <= 0:
        return idx, idx[:0]
    n_groups = len(np.unique(groups[idx]))
    n_splits = min(max(2, round(1 / val_fraction)), n_groups)
    if n_splits < 2:
        raise DataError(f"fold {fold}: the training side holds {n_groups} group(s); "
                        "need at least 2 for a validation split (add groups or set cv.val_fraction=0)")
    inner = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed + 1000 + fold)
    tr, va = next(inner.split(idx, labels[idx], groups[idx]))
    return np.sort(idx[tr]), np.sort(idx[va])


def kfold_splits(labels, groups, k: int = 5, val_fraction: float = 0.2, seed: int = 0) -> list[Split]:
    """Stratified group k-fold (outer) with a grouped stratified train/val split inside each fold.

    Args:
        labels: [N] int class per source image.
        groups: [N] group id per source image (patient / slide / the path itself).
        k: number of outer folds (test = 1/k of the groups).
        val_fraction: share of the training groups held out for validation (0 = none);
            the inner split is one fold of a StratifiedGroupKFold with round(1/val_fraction) folds.
        seed: shuffling seed; the same seed gives the same splits.
    Returns:
        k Splits with disjoint groups between train, val and test.
    Raises:
        DataError: fewer groups than folds, k < 2, or val_fraction outside [0, 1).
    """
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    labels = np.asarray(labels)
    codes = _group_codes(groups)
    if len(labels) != len(codes):
        raise DataError(f"labels ({len(labels)}) and groups ({len(codes)}) differ in length")
    if k < 2:
        raise DataError(f"cv.folds={k}: need at least 2 folds")
    if not 0 <= val_fraction < 1:
        raise DataError(f"cv.val_fraction={val_fraction}: must be in [0, 1)")
    n_groups = len(np.unique(codes))
    if n_groups < k:
        raise DataError(f"only {n_groups} groups for {k} folds: every fold needs at least one group "
                        "(lower cv.folds or add patients/images)")
    outer = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    idx = np.arange(len(labels))
    splits = []
    with warnings.catch_warnings():
        # "The least populated class has only n members": expected on tiny sets, not an error.
        warnings.filterwarnings("ignore", message=".*least populated class.*")
        for fold, (train_val, test) in enumerate(outer.split(idx, labels, codes)):
            train, val = _inner_split(labels, codes, train_val, val_fraction, seed, fold)
            splits.append(Split(fold=fold, train=train, val=val, test=np.sort(test)))
    return splits


def equalize(indices, labels, seed: int) -> np.ndarray:
    """Truncate every class to the size of the smallest one (study B), choosing at random.

    Args:
        indices: [M] row indices to balance (e.g. a fold's training rows).
        labels: [N] labels of all rows (indexed by ``indices``).
        seed: which rows are kept.
    Returns:
        [K * min_count] sorted indices, min_count images of each class present.
    """
    indices = np.asarray(indices)
    lab = np.asarray(labels)[indices]
    classes, counts = np.unique(lab, return_counts=True)
    if len(classes) == 0:
        return indices[:0]
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(indices[lab == c])[: counts.min()] for c in classes]
    return np.sort(np.concatenate(keep))


def class_weights(labels, num_classes: int) -> np.ndarray:
    """'Balanced' class weights n / (C * n_c) as scikit-learn; 0 for an absent class.

    Returns:
        [num_classes] float32.
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    w = np.zeros(num_classes)
    w[counts > 0] = counts.sum() / (num_classes * counts[counts > 0])
    return w.astype(np.float32)
