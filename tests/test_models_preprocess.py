"""The one preprocessing contract: training path == serving path, for images of any size."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from raycyto.data.decode import load_image
from raycyto.errors import DataError
from raycyto.models.preprocessing import Preprocess
from raycyto.models.registry import get_spec


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(9 * xx), np.cos(7 * yy), np.sin(5 * (xx + yy))], -1) * 90 + 128
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_serving_path_equals_the_training_path_for_a_non_square_photo(tmp_path, ext):
    pre = Preprocess.build("efficientnet_lite0", image_size=96, input_size=64)
    img = _photo(107, 160)
    path = tmp_path / f"photo{ext}"
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    # training: the data pipeline decodes + resizes to image_size, then the backbone input step
    train = pre.to_tensor(load_image(str(path), pre.image_size))
    # serving: decode the uploaded bytes, then the whole contract
    from raycyto.data.decode import decode_image

    served = pre([decode_image(path.read_bytes())])
    assert served.shape == (1, 3, 64, 64)
    torch.testing.assert_close(served, train, rtol=0, atol=0)
    # the skew the contract removes: skipping the first resize gives other pixels
    skipped = pre.to_tensor(decode_image(path.read_bytes()))
    assert (skipped - train).abs().max() > 0.02


def test_round_trip_and_bundle_fallback():
    spec = get_spec("efficientnet_lite0")
    pre = Preprocess.build(spec, image_size=416, input_size=128)
    assert pre == Preprocess.from_dict(pre.to_dict())
    assert (pre.mean, pre.interpolation, pre.input_size) == (tuple(spec.mean), spec.interpolation, 128)
    old_bundle = {"image_size": 416, "input_size": 128}  # model.json without "preprocess"
    assert Preprocess.from_bundle(old_bundle, spec) == pre
    assert Preprocess.build(spec, None).input_size == spec.input_size


def test_bad_input_is_a_clear_error():
    pre = Preprocess.build("resnet18", image_size=32)
    with pytest.raises(DataError, match="uint8"):
        pre.to_tensor(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(DataError, match="interpolation"):
        Preprocess(32, 32, (0.5,) * 3, (0.5,) * 3, "lanczos9")
    with pytest.raises(DataError, match="incomplete"):
        Preprocess.from_dict({"image_size": 32})
