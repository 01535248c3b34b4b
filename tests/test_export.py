"""Export (trial/fold selection, enriched verified bundle), Serve YAMLs, chunking."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from raycyto.errors import ConfigError, WeightsError
from raycyto.analysis.load import read_csv

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def classifier():
    from raycyto.models.classifier import build_classifier

    return build_classifier("efficientnet_lite0", head="d", num_classes=2, pretrained=True)


@pytest.fixture()
def fake_experiment(tmp_path, classifier) -> Path:
    """A fabricated experiment (2 configurations x 2 samples x 3 folds, contract-complete) with a
    real bundle per trial and fold, each marked ``<trial>-fold<k>``."""
    from test_analysis_fabricate import fabricate_experiment

    from raycyto.models.bundle import save_bundle

    exp = fabricate_experiment(tmp_path / "exp", seed=11, passes=30, threshold=0.7)
    for trial in read_csv(exp / "results.csv")["trial_id"]:
        for k in range(3):
            save_bundle(exp / "checkpoints" / trial / f"fold{k}", classifier,
                        {"class_names": ["normal", "abnormal"], "positive_class": "abnormal",
                         "marker": f"{trial}-fold{k}"})
    return exp


def _fold_scores(exp_dir: Path, trial: str, metric):
    """Validation ``metric(labels, preds)`` of each fold of ``trial``, from predictions.parquet."""
    p = pd.read_parquet(exp_dir / "predictions.parquet")
    p = p[(p["trial_id"].astype(str) == trial) & (p["split"] == "val")]
    return {int(k): metric(g["label"], g["pred"]) for k, g in p.groupby("fold")}


def test_export_picks_the_reports_best_trial_then_its_best_validation_fold(fake_experiment, tmp_path):
    from sklearn.metrics import accuracy_score

    from raycyto.analysis import load_experiment, select_best
    from raycyto.export.core import export_model

    out = export_model(fake_experiment, tmp_path / "model", select="accuracy")
    doc = json.loads((out / "model.json").read_text())
    best = select_best(load_experiment(fake_experiment), "accuracy")["trial_id"]
    folds = _fold_scores(fake_experiment, best, accuracy_score)
    fold = max(sorted(folds), key=lambda k: folds[k])  # ties: the lowest fold
    assert doc["selection"]["trial_id"] == best and doc["selection"]["fold"] == fold
    assert doc["marker"] == f"{best}-fold{fold}"  # the weights are that fold's checkpoint
    assert doc["selection"]["rule"] == "accuracy" and doc["selection"]["fold_val"]["value"] == pytest.approx(folds[fold])
    assert doc["config"]["name"] == "fabricated" and doc["mc"]["passes"] == 30 and doc["mc"]["threshold"] == 0.7
    for key in ("backbone", "finetune", "head", "class_names", "positive_class", "preprocess", "input_size"):
        assert key in doc, key
    assert all(len(sha) == 64 for sha in doc["files"].values()) and doc["files"]


def test_export_honours_select_and_explicit_trial(fake_experiment, tmp_path):
    from raycyto.errors import RaycytoError
    from raycyto.export.core import export_model

    by_loss = json.loads((export_model(fake_experiment, tmp_path / "m1", select="loss") / "model.json").read_text())
    assert by_loss["selection"]["rule"] == "loss"
    some = read_csv(fake_experiment / "results.csv")["trial_id"].iloc[-1]
    named = json.loads((export_model(fake_experiment, tmp_path / "m2", trial=some) / "model.json").read_text())
    assert named["selection"]["trial_id"] == some and named["marker"].startswith(f"{some}-fold")
    assert named["selection"]["named"] is True
    with pytest.raises(ConfigError, match="--trial"):
        export_model(fake_experiment, tmp_path / "m3", trial="Z")
    with pytest.raises(RaycytoError, match="unknown metric"):
        export_model(fake_experiment, tmp_path / "m4", select="f2")


def test_loading_refuses_a_tampered_export(fake_experiment, tmp_path):
    from raycyto.export.core import export_model
    from raycyto.serve.predict import LocalPredictor

    out = export_model(fake_experiment, tmp_path / "model")
    LocalPredictor(out)  # verifies
    weights = out / "head.pt"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="SHA-256 mismatch"):
        LocalPredictor(out)


def test_export_cli_writes_the_bundle(fake_experiment, tmp_path):
    from typer.testing import CliRunner

    from raycyto.cli import app

    res = CliRunner().invoke(app, ["export", str(fake_experiment), "--out", str(tmp_path / "cli_model")])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "cli_model" / "model.json").read_text())
    assert f"trial {doc['selection']['trial_id']}, fold {doc['selection']['fold']}" in res.output
    bad = CliRunner().invoke(app, ["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "raycyto sweep" in bad.output


def test_export_of_a_real_sweep_serves_offline(tiny_experiment, karyo_dir, tmp_path):
    from raycyto.export.core import export_model
    from raycyto.serve.predict import LocalPredictor

    from raycyto.analysis import load_experiment, select_best

    out = export_model(tiny_experiment, tmp_path / "model")
    doc = json.loads((out / "model.json").read_text())
    assert doc["selection"]["trial_id"] == select_best(load_experiment(tiny_experiment))["trial_id"]
    assert set(doc["class_names"]) == {"abnormal", "normal"} and doc["positive_class"] == "abnormal"
    assert doc["mc"]["passes"] == 10 and doc["config"]
    image = next(p for p in sorted(karyo_dir.rglob("*.png")))
    result = LocalPredictor(out).predict_bytes(image.read_bytes())
    assert result["passes"] == 10 and result["label"] in doc["class_names"]


def test_export_to_an_object_store_uri_serves_from_it(fake_experiment, tmp_path):
    """``--out s3://...`` and ``model_dir: s3://...``, run through a ``file://`` URI."""
    from typer.testing import CliRunner

    from raycyto.cli import app
    from raycyto.errors import RaycytoError
    from raycyto.serve.app import resolve_model_dir
    from raycyto.export.core import export_model
    from raycyto.serve.predict import LocalPredictor

    uri = (tmp_path / "bucket" / "model").as_uri()
    res = CliRunner().invoke(app, ["export", str(fake_experiment), "--out", uri])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "bucket" / "model" / "model.json").is_file()
    assert resolve_model_dir(uri + "/") == uri

    import cv2

    png = cv2.imencode(".png", (np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8))[1].tobytes()
    local = export_model(fake_experiment, tmp_path / "local")
    remote, here = LocalPredictor(uri).predict_bytes(png), LocalPredictor(local).predict_bytes(png)
    # model.sha256 covers model.json, whose export time differs between the two exports
    assert remote.pop("model")["name"] == here.pop("model")["name"] and remote == here

    nothing = (tmp_path / "nothing").as_uri()
    with pytest.raises(ConfigError, match="model_dir"):
        resolve_model_dir(nothing)
    with pytest.raises(RaycytoError):
        LocalPredictor(nothing)


# ------------------------------------------------------------------------ configs


@pytest.mark.parametrize("name", ["local.yaml", "gpu_cluster.yaml"])
def test_serve_yaml_validates_against_serve_schema_and_app_args(name):
    from ray.serve.schema import ServeDeploySchema

    from raycyto.serve.app import AppArgs

    doc = yaml.safe_load((ROOT / "serve_configs" / name).read_text())
    schema = ServeDeploySchema.model_validate(doc)
    (app,) = schema.applications
    assert app.import_path == "raycyto.serve.app:build_app"
    AppArgs.model_validate(app.args)  # extra="forbid": a typo in args fails here
    assert {d.name for d in app.deployments} <= {"Ingress", "Backbone", "MCHead"}


def test_gpu_cluster_yaml_autoscales_gpu_backbones_with_bounded_queues_and_auth():
    doc = yaml.safe_load((ROOT / "serve_configs" / "gpu_cluster.yaml").read_text())
    (app,) = doc["applications"]
    deps = {d["name"]: d for d in app["deployments"]}
    assert deps["Backbone"]["ray_actor_options"]["num_gpus"] >= 1
    for d in deps.values():
        assert {"min_replicas", "max_replicas", "target_ongoing_requests"} <= set(d["autoscaling_config"])
        assert d["max_queued_requests"] > 0 and d["max_ongoing_requests"] > 0
        assert d["health_check_period_s"] and d["health_check_timeout_s"]
    assert doc["http_options"]["request_timeout_s"] and app["args"]["auth_token_file"]


def test_app_args_reject_unknown_fields_and_bad_model_dir(tmp_path):
    from pydantic import ValidationError

    from raycyto.serve.app import AppArgs, build_app

    with pytest.raises(ValidationError):
        AppArgs.model_validate({"model_dir": "x", "fanout": 2})
    with pytest.raises(ConfigError, match="model_dir"):
        build_app(AppArgs(model_dir=str(tmp_path)))


# ------------------------------------------------------------------------ chunking


def test_chunk_plan_covers_every_pass_once_in_order():
    from raycyto.serve.predict import Chunk, chunk_plan, resolve_fan_out

    plan = chunk_plan(100, 3, seed=5)
    assert plan == [Chunk(0, 34, 5), Chunk(34, 33, 5), Chunk(67, 33, 5)]
    assert len(chunk_plan(2, 8, seed=0)) == 2  # never more chunks than passes
    assert resolve_fan_out(None, "head", 4) == 1 and resolve_fan_out(None, "full", 4) == 4
    assert resolve_fan_out(3, "head", 4) == 3


def test_offline_predictor_is_deterministic_per_seed_and_chunking(classifier, tmp_path):
    import cv2

    from raycyto.models.bundle import save_bundle
    from raycyto.serve.predict import LocalPredictor

    save_bundle(tmp_path / "m", classifier, {"class_names": ["normal", "abnormal"]})
    p = LocalPredictor(tmp_path / "m")
    img = (np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)
    png = cv2.imencode(".png", img)[1].tobytes()
    a, b = (p.predict_bytes(png, passes=50, seed=3, fan_out=2) for _ in range(2))
    other = p.predict_bytes(png, passes=50, seed=4, fan_out=2)
    assert a == b
    assert a["probabilities"] != other["probabilities"]
    assert a["replicas"] == {"count": 1, "chunks": 2, "ids": ["in-process"]}
    one = p.predict_bytes(png, passes=50, seed=3, fan_out=1)  # passes are seeded per pass: chunking is invisible
    assert {k: one[k] for k in ("probabilities", "confidence", "std")} == {k: a[k] for k in ("probabilities", "confidence", "std")}
