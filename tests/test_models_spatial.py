"""Spatial heads (raycyto.models.spatial) and the feature maps backbones offer.

- every registry backbone names a map layer in its forward sequence; its extractor's output
  has the stated channels and stride, and a spatial head built from (channels, grid,
  classes) maps it to logits;
- MC passes differ, are seeded, and head scope equals full scope (pass for pass, hence in
  distribution), with the trunk run once per image in head scope;
- on a small synthetic karyogram set, a spatial head on Lite0's map beats pooled features.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raycyto.errors import DataError
from raycyto.models import build_head
from raycyto.models.mc import mc_head_predict, mc_predict, summarize
from raycyto.models.registry import BACKBONES, build_map_extractor
from raycyto.models.spatial import MILMapHead, is_spatial, map_grid, mc_map_predict
from raycyto.models.split import sequence_names


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_offers_a_map_a_spatial_head_reads(name):
    spec = BACKBONES[name]
    fm = spec.feature_map
    assert fm is not None and fm.layer in sequence_names(spec)
    torch.manual_seed(0)
    extractor = build_map_extractor(name, pretrained=False).eval()
    size = 299 if name == "inception_v3" else 128
    with torch.no_grad():
        maps = extractor(torch.randn(1, 3, size, size))
    grid = map_grid(extractor, size)
    assert maps.shape == (1, fm.channels, *grid)
    assert abs(grid[0] - size / fm.stride) < 2  # stride 16 (Inception: 17 at 299, no padding)
    head = build_head("s", fm.channels, 2, grid=grid).eval()
    assert is_spatial("s") and isinstance(head, MILMapHead)
    out = head(torch.randn(3, fm.channels, *grid))
    assert out.shape == (3, 2) and torch.isfinite(out).all()
    with pytest.raises(DataError):  # a map of another size is refused, not misread
        head(torch.randn(3, fm.channels, grid[0] + 1, grid[1]))


def _trained_looking_head(seed: int = 0, **kw) -> MILMapHead:
    torch.manual_seed(seed)
    head = MILMapHead(16, (6, 5), 3, width=8, **kw)
    with torch.no_grad():  # weights of a trained head's magnitude, so passes visibly differ
        head.position.normal_(0, 0.5)
        head.cell_bias.normal_(0, 1)
    return head.eval()


def test_mc_passes_differ_are_seeded_and_the_trunk_runs_once_per_image():
    head = _trained_looking_head(channel_dropout=0.3, dropout=0.2)
    maps = torch.randn(4, 16, 6, 5)
    rows = []
    trunk = head.trunk
    head.trunk = lambda x: rows.append(x.shape[0]) or trunk(x)  # type: ignore[method-assign]
    probs = mc_head_predict(head, maps, passes=40, seed=3, chunk_rows=2 * 40)  # [4, 40, 3]
    assert probs.shape == (4, 40, 3)
    assert rows == [2, 2]  # 2 images per chunk: the trunk saw images, not images x passes
    assert (probs.std(1) > 1e-3).all()  # every image's passes differ
    assert (summarize(probs, 0.8)["confidence"] < 1.0).any()  # and some votes disagree
    # seeded: chunking changes nothing but float rounding
    np.testing.assert_allclose(probs, mc_head_predict(head, maps, passes=40, seed=3), atol=1e-6)
    assert not np.allclose(probs, mc_head_predict(head, maps, passes=40, seed=4))
    with torch.no_grad():  # outside MC mode the head is deterministic
        torch.testing.assert_close(head(maps), head(maps), rtol=0, atol=0)


@pytest.mark.parametrize("dropout", [0.0, 0.2])  # 0: the one-matrix-product readout
def test_mc_map_predict_equals_mc_head_predict_without_the_copies(dropout):
    head = _trained_looking_head(channel_dropout=0.3, dropout=dropout)
    maps = torch.randn(5, 16, 6, 5)
    want = mc_head_predict(head, maps, passes=25, seed=11, first=3)
    got = mc_map_predict(head, maps, passes=25, seed=11, first=3, chunk=2)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert head.training is False and not head.channel_drop.mc  # flags restored


def test_channel_dropout_is_what_makes_votes_disagree():
    """Evidence spread over many cells (an abnormality covers several): elementwise dropout
    averages out over the cells, so passes barely differ; whole-channel masks do not."""
    maps = torch.randn(16, 16, 1, 1).expand(16, 16, 20, 20).contiguous()  # same features in every cell

    def spread(**kw):
        torch.manual_seed(0)
        head = MILMapHead(16, (20, 20), 2, width=8, **kw).eval()
        with torch.no_grad():
            head.position.zero_()
            head.shared.normal_(0, 1)
        return mc_head_predict(head, maps, passes=100, seed=0).std(1).mean()

    assert spread(channel_dropout=0.3, dropout=0.0) > 3 * spread(channel_dropout=0.0, dropout=0.3)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_head_scope_equals_full_scope_for_a_spatial_head(dropout):
    from raycyto.models import build_classifier

    torch.manual_seed(0)
    grid = map_grid(build_map_extractor("efficientnet_lite0", pretrained=False), 64)
    model = build_classifier("efficientnet_lite0", "s", 2, pretrained=False, seed=0,  # what a bundle serves
                             head_kwargs={"grid": grid, "channel_dropout": 0.4, "dropout": dropout}).eval()
    head = model.head
    with torch.no_grad():
        head.position.normal_(0, 0.5)
    x = torch.randn(3, 3, 64, 64)
    head_scope = mc_predict(model, x, passes=30, scope="head", seed=7)
    full_scope = mc_predict(model, x, passes=30, scope="full", seed=7)
    assert head_scope.shape == full_scope.shape == (3, 30, 2)
    assert (head_scope.std(1) > 1e-4).all()
    # pass t has the same masks in both scopes, so the passes agree one by one ...
    np.testing.assert_allclose(head_scope, full_scope, rtol=1e-4, atol=1e-5)
    # ... and with them every summary of their distribution
    for key in ("mean", "std", "confidence"):
        np.testing.assert_allclose(summarize(head_scope)[key], summarize(full_scope)[key], atol=1e-4)


def test_reference_class_logit_is_zero_in_every_pass():
    """A binary spatial head pins the negative class's logit at 0 ("no cell carries evidence"),
    deterministic and in MC passes alike; without a reference both logits vary."""
    torch.manual_seed(0)
    maps = torch.randn(3, 8, 4, 4)
    head = build_head("s", 8, 2, grid=(4, 4), reference=1).eval()
    assert torch.all(head(maps)[:, 1] == 0) and torch.any(head(maps)[:, 0] != 0)
    probs = mc_map_predict(head, maps, passes=5, seed=1)  # [3, 5, 2]
    assert probs[:, :, 0].std(axis=1).min() > 0  # passes differ against the pinned class
    free = build_head("s", 8, 2, grid=(4, 4)).eval()
    assert torch.all(free(maps)[:, 1] != 0)
    with pytest.raises(Exception, match="reference"):
        build_head("s", 8, 2, grid=(4, 4), reference=2)


def test_train_head_standardises_the_maps_and_casts_float16():
    """train_head fits the head's per-channel standardisation on the training maps (saved in its
    state dict), and float16 cached maps train and predict like float32 ones."""
    from raycyto.config import TrainConfig
    from raycyto.tune.train import HeadData, HParams, Task, train_head

    rng = np.random.default_rng(0)
    x = (rng.normal(5.0, 3.0, (40, 6, 3, 3))).astype(np.float16)
    y = (np.arange(40) % 2).astype(np.int64)
    x[y == 1, :, 1, 1] += 4  # the evidence sits in one cell
    data = HeadData(x[:30], y[:30], x[30:].astype(np.float32), y[30:])
    res = train_head("s", data, task=Task(2, 0), train=TrainConfig(epochs=3), hp=HParams(lr=1e-2, batch_size=8),
                     head_kwargs={"grid": [3, 3], "reference": 1})
    state = res.model.state_dict()
    assert torch.allclose(state["norm.mean"], torch.from_numpy(x[:30].astype(np.float32)).mean((0, 2, 3)), atol=1e-3)
    assert (state["norm.scale"] > 2).all()
    h = res.model.eval()
    assert torch.allclose(h(torch.from_numpy(x[30:])), h(torch.from_numpy(x[30:].astype(np.float32))))
