"""Cached-prefix fine-tuning trains exactly what uncached fine-tuning trains; batches mix classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raycyto.models.classifier import build_classifier
from raycyto.models.split import prefix_tail


@pytest.fixture(scope="module")
def photos():
    """12 real photograph crops (scikit-learn's sample images, offline), preprocessed for Lite0."""
    from sklearn.datasets import load_sample_images

    from raycyto.models.preprocessing import Preprocess

    crops = [im[r:r + 200, c:c + 200] for im in load_sample_images().images for r in (0, 150) for c in (0, 200, 400)]
    return Preprocess.build("efficientnet_lite0", 128, 128)(crops[:12]), torch.tensor([0, 1] * 6)


def _step_update(model, run, y) -> torch.Tensor:
    """The SGD update of one step on every trainable parameter, flattened."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    before = torch.cat([p.detach().flatten() for p in params])
    opt = torch.optim.SGD(params, lr=0.1)
    torch.nn.functional.cross_entropy(run(), y).backward()
    opt.step()
    return torch.cat([p.detach().flatten() for p in params]) - before


@pytest.mark.parametrize("mode", ["last1", "last2"])
def test_one_step_on_the_cached_prefix_matches_the_uncached_step(mode, photos):
    x, y = photos
    updates = {}
    for dtype in (None, torch.float32, torch.float16):  # None: uncached; then the cache in fp32 and fp16
        model = build_classifier("efficientnet_lite0", "a", 2, finetune=mode, pretrained=True, seed=0)
        if dtype is None:
            updates[dtype] = _step_update(model, lambda: model(x), y)
            continue
        prefix, tail = prefix_tail(model.backbone, model.spec, mode)
        with torch.no_grad():
            acts = prefix(x).to(dtype)  # what the feature cache stores
        updates[dtype] = _step_update(model, lambda: model.classify_features(tail(acts.float())), y)
    ref = updates[None]
    assert ref.abs().max() > 1e-4  # the step really moved the tail and the head
    torch.testing.assert_close(updates[torch.float32], ref, rtol=0, atol=1e-6)  # the mechanism is exact
    assert float((updates[torch.float16] - ref).norm() / ref.norm()) < 0.05  # fp16 cache: rounding only


def test_array_batches_are_a_fresh_permutation_of_all_rows_each_epoch():
    from raycyto.tune.train import array_batches

    y = np.repeat([0, 1], 64)  # listed class by class, as folder sources are
    x = np.arange(128, dtype=np.float32)[:, None]
    batches = array_batches(x, y, 16, seed=3)
    mixed = [len(set(b.tolist())) == 2 for _, b in batches(1)]
    assert sum(mixed) >= 7  # of 8 batches; a sorted order would give 0
    seen = [int(v) for xb, _ in batches(1) for v in xb[:, 0]]
    assert sorted(seen) == list(range(128)) and seen != [int(v) for xb, _ in batches(2) for v in xb[:, 0]]


def test_streamed_training_batches_are_globally_shuffled_and_class_mixed(ray_local, tmp_path):
    from raycyto.data.fixtures import write_image_folder
    from raycyto.data.pipeline import image_dataset
    from raycyto.data.sources import read_source
    from raycyto.models.preprocessing import Preprocess
    from raycyto.tune.train import image_batches

    write_image_folder(tmp_path / "d", groups_per_class=24, per_group=2, size=16)
    table = read_source(tmp_path / "d")  # 48 images of class a, then 48 of class b
    ds = image_dataset(table, 16, copies=2)  # each copy right after its original
    pre = Preprocess.build("efficientnet_lite0", 16, 16)
    epoch1 = [y.numpy() for _, y in image_batches(ds, pre, 16, seed=0)(1)]
    assert sum(len(set(b.tolist())) == 2 for b in epoch1) >= 10  # of 12 batches
    assert np.concatenate(epoch1).tolist().count(0) == 96
    epoch2 = np.concatenate([y.numpy() for _, y in image_batches(ds, pre, 16, seed=0)(2)])
    assert not np.array_equal(np.concatenate(epoch1), epoch2)  # another permutation each epoch
    again = np.concatenate([y.numpy() for _, y in image_batches(ds, pre, 16, seed=0)(1)])
    np.testing.assert_array_equal(np.concatenate(epoch1), again)  # seeded
