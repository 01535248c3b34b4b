"""A fine-tuning cell end to end: on the cached frozen prefix, or on images streamed from Ray Data."""

from __future__ import annotations

import pandas as pd
import torch

from raycyto.analysis.load import read_csv


import json

import pytest


@pytest.mark.parametrize("cache_prefix", [True, False])
def test_last1_sweep_trains_only_the_last_block_group_and_predicts_every_test_image(
        ray_local, karyo_dir, tmp_path, cache_prefix):
    from raycyto.config import load_config
    from raycyto.models.bundle import load_bundle
    from raycyto.models.registry import build_backbone
    from raycyto.tune.sweep import run_sweep

    cfg = load_config({
        "name": "finetune",
        "data": {"source": str(karyo_dir), "positive_class": "abnormal", "image_size": 32,
                 "input_size": 32, "policy": "karyogram", "copies": 1},
        "cv": {"folds": 2, "val_fraction": 0.25, "seed": 0},
        "grid": {"backbones": ["efficientnet_lite0"], "finetune": ["last1"], "heads": ["a"]},
        "search": {"algorithm": "random", "samples": 1, "lr": [1e-2, 2e-2], "batch_size": [8]},
        "train": {"epochs": 1, "cache_prefix": cache_prefix},
        "resources": {"cpus_per_trial": 1, "max_concurrent": 1},
        "mc": {"passes": 5, "threshold": 0.8},
    })
    exp = run_sweep(cfg, out=tmp_path / "exp", progress=False)

    results = read_csv(exp / "results.csv")
    assert list(results["status"]) == ["TERMINATED"] and list(results["finetune"]) == ["last1"]
    test = pd.read_parquet(exp / "predictions.parquet").query("split == 'test'")
    manifest = pd.read_csv(karyo_dir / "manifest.csv")
    assert sorted(test["path"]) == sorted(str((karyo_dir / p).resolve()) for p in manifest["path"])

    model, meta = load_bundle(exp / "checkpoints" / results["trial_id"][0] / "fold0")
    assert "backbone.pt" in meta["files"], "a fine-tuned backbone must be saved in the bundle"
    pretrained = build_backbone("efficientnet_lite0", pretrained=True).state_dict()
    tuned = model.backbone.state_dict()
    changed = {k for k, v in pretrained.items() if v.dtype.is_floating_point
               and not torch.equal(v, tuned[k])}
    assert changed, "last1 training changed no backbone weight"
    # only the last block group (blocks.6 + conv_head + bn2) may move
    assert all(k.startswith(("blocks.6", "conv_head", "bn2")) or ".blocks.6" in k
               or ".conv_head" in k or ".bn2" in k for k in changed), sorted(changed)[:5]
    used = json.loads((exp / "histories" / results["trial_id"][0] / "fold0_data.json").read_text())
    assert used["cached_prefix"] is cache_prefix  # the frozen prefix ran once, or images streamed
    # the exported model, run whole on the images, gives the probabilities measured on the cache
    from raycyto.serve.predict import LocalPredictor

    bundle = exp / "checkpoints" / results["trial_id"][0] / "fold0"
    local = LocalPredictor(bundle)
    rows = test[(test["fold"] == 0)].head(4)
    for _, row in rows.iterrows():
        got = local.predict_bytes(open(row["path"], "rb").read(), passes=1)["probabilities"]
        want = {c: row[f"prob_{c}"] for c in meta["class_names"]}
        assert max(abs(got[c] - want[c]) for c in want) < 1e-4  # validation and test run on float32 originals
