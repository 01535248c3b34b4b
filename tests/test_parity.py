"""The model that is served gives the numbers that were measured, for images of any size.

A real sweep on PNG and JPEG images of several non-square sizes, then `raycyto export`; then
`raycyto predict`, LocalPredictor and a live /predict must reproduce predictions.parquet's
probabilities (deterministic and MC mean) for every test image of the exported fold.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from conftest import free_port

TOL = 1e-4
SIZES = [(61, 90), (90, 61), (40, 130), (128, 77), (33, 50), (100, 100)]  # (h, w), never 48 x 48


def _photo(h: int, w: int, cls: int, seed: int) -> np.ndarray:
    """A textured image; class 1 has a dark disc (learnable), sizes vary."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([np.sin(7 * xx + seed), np.cos(5 * yy), np.sin(3 * (xx + yy))], -1) * 60 + 150
    img = img + rng.normal(0, 12, (h, w, 3))
    if cls:
        cv2.circle(img, (w // 2, h // 2), min(h, w) // 3, (30, 40, 50), -1)
    return np.clip(img, 0, 255).astype(np.uint8)


def _sweep(root: Path, head: str, input_size: int):
    """A real sweep of one head on the mixed-size set, exported: (bundle, model.json, test rows)."""
    from raycyto.config import load_config
    from raycyto.export.core import export_model
    from raycyto.tune.sweep import run_sweep

    data = root / "data"
    for cls, name in enumerate(("clear", "spot")):
        (data / name).mkdir(parents=True)
        for i, (h, w) in enumerate(SIZES):
            ext = ".jpg" if i % 2 else ".png"
            cv2.imwrite(str(data / name / f"{name}{i}{ext}"), _photo(h, w, cls, 10 * cls + i)[:, :, ::-1])
    cfg = load_config({
        "name": "parity",
        "data": {"source": str(data), "positive_class": "spot", "image_size": 48, "input_size": input_size},
        "cv": {"folds": 2, "val_fraction": 0.25},
        "grid": {"backbones": ["efficientnet_lite0"], "heads": [head]},
        "search": {"algorithm": "random", "samples": 1, "batch_size": [8]},
        "train": {"epochs": 2},
        "resources": {"cpus_per_trial": 1, "max_concurrent": 1},
        "mc": {"passes": 12},
    })
    exp = run_sweep(cfg, out=root / "exp", progress=False)
    model = export_model(exp, root / "model", select="accuracy")   # the trained head, never the probe
    meta = json.loads((model / "model.json").read_text())
    preds = pd.read_parquet(exp / "predictions.parquet")
    preds = preds[(preds["trial_id"] == meta["selection"]["trial_id"]) & (preds["fold"] == meta["selection"]["fold"])
                  & (preds["split"] == "test")]
    assert len(preds) >= 4 and {Path(p).suffix for p in preds["path"]} == {".png", ".jpg"}
    return model, meta, preds


@pytest.fixture(scope="module")
def swept(ray_local, tmp_path_factory):
    return _sweep(tmp_path_factory.mktemp("parity"), "d", 40)


@pytest.fixture(scope="module")
def swept_spatial(ray_local, tmp_path_factory):
    """Spatial head s: the bundle's backbone is the map extractor (Lite0 blocks.4, 4 x 4 cells at 64 px)."""
    return _sweep(tmp_path_factory.mktemp("parity_s"), "s", 64)


def _check(answer: dict, row: pd.Series, classes: list[str]) -> float:
    """Largest difference between an answer's probabilities and the parquet row's MC mean."""
    got = np.array([answer["probabilities"][c] for c in classes])
    want = np.array([row[f"mc_mean_{c}"] for c in classes])
    return float(np.abs(got - want).max())


@pytest.mark.parametrize("which", ["swept", "swept_spatial"])
def test_local_predictor_and_raycyto_predict_reproduce_the_sweep(which, request):
    from typer.testing import CliRunner

    from raycyto.cli import app
    from raycyto.serve.predict import LocalPredictor

    import torch

    from raycyto.data.decode import decode_image

    model, meta, preds = request.getfixturevalue(which)
    if which == "swept_spatial":
        assert meta["head"] == "s" and meta["head_kwargs"]["grid"] == [4, 4] and meta["head_kwargs"]["reference"] == 0  # clear
    classes = meta["class_names"]
    local = LocalPredictor(model)
    worst = 0.0
    for _, row in preds.iterrows():
        data = Path(row["path"]).read_bytes()
        answer = local.predict_bytes(data)
        worst = max(worst, _check(answer, row, classes))
        # the deterministic probabilities too: the served features through the head without dropout
        feats = torch.from_numpy(local.model.embed([decode_image(data)])[0])[None]
        with torch.no_grad():
            det = torch.softmax(local.model.model.classify_features(feats), -1).numpy()[0]
        assert np.abs(det - row[[f"prob_{c}" for c in classes]].to_numpy(float)).max() < TOL
    assert worst < TOL, worst

    res = CliRunner().invoke(app, ["predict", str(model), *preds["path"].tolist()])
    assert res.exit_code == 0, res.output
    answers = [json.loads(line) for line in res.output.splitlines() if line.startswith("{")]
    assert len(answers) == len(preds)
    for answer, (_, row) in zip(answers, preds.iterrows()):
        assert answer["path"] == row["path"] and _check(answer, row, classes) < TOL


def test_live_predict_reproduces_the_sweep(swept):
    import httpx
    from ray import serve

    from raycyto.serve.app import AppArgs, build_app

    model, meta, preds = swept
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(AppArgs(model_dir=str(model), backbone_num_cpus=0.5, mc_replicas=1, mc_num_cpus=0.25,
                                    ingress_num_cpus=0.1)), name="parity", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            for _, row in preds.iterrows():
                path = Path(row["path"])
                ctype = "image/jpeg" if path.suffix == ".jpg" else "image/png"
                r = client.post("/predict", files={"file": (path.name, path.read_bytes(), ctype)})
                assert r.status_code == 200, r.text
                assert _check(r.json(), row, meta["class_names"]) < TOL, (path, r.json())
    finally:
        serve.shutdown()
