"""Referral in the served answer (predict.build_result / ReferralPolicy, oip OUTPUTS), and end to
end on two small real sweeps (a karyogram model and a blood-smear model, exported with their
calibration and out-of-distribution guard): a karyogram sent to the blood-smear model and a
photograph sent to either come back ``refer: true`` with reason ``out_of_distribution``, offline
(`raycyto predict`) and through the Serve app (/predict, fan-out and OIP infer)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from raycyto.referral.conformal import calibrate_conformal
from raycyto.errors import ConfigError
from raycyto.referral.policy import OOD_REASON, ReferralPolicy
from raycyto.serve.predict import build_result

CLASSES = ["normal", "abnormal"]
INFO = {"name": "m", "sha256": "0" * 64}
REPLICAS = {"count": 1, "chunks": 1, "ids": ["x"]}
OPTIONAL = {"prediction_set", "coverage", "risk_threshold", "guarantee", "out_of_distribution",
            "ood_score", "ood_threshold"}


def _referral(rule: str = "vote", risk: float | None = 0.7) -> dict:
    rng = np.random.default_rng(0)
    p = rng.dirichlet([1, 1], 200)
    y = (rng.random(200) < p[:, 1]).astype(int)
    cal = calibrate_conformal(p, y, (0.9, 0.95))
    doc = {"rule": rule, "conformal": {"score": "aps", "level": 0.9, "calibration": cal.to_json()}}
    doc["risk"] = {"threshold": risk, "statement": "a sentence"}
    return {"referral": doc}


def _passes(seed: int, t: int = 10) -> np.ndarray:
    """[T, C] passes of one image: Dirichlet around a random mean (votes split or unanimous)."""
    rng = np.random.default_rng(seed)
    centre = rng.dirichlet([0.7, 0.7])
    return rng.dirichlet(centre * rng.choice([3, 30, 300]) + 1e-3, t)


def test_a_bundle_without_calibration_or_guard_answers_without_those_fields():
    r = build_result(_passes(1), 0.8, CLASSES, INFO, REPLICAS, ReferralPolicy.from_meta({}))
    assert not OPTIONAL & set(r)
    assert r["rule"] == "vote" and r["refer"] == (r["confidence"] < 0.8)
    assert r["refer_reason"] == ("vote" if r["refer"] else None) and r["refer_rule"] == "confidence < 0.8"
    assert build_result(_passes(1), 0.8, CLASSES, INFO, REPLICAS) == r   # no policy = the vote rule
    with pytest.raises(ConfigError, match="refer_rule"):
        ReferralPolicy.from_meta({}, "set")                     # nothing to build a set from
    with pytest.raises(ConfigError, match="refer_rule"):
        ReferralPolicy.from_meta({}, "bogus")


@pytest.mark.parametrize("rule", ["vote", "set", "risk"])
def test_each_rule_decides_refer_and_names_itself(rule):
    policy = ReferralPolicy.from_meta(_referral(rule))
    seen = set()
    for seed in range(40):
        r = build_result(_passes(seed), 0.8, CLASSES, INFO, REPLICAS, policy)
        seen.add(r["refer"])
        assert {"prediction_set", "coverage", "risk_threshold", "guarantee"} <= set(r)
        assert r["coverage"] == 0.9 and set(r["prediction_set"]) <= set(CLASSES) and r["prediction_set"]
        expected = {"vote": r["confidence"] < 0.8, "set": len(r["prediction_set"]) != 1,
                    "risk": r["confidence"] < 0.7}[rule]
        assert r["refer"] == expected and r["rule"] == rule
        assert r["refer_reason"] == (rule if expected else None)
        assert r["prediction_set"][0] == max(r["probabilities"], key=r["probabilities"].get)
    assert seen == {True, False}


def test_an_uncertified_risk_threshold_refers_everything_and_says_so():
    policy = ReferralPolicy.from_meta(_referral("risk", risk=None))
    r = build_result(np.tile([[0.01, 0.99]], (10, 1)), 0.8, CLASSES, INFO, REPLICAS, policy)
    assert r["refer"] and r["refer_reason"] == "risk" and r["risk_threshold"] is None
    assert "no risk-controlled threshold" in r["refer_rule"]


def test_out_of_distribution_refers_whatever_the_rule_says():
    for rule in ("vote", "set", "risk"):
        policy = ReferralPolicy.from_meta(_referral(rule))
        confident = np.tile([[0.001, 0.999]], (10, 1))
        ok = build_result(confident, 0.8, CLASSES, INFO, REPLICAS, policy, ood_score=1.0, ood_threshold=2.0)
        assert not ok["refer"] and ok["out_of_distribution"] is False and ok["refer_reason"] is None
        far = build_result(confident, 0.8, CLASSES, INFO, REPLICAS, policy, ood_score=3.0, ood_threshold=2.0)
        assert far["refer"] and far["out_of_distribution"] is True and far["refer_reason"] == OOD_REASON
        assert (far["ood_score"], far["ood_threshold"]) == (3.0, 2.0)
        json.dumps(far, allow_nan=False)  # strict JSON


def test_oip_outputs_follow_the_bundle():
    from raycyto.serve.api import ServedModel
    from raycyto.serve.oip import InferRequest, encode_response, model_metadata, outputs_of

    plain = ServedModel("k", "m", "v1", "a" * 64, tuple(CLASSES), 64, 10, 0.8)
    full = ServedModel("k", "m", "v2", "b" * 64, tuple(CLASSES), 64, 10, 0.8,
                       policy=ReferralPolicy.from_meta(_referral("set")), ood_threshold=2.0)
    assert not {"prediction_set", "out_of_distribution"} & set(outputs_of(plain))
    assert {"prediction_set", "coverage", "out_of_distribution", "ood_score", "rule",
            "refer_reason"} <= set(outputs_of(full))
    meta = model_metadata(full, ["v2"])
    assert {o["name"] for o in meta["outputs"]} == set(outputs_of(full))
    assert meta["parameters"]["rule"] == "set" and meta["parameters"]["coverage"] == 0.9
    r = build_result(_passes(2), 0.8, CLASSES, INFO, REPLICAS, full.policy, 3.0, 2.0)
    req = InferRequest.model_validate({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["x"]}]})
    body, _ = encode_response(full, req, [r, r])
    out = {o["name"]: o for o in json.loads(body)["outputs"]}
    assert out["prediction_set"]["shape"] == [2, 2] and out["prediction_set"]["datatype"] == "BOOL"
    assert out["prediction_set"]["data"][:2] == [c in r["prediction_set"] for c in CLASSES]
    assert out["out_of_distribution"]["data"] == [True, True] and out["refer_reason"]["data"] == [OOD_REASON] * 2
    plain_r = build_result(_passes(2), 0.8, CLASSES, INFO, REPLICAS)
    body, _ = encode_response(plain, req, [plain_r])
    assert "prediction_set" not in {o["name"] for o in json.loads(body)["outputs"]}
    asked = InferRequest.model_validate({**req.model_dump(exclude={"binary"}), "outputs": [{"name": "prediction_set"}]})
    from raycyto.serve.validation import ClientError

    with pytest.raises(ClientError, match="not given by this model"):
        encode_response(plain, asked, [plain_r])


def test_pooled_features_match_the_sweeps_pooling():
    from raycyto.serve.predict import pooled_features
    from raycyto.tune.trainable import pooled

    maps = np.random.default_rng(0).random((3, 8, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(pooled_features(maps), pooled(maps))
    np.testing.assert_array_equal(pooled_features(maps[:, :, 0, 0]), pooled(maps[:, :, 0, 0]))


# ------------------------------------------------------------------------ real sweeps


def _photographs() -> list[np.ndarray]:
    """scikit-learn's two sample photographs (427x640) and a large smooth random 'natural' image."""
    from scipy.ndimage import gaussian_filter
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(0)
    noise = gaussian_filter(rng.random((1200, 1600, 3)), sigma=(12, 12, 0))
    big = ((noise - noise.min()) / np.ptp(noise) * 255).astype(np.uint8)
    return [*load_sample_images().images, big]


def _png(image: np.ndarray) -> bytes:
    import cv2

    return cv2.imencode(".png", image[:, :, ::-1])[1].tobytes()


def _small_sweep(task: str, source: Path, out: Path, false_alarm: float) -> Path:
    from conftest import tiny_sweep_config

    from raycyto.config import load_config
    from raycyto.export.core import export_model
    from raycyto.tune.sweep import run_sweep

    cfg = tiny_sweep_config(source, f"ood-{task}", cv={"folds": 2, "val_fraction": 0.3, "seed": 0},
                            mc={"passes": 5, "ood_false_alarm": false_alarm})
    if task == "leukemia":
        cfg["data"]["positive_class"] = None
    exp = run_sweep(load_config(cfg), out=out / "exp", progress=False)
    return Path(export_model(exp, out / "model"))


@pytest.fixture(scope="module")
def models(ray_local, tmp_path_factory) -> dict[str, Path]:
    """A karyogram and a blood-smear model from two small real sweeps (40 patients x 2 images
    at 64 px, 2 folds, 1 epoch), exported with their calibration and OOD guard. The blood-smear
    sweep thresholds its guards at 20% false alarms, which its ~12 validation images allow; the
    karyogram sweep asks for 5%, which needs 19, so export thresholds the exported fold's guard
    at the largest validation score (rate 1 / (n + 1))."""
    from raycyto.synth import generate

    root = tmp_path_factory.mktemp("ood")
    out = {}
    for task in ("karyogram", "leukemia"):
        data = root / f"{task}_data"
        generate(task, data, patients=40, per_patient=2, seed=1, size=64, progress=False)
        out[task] = _small_sweep(task, data, root / task, 0.05 if task == "karyogram" else 0.2)
        out[f"{task}_data"] = data
    return out


def test_exported_bundles_carry_a_calibrated_guard_and_a_referral(models):
    for task in ("karyogram", "leukemia"):
        doc = json.loads((models[task] / "model.json").read_text())
        assert "ood.npz" in doc["files"] and math.isfinite(doc["ood"]["threshold"])
        assert doc["referral"]["calibrated_on"]["split"] == "test"   # out-of-fold rows, never validation
        assert ("risk" in doc["referral"]) == (task == "karyogram")
        # export thresholds the guard on the exported fold's test images (and their shifted copies),
        # never on validation images; too few for 5%: the largest score, rate 1 / (n + 1)
        ood = doc["ood"]
        assert f"test images of trial {doc['selection']['trial_id']} fold {doc['selection']['fold']}" in ood["calibrated_by"]
        assert 2 <= ood["n_calibration"] < doc["referral"]["calibrated_on"]["n"]
        assert 0 < ood["false_alarm_rate"] < 1


def test_a_karyogram_sent_to_the_blood_smear_model_and_a_photograph_sent_to_either_are_referred(models):
    from raycyto.serve.predict import LocalPredictor

    smear, karyo = LocalPredictor(models["leukemia"]), LocalPredictor(models["karyogram"])
    karyograms = sorted(models["karyogram_data"].rglob("*.png"))[:4]
    for path in karyograms:
        r = smear.predict_bytes(path.read_bytes())
        assert r["refer"] and r["refer_reason"] == OOD_REASON and r["out_of_distribution"], (path, r)
    for image in _photographs():
        for predictor in (smear, karyo):
            r = predictor.predict_image(image)
            assert r["refer"] and r["refer_reason"] == OOD_REASON and r["out_of_distribution"]
            assert r["ood_score"] > r["ood_threshold"] and r["prediction_set"] and r["coverage"] == 0.9
    own = [smear.predict_bytes(p.read_bytes()) for p in sorted(models["leukemia_data"].rglob("*.png"))]
    assert np.mean([r["out_of_distribution"] for r in own]) < 0.5   # its own images mostly pass


def test_raycyto_predict_prints_the_fields(models, tmp_path):
    from typer.testing import CliRunner

    from raycyto.cli import app

    photo = tmp_path / "photo.png"
    photo.write_bytes(_png(_photographs()[0]))
    res = CliRunner().invoke(app, ["predict", str(models["karyogram"]), str(photo), "--refer-rule", "set"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output.splitlines()[0])
    assert r["rule"] == "set" and r["refer_reason"] == OOD_REASON and "prediction_set" in r and "guarantee" in r
    bad = CliRunner().invoke(app, ["predict", str(models["karyogram"]), str(photo), "--refer-rule", "nope"])
    assert bad.exit_code == 2 and "refer_rule" in bad.output


def test_the_serve_app_returns_the_fields_on_both_paths_and_oip(models):
    httpx = pytest.importorskip("httpx")
    from conftest import free_port
    from ray import serve

    from raycyto.serve.app import AppArgs, build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        args = AppArgs(models=[{"model_dir": str(models["karyogram"])}, {"model_dir": str(models["leukemia"])}],
                       refer_rule="set", backbone_num_cpus=0.4, mc_num_cpus=0.2, ingress_num_cpus=0.1,
                       mc_replicas=1, metrics=False)
        serve.run(build_app(args), name="raycyto-referral", route_prefix="/")
        karyogram = sorted(models["karyogram_data"].rglob("*.png"))[0].read_bytes()
        photo = _png(_photographs()[1])
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            index = {m["name"]: m for m in c.get("/models").json()["models"]}
            smear_name = json.loads((models["leukemia"] / "model.json").read_text())["name"]
            assert index[smear_name]["rule"] == "set" and index[smear_name]["coverage"] == 0.9
            for fan_out in (1, 2):   # one hop on the Backbone, and embed + MCHead chunks
                r = c.post("/predict", params={"model": smear_name, "fan_out": fan_out},
                           files={"file": ("k.png", karyogram, "image/png")})
                assert r.status_code == 200, r.text
                body = r.json()
                assert body["refer"] and body["refer_reason"] == OOD_REASON and body["rule"] == "set"
                assert body["prediction_set"] and body["coverage"] == 0.9 and body["replicas"]["chunks"] == fan_out
            own = c.post("/predict", files={"file": ("p.png", photo, "image/png")}).json()   # default: karyogram
            assert own["refer_reason"] == OOD_REASON
            infer = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                 "data": [__import__("base64").b64encode(photo).decode()]}]}
            out = c.post(f"/v2/models/{smear_name}/infer", json=infer).json()
            tensors = {o["name"]: o for o in out["outputs"]}
            assert tensors["out_of_distribution"]["data"] == [True]
            assert tensors["refer_reason"]["data"] == [OOD_REASON] and tensors["prediction_set"]["shape"] == [1, 5]
    finally:
        serve.shutdown()
