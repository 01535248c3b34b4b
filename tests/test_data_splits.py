"""Splits: zero group leakage, stratified folds, seeded, equalisation and class weights."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.utils.class_weight import compute_class_weight

from raycyto.data.splits import class_weights, equalize, kfold_splits
from raycyto.errors import DataError


def _dataset(n_groups: int = 60, seed: int = 0):
    """Patients with 1-4 images each; 3 classes at roughly 50/30/20 of the patients."""
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for g in range(n_groups):
        c = 0 if g % 10 < 5 else (1 if g % 10 < 8 else 2)
        n = int(rng.integers(1, 5))
        labels += [c] * n
        groups += [f"patient{g:03d}"] * n
    return np.array(labels), np.array(groups)


def test_no_group_leaks_across_train_val_test_and_every_image_is_tested_once():
    labels, groups = _dataset()
    splits = kfold_splits(labels, groups, k=5, val_fraction=0.2, seed=0)
    assert len(splits) == 5
    tested = np.concatenate([s.test for s in splits])
    assert sorted(tested) == list(range(len(labels)))  # each image in exactly one test fold
    for s in splits:
        parts = [set(groups[s.train]), set(groups[s.val]), set(groups[s.test])]
        assert all(parts), "empty split"
        assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
        assert len(s.train) + len(s.val) + len(s.test) == len(labels)


def test_class_proportions_per_fold_stay_within_ten_points():
    labels, groups = _dataset(n_groups=100)
    overall = np.bincount(labels) / len(labels)
    for s in kfold_splits(labels, groups, k=5, seed=1):
        for idx in (s.test, np.concatenate([s.train, s.val])):
            share = np.bincount(labels[idx], minlength=3) / len(idx)
            assert np.abs(share - overall).max() <= 0.10, (s.fold, share, overall)
        assert set(labels[s.val]) == {0, 1, 2}  # the inner split is stratified too


def test_validation_is_about_val_fraction_of_the_training_side():
    labels, groups = _dataset(n_groups=100)
    for s in kfold_splits(labels, groups, k=5, val_fraction=0.2, seed=0):
        frac = len(s.val) / (len(s.train) + len(s.val))
        assert 0.1 <= frac <= 0.3


def test_same_seed_same_folds_different_seed_different_folds():
    labels, groups = _dataset()
    a = kfold_splits(labels, groups, seed=7)
    b = kfold_splits(labels, groups, seed=7)
    c = kfold_splits(labels, groups, seed=8)
    for x, y in zip(a, b):
        for part in ("train", "val", "test"):
            np.testing.assert_array_equal(getattr(x, part), getattr(y, part))
    assert any(not np.array_equal(x.test, y.test) for x, y in zip(a, c))


def test_too_few_groups_per_class_names_the_option_the_class_and_its_groups():
    with pytest.raises(DataError, match=r"--folds / cv.folds=5: class '1' has only 1 group"):
        kfold_splits([0, 1, 0, 1], ["a", "b", "c", "b"], k=5)
    # 8 patients of one class, 2 of the other: 3 of 5 test folds would hold no minority case
    labels, groups = [0] * 8 + [1] * 2, [f"p{i}" for i in range(10)]
    with pytest.raises(DataError, match=r"class 'ALL' has only 2 group\(s\).*add patients"):
        kfold_splits(labels, groups, k=5, class_names=["HLT", "ALL"])
    with pytest.raises(DataError, match=r"lower --folds / cv.folds to 3"):  # 3 groups: 3 folds fit
        kfold_splits([0] * 8 + [1] * 3, [f"p{i}" for i in range(11)], k=5)
    with pytest.raises(DataError, match="val_fraction"):
        kfold_splits([0, 1] * 5, list("abcdefghij"), k=2, val_fraction=1.5)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_every_set_the_outer_folds_accept_gets_a_grouped_inner_split_holding_every_class(k):
    from raycyto.data.quality import min_groups_per_class

    n = min_groups_per_class(k)  # the fewest groups per class the check accepts
    labels = np.repeat([0, 1], 2 * n)  # n patients per class, 2 images each
    groups = np.repeat(np.arange(2 * n), 2).astype(str)
    for s in kfold_splits(labels, groups, k=k, val_fraction=0.2, seed=3):
        for part in (s.train, s.val, s.test):
            assert set(labels[part]) == {0, 1}
        assert not (set(groups[s.train]) & set(groups[s.val]))
    with pytest.raises(DataError, match="cv.folds"):
        kfold_splits(labels[: 4 * n - 2], groups[: 4 * n - 2], k=k)  # one patient fewer in class 1


def test_zero_val_fraction_gives_empty_validation():
    labels, groups = _dataset()
    assert all(len(s.val) == 0 for s in kfold_splits(labels, groups, k=3, val_fraction=0.0))


def test_equalize_truncates_each_class_to_the_smallest_seeded():
    labels = np.array([0] * 10 + [1] * 4 + [2] * 7)
    idx = np.arange(len(labels))
    eq = equalize(idx, labels, seed=0)
    assert np.bincount(labels[eq]).tolist() == [4, 4, 4]
    np.testing.assert_array_equal(eq, equalize(idx, labels, seed=0))
    assert not np.array_equal(eq, equalize(idx, labels, seed=1))
    sub = idx[labels != 1]  # only classes present in the subset count
    assert np.bincount(labels[equalize(sub, labels, 0)], minlength=3).tolist() == [7, 0, 7]


def test_class_weights_match_sklearn_balanced_and_zero_for_absent():
    labels = np.array([0] * 6 + [1] * 3 + [2] * 1)
    np.testing.assert_allclose(class_weights(labels, 3),
                               compute_class_weight("balanced", classes=np.arange(3), y=labels), rtol=1e-6)
    w = class_weights(np.array([0, 0, 2]), 3)
    assert w[1] == 0 and w.dtype == np.float32
