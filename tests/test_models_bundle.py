"""Model bundles: identical logits after a round trip, tampering refused."""

from __future__ import annotations

import json

import pytest
import torch

from raycyto.errors import WeightsError
from raycyto.models import build_classifier, load_bundle, save_bundle


@pytest.mark.parametrize("pretrained,finetune,saved", [
    (False, "frozen", True),   # random weights cannot be rebuilt -> saved
    (True, "frozen", False),   # registry weights referenced, not copied
    (True, "last1", True),     # fine-tuned -> saved
])
def test_bundle_round_trip_gives_identical_logits(tmp_path, pretrained, finetune, saved):
    model = build_classifier("efficientnet_lite0", "k", 2, finetune=finetune,
                             pretrained=pretrained, head_kwargs={"units": 16}, seed=3)
    x = torch.randn(2, 3, 64, 64)
    model.train()
    model(x)  # move head BN statistics away from their initial values
    if finetune != "frozen":
        with torch.no_grad():
            model.backbone.conv_head.weight.mul_(1.1)  # "fine-tuned"
    model.eval()
    meta = {"class_names": ["normal", "abnormal"], "positive_class": "abnormal",
            "mc": {"passes": 50}, "metrics": {"val_auc": 0.9}}
    path = save_bundle(tmp_path / "b", model, meta)
    doc = json.loads(path.read_text())
    assert ("backbone.pt" in doc["files"]) == saved
    assert doc["mc"] == {"passes": 50, "threshold": 0.8, "scope": "head"}
    assert doc["class_names"] == ["normal", "abnormal"] and doc["metrics"] == {"val_auc": 0.9}
    loaded, doc2 = load_bundle(tmp_path / "b")
    assert doc2 == doc
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_tampered_bundle_file_is_refused(tmp_path):
    model = build_classifier("efficientnet_lite0", "a", 2, pretrained=True)
    save_bundle(tmp_path, model, {})
    head = tmp_path / "head.pt"
    data = bytearray(head.read_bytes())
    data[-10] ^= 0x01
    head.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="head.pt"):
        load_bundle(tmp_path)


def test_fitted_svm_head_survives_a_bundle(tmp_path):
    import numpy as np

    model = build_classifier("efficientnet_lite0", "b", 2, pretrained=False).eval()
    feats = torch.randn(12, 1280)
    model.head.fit_svm(feats, np.array([0, 1] * 6))
    save_bundle(tmp_path, model, {})
    loaded, _ = load_bundle(tmp_path)
    with torch.no_grad():
        assert torch.allclose(model.classify_features(feats), loaded.classify_features(feats))
