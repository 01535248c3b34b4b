"""Heads: shapes, registry, study B's calibrated-SVM head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raycyto.errors import DataError, RaycytoError
from raycyto.models import HEADS, build_head
from raycyto.models.heads import BASELINE_HEADS, Standardize
from raycyto.models.mc import MCDropout


@pytest.mark.parametrize("name", list(HEADS))
def test_every_head_maps_features_to_logits(name):
    head = build_head(name, 32, 5).eval()
    out = head(torch.randn(4, 32))
    assert out.shape == (4, 5) and torch.isfinite(out).all()
    if name not in BASELINE_HEADS:
        assert head.penultimate(torch.randn(4, 32)).ndim == 2


def test_standardize_learns_training_statistics_and_leaves_constant_features_alone():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(500, 4)).astype(np.float32)
    x[:, 3] = 7.0  # constant on the training rows
    norm = Standardize(4).fit(x)
    z = norm(torch.from_numpy(x))
    np.testing.assert_allclose(z[:, :3].mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(z[:, :3].std(0, unbiased=False), 1.0, atol=1e-4)
    assert norm.scale[3] == 1.0  # not 1e-12: a new image's value stays finite and unamplified
    new = torch.tensor([[3.0, 3.0, 3.0, 9.0]])
    assert norm(new)[0, 3] == pytest.approx(2.0)
    maps = torch.randn(6, 4, 5, 5) * 3 + 1  # [N, C, H, W]: statistics per channel
    np.testing.assert_allclose(Standardize(4).fit(maps)(maps).mean((0, 2, 3)), 0.0, atol=1e-5)


def test_svm_head_calibration_folds_never_split_a_group():
    rng = np.random.default_rng(1)
    groups = np.repeat([f"p{i}" for i in range(12)], 5)  # 12 patients x 5 augmented copies, in order
    y = np.repeat(np.arange(12) % 2, 5)
    x = (rng.normal(size=(len(y), 8)) + y[:, None]).astype(np.float32)
    head = build_head("b", 8, 2).eval().fit_svm(x, y, groups=groups)
    assert int(head.svm_folds) == 3
    for train, cal in head.calibration_folds:
        assert not set(groups[train]) & set(groups[cal])  # no copy of one image on both sides
        assert set(y[cal]) == {0, 1}
    ungrouped = build_head("b", 8, 2).eval().fit_svm(x, y)
    leaks = sum(bool(set(groups[tr]) & set(groups[ca])) for tr, ca in ungrouped.calibration_folds)
    assert leaks > 0  # what grouping prevents: rows of one patient on both sides


def test_head_shapes_follow_the_studies():
    c = build_head("c", 2048, 2)
    assert [m.out_features for m in c.modules() if isinstance(m, torch.nn.Linear)] == [1024, 512, 128, 2]
    d = build_head("d", 2048, 2)
    assert [m.p for m in d.modules() if isinstance(m, MCDropout)] == [0.5, 0.5, 0.5]
    k = build_head("k", 64, 2, units=16, dropout1=0.2, dropout2=0.3)
    assert isinstance(k.body[0], torch.nn.BatchNorm1d)
    assert [m.p for m in k.modules() if isinstance(m, MCDropout)] == [0.2, 0.3]


def test_unknown_head_and_single_logit_are_refused():
    with pytest.raises(RaycytoError, match="known: a, b, c, d, k"):
        build_head("z", 8, 2)
    with pytest.raises(RaycytoError, match="num_classes"):
        build_head("a", 8, 1)


@pytest.mark.parametrize("classes", [2, 3])
def test_svm_head_probabilities_sum_to_one_and_match_sklearn(classes):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(classes), 20)
    x = (rng.normal(size=(len(y), 16)) + y[:, None] * 1.5).astype(np.float32)
    torch.manual_seed(0)
    head = build_head("b", 16, classes).eval()
    before = head(torch.from_numpy(x))
    head.fit_svm(x, y)
    with torch.no_grad():
        probs = head(torch.from_numpy(x)).softmax(-1).double()
    assert torch.allclose(probs.sum(-1), torch.ones(len(y), dtype=torch.float64), atol=1e-6)
    z = head.penultimate(torch.from_numpy(x)).detach().double().numpy()
    np.testing.assert_allclose(probs.numpy(), head._sklearn.predict_proba(z), atol=1e-5)
    assert (probs.argmax(-1).numpy() == y).mean() > 0.8
    assert not torch.allclose(before.softmax(-1).double(), probs, atol=1e-3)
    # the fitted SVM lives in the state dict: a fresh head loading it predicts the same
    fresh = build_head("b", 16, classes).eval()
    fresh.load_state_dict(head.state_dict())
    with torch.no_grad():
        assert torch.allclose(fresh(torch.from_numpy(x)).softmax(-1).double(), probs)


def test_svm_head_needs_enough_samples_per_class():
    head = build_head("b", 4, 3)
    with pytest.raises(DataError, match="counts"):
        head.fit_svm(np.zeros((4, 4), np.float32), [0, 0, 1, 1])
