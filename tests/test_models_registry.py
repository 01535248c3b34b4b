"""Registry-driven backbone tests: every backbone builds offline with random weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raycyto.errors import DataError, RaycytoError
from raycyto.models import BACKBONES, build_backbone, get_spec, preprocess
from raycyto.models.finetune import resolve_group


@pytest.mark.parametrize("name", list(BACKBONES))
def test_every_backbone_gives_pooled_features_without_nans(name):
    spec = get_spec(name)
    size = max(64, spec.min_input_size)
    torch.manual_seed(0)
    model = build_backbone(name, pretrained=False).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        f = model(x)
    assert f.shape == (x.shape[0], spec.feature_dim)
    assert torch.isfinite(f).all()
    for group in spec.block_groups:  # every block group names real submodules with parameters
        mods = resolve_group(model, group)
        assert mods and any(p.numel() for m in mods for p in m.parameters())


def test_unknown_backbone_lists_known_names():
    with pytest.raises(RaycytoError, match="efficientnet_lite0"):
        get_spec("resnet9000")


def test_preprocess_resizes_scales_and_normalises():
    spec = get_spec("resnet18")
    img = np.full((2, 40, 50, 3), 255, np.uint8)
    x = preprocess(img, spec)
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    expected = (1.0 - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    assert torch.allclose(x[0, :, 100, 100], expected, atol=1e-5)
    assert preprocess(img[0], spec, size=32).shape == (1, 3, 32, 32)


def test_preprocess_rejects_wrong_dtype_with_shape_in_message():
    with pytest.raises(DataError, match="float32"):
        preprocess(np.zeros((1, 8, 8, 3), np.float32), get_spec("resnet18"))
