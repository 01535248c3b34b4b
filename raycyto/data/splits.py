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
    # as many inner folds as 1/val_fraction, but no more than the smallest class has groups on
    # this training side, so the validation split holds every class (and training keeps one)
    per_class = [len(np.unique(groups[idx][labels[idx] == c])) for c in np.unique(labels)]
    n_splits = min(max(2, round(1 / val_fraction)), min(per_class))
    if n_splits < 2:
        raise DataError(f"fold {fold}: a class has {min(per_class)} group(s) on the training side; a grouped "
                        "validation split needs at least 2 (lower --folds / cv.folds, or add patients)")
    inner = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed + 1000 + fold)
    tr, va = next(inner.split(idx, labels[idx], groups[idx]))
    return np.sort(idx[tr]), np.sort(idx[va])


def kfold_splits(labels, groups, k: int = 5, val_fraction: float = 0.2, seed: int = 0,
                 class_names=None) -> list[Split]:
    """Stratified group k-fold (outer) with a grouped stratified train/val split inside each fold.

    Args:
        labels: [N] int class per source image.
        groups: [N] group id per source image (patient / slide / the path itself).
        k: number of outer folds (test = 1/k of the groups).
        val_fraction: share of the training groups held out for validation (0 = none);
            the inner split is one fold of a StratifiedGroupKFold with round(1/val_fraction) folds.
        seed: shuffling seed; the same seed gives the same splits.
        class_names: names for messages (default: the label values).
    Returns:
        k Splits with disjoint groups between train, val and test; every test fold and every
        validation split holds every class.
    Raises:
        DataError: a class with too few groups for k folds (:func:`raycyto.data.quality.check_folds`:
            the message names --folds / cv.folds, the class and its group count), k < 2, or
            val_fraction outside [0, 1).
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
    from raycyto.data.quality import check_folds

    present = np.unique(labels)  # classes of this source, in label order
    names = [str(class_names[int(c)]) if class_names is not None else str(c) for c in present]
    check_folds(np.searchsorted(present, labels), codes, names, k)
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
