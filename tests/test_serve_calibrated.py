"""The probe, selected and exported like any trial, served with its out-of-fold calibration.

A copy of the tiny real sweep (``tiny_experiment``) whose trained heads are made poor on
validation, so the default rule (``brier+1se``) selects the linear probe; the real CLI exports
it (``--refer-rule set``, ``mc.coverage`` lowered to 0.8 in the copy's config.yaml, a level the
bundle calibrates besides the defaults); ``raycyto predict`` and a live Serve app (/predict and
OIP v2 infer through tritonclient) answer for the sweep's own images, and every served
prediction set is the one model.json's calibration gives offline for the answer's
probabilities and the image's uniform (``image_uniform`` of the file's bytes), with ``refer``
false exactly where the set is one class and the guard does not flag the image. A copy of the
bundle with ``referral.set_keep: negative`` is served beside it (the ingress builds that rule
from the bundle's classes: it once read only ``referral`` and refused to start).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

httpx = pytest.importorskip("httpx")

from conftest import free_port  # noqa: E402
from test_analysis_fabricate import rewrite_predictions  # noqa: E402

RAYCYTO = str(Path(sys.executable).with_name("raycyto"))
PROBE = "probe-efficientnet_lite0"
COVERAGE = 0.8          # served set level (the sweep calibrated 0.9 and 0.95 by default)
OOD = "out_of_distribution"


def _poor_trained_heads(p: pd.DataFrame) -> pd.DataFrame:
    """Validation rows of every trained head: 0.1 on the true class, the rest on the others
    (confidently wrong); the probe's rows and every test row stay as the sweep wrote them."""
    bad = ((p["head"] != "probe") & (p["split"] == "val")).to_numpy()
    classes = [c.removeprefix("prob_") for c in p.columns if c.startswith("prob_")]
    y = p["label"].to_numpy()
    poor = np.full((len(p), len(classes)), 0.9 / (len(classes) - 1))
    poor[np.arange(len(p)), y] = 0.1
    out = p.copy()
    for j, c in enumerate(classes):
        for col in (f"prob_{c}", f"mc_mean_{c}"):
            out[col] = np.where(bad, poor[:, j], p[col]).astype(p[col].dtype)
    for col in ("pred", "mc_label"):
        out[col] = np.where(bad, poor.argmax(axis=1), p[col]).astype(p[col].dtype)
    return out


@dataclass
class Exported:
    exp: Path
    model: Path
    meta: dict
    stdout: str
    images: list[Path]
    negative: Path   # the same bundle, referral.set_keep: negative, its own name


@pytest.fixture(scope="module")
def exported(tiny_experiment, karyo_dir, tmp_path_factory) -> Exported:
    root = tmp_path_factory.mktemp("calibrated")
    exp = root / "exp"
    shutil.copytree(tiny_experiment, exp)   # the session's sweep is never changed
    rewrite_predictions(exp, _poor_trained_heads)
    cfg = yaml.safe_load((exp / "config.yaml").read_text())
    cfg["mc"]["coverage"] = COVERAGE
    (exp / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = subprocess.run([RAYCYTO, "export", str(exp), "--out", str(root / "model"), "--refer-rule", "set"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    meta = json.loads((root / "model" / "model.json").read_text())
    shutil.copytree(root / "model", root / "negative")
    doc = {**meta, "name": meta["name"] + "-keep-negative", "referral": {**meta["referral"], "set_keep": "negative"}}
    (root / "negative" / "model.json").write_text(json.dumps(doc, indent=2))
    return Exported(exp, root / "model", meta, proc.stdout, sorted(karyo_dir.rglob("*.png")), root / "negative")


@dataclass
class Endpoint:
    url: str
    port: int
    refused: str | None   # why the app with the keep-negative bundle did not deploy (None: it did)


@pytest.fixture(scope="module")
def endpoint(ray_local, exported):
    from ray import serve

    from raycyto.serve.app import AppArgs, build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    main, negative = {"model_dir": str(exported.model)}, {"model_dir": str(exported.negative)}

    def run(models: list[dict]) -> None:   # /predict answers with the first
        serve.run(build_app(AppArgs(models=models, backbone_num_cpus=0.5, mc_replicas=1, mc_num_cpus=0.25,
                                    ingress_num_cpus=0.1)), name="raycyto-calibrated", route_prefix="/")

    refused = None
    try:
        run([main, negative])
    except RuntimeError as e:   # the keep-negative test fails; the others still run on the main bundle
        refused = str(e)
        run([main])
    yield Endpoint(f"http://127.0.0.1:{port}", port, refused)
    serve.shutdown()


def _post(client: "httpx.Client", path: Path, model: str | None = None) -> dict:
    r = client.post("/predict", content=path.read_bytes(), headers={"content-type": "image/png"},
                    params={"model": model} if model else None)
    assert r.status_code == 200, (path, r.text)
    return r.json()


def test_export_of_a_sweep_the_probe_wins_serves_through_raycyto_predict_and_predict(exported, endpoint, tmp_path):
    from raycyto.analysis.load import load_experiment
    from raycyto.analysis.report import write_report
    from raycyto.analysis.tables import resolve_rule, select_best

    exp = load_experiment(exported.exp)
    assert str(resolve_rule(exp)) == "brier+1se"   # the default rule
    best = select_best(exp)
    assert best["trial_id"] == PROBE and bool(best["baseline"]) and best["head"] == "probe", best.to_dict()
    html = write_report(exported.exp, tmp_path / "report").read_text()
    assert "No trained head beats the linear probe beyond noise" in html
    summary = pd.read_csv(tmp_path / "report" / "summary.csv")
    assert summary.loc[summary["best"].astype(bool), "trial_id"].tolist() == [PROBE]

    meta = exported.meta
    assert meta["head"] == "probe" and meta["trial_id"] == PROBE and meta["name"].endswith("-probe")
    assert meta["selection"]["trial_id"] == PROBE and meta["selection"]["rule"] == "brier+1se"
    assert not meta["selection"]["named"]   # chosen by the rule, not by --trial
    assert f"(trial {PROBE}, fold {meta['selection']['fold']}; rule brier+1se)" in exported.stdout

    images = exported.images   # the sweep's 20 images, both classes
    proc = subprocess.run([RAYCYTO, "predict", str(exported.model), *map(str, images)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    offline = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [o["path"] for o in offline] == [str(p) for p in images]   # one JSON per image
    with httpx.Client(base_url=endpoint.url, timeout=120) as c:
        for path, off in zip(images, offline):
            on = _post(c, path)
            assert on["model"]["name"] == meta["name"]
            assert on["label"] == off["label"]
            assert set(on["probabilities"]) == set(meta["class_names"])
            for k in meta["class_names"]:
                assert on["probabilities"][k] == pytest.approx(off["probabilities"][k], abs=1e-6), path
            assert on["prediction_set"] and on["prediction_set"] == off["prediction_set"], path
            assert on["coverage"] == off["coverage"] == COVERAGE
            assert (on["refer"], on["refer_reason"]) == (off["refer"], off["refer_reason"]), path


def _expected(meta: dict, probabilities: dict[str, float], data: bytes) -> list[str]:
    """The prediction set model.json's calibration gives for these probabilities and this image."""
    from raycyto.referral.conformal import ConformalCalibration, image_uniform, prediction_set

    conf = meta["referral"]["conformal"]
    cal = ConformalCalibration.from_json(conf["calibration"])
    names = meta["class_names"]
    members = prediction_set([probabilities[c] for c in names], cal, conf["score"], conf["level"],
                             image_uniform(data))
    return [names[k] for k in members]


def _check_rule(answer_set: list[str], refer: bool, reason: str | None, ood: bool | None) -> bool:
    """refer / refer_reason as rule ``set`` decides them; True when the case is kept."""
    if ood:
        assert refer and reason == OOD
        return False
    by_set = len(answer_set) != 1
    assert refer == by_set and reason == ("set" if by_set else None), (answer_set, refer, reason)
    return not refer


def test_served_sets_are_model_json_sets_and_set_rule_refers_exactly_where_it_says(exported, endpoint):
    import tritonclient.http as th

    meta = exported.meta
    ref = meta["referral"]
    assert ref["rule"] == "set" and ref["set_keep"] == "single"
    assert ref["conformal"]["score"] == "aps" and ref["conformal"]["level"] == COVERAGE
    assert ref["conformal"]["calibration"]["randomized"] is True
    assert ref["calibrated_on"]["split"] == "test" and ref["calibrated_on"]["trial_id"] == PROBE
    assert f"{COVERAGE:g}" in ref["conformal"]["calibration"]["thresholds"]["aps"]   # calibrated for it
    names = meta["class_names"]
    data = {p: p.read_bytes() for p in exported.images}

    kept = 0
    with httpx.Client(base_url=endpoint.url, timeout=120) as c:
        for path, body in data.items():
            a = _post(c, path)
            assert a["rule"] == "set" and a["coverage"] == COVERAGE
            assert a["prediction_set"] == _expected(meta, a["probabilities"], body), path
            kept += _check_rule(a["prediction_set"], a["refer"], a["refer_reason"], a.get(OOD))
    assert kept >= 1, "no in-distribution answer was kept: the check saw only referred cases"

    client = th.InferenceServerClient(url=f"127.0.0.1:{endpoint.port}", network_timeout=120.0)
    paths = list(data)
    oip_kept = 0
    for batch in (paths[:10], paths[10:]):   # several images per request: one uniform each
        inp = th.InferInput("image", [len(batch)], "BYTES")
        inp.set_data_from_numpy(np.array([data[p] for p in batch], dtype=object), binary_data=True)
        res = client.infer(meta["name"], [inp])
        probs = res.as_numpy("probabilities").reshape(len(batch), len(names))
        member = res.as_numpy("prediction_set").reshape(len(batch), len(names))
        refer, reason = res.as_numpy("refer").reshape(-1), res.as_numpy("refer_reason").reshape(-1)
        ood = res.as_numpy(OOD)
        ood = [None] * len(batch) if ood is None else ood.reshape(-1)
        for i, path in enumerate(batch):
            want = _expected(meta, dict(zip(names, probs[i].tolist())), data[path])
            got = [c for c, m in zip(names, member[i]) if m]
            assert sorted(got) == sorted(want), path
            r = reason[i].decode() if isinstance(reason[i], bytes) else str(reason[i])
            oip_kept += _check_rule(got, bool(refer[i]), r or None, None if ood[i] is None else bool(ood[i]))
    assert oip_kept == kept >= 1


def test_set_keep_negative_keeps_only_the_negative_singleton_over_http(exported, endpoint):
    meta = exported.meta
    name = meta["name"] + "-keep-negative"
    negative = next(c for c in meta["class_names"] if c != meta["positive_class"])
    assert endpoint.refused is None, f"an app with a set_keep: negative bundle did not deploy: {endpoint.refused}"
    kept = referred_positive_singletons = 0
    with httpx.Client(base_url=endpoint.url, timeout=120) as c:
        index = {m["name"]: m for m in c.get("/models").json()["models"]}
        assert index[name]["rule"] == "set" and index[name]["coverage"] == COVERAGE
        for path in exported.images:
            a = _post(c, path, name)
            assert a["model"]["name"] == name and "negative class" in a["refer_rule"]
            assert a["prediction_set"] == _expected(meta, a["probabilities"], path.read_bytes()), path
            if a.get(OOD):
                assert a["refer"] and a["refer_reason"] == OOD
                continue
            by_set = a["prediction_set"] != [negative]
            assert a["refer"] == by_set and a["refer_reason"] == ("set" if by_set else None), (path, a)
            kept += not by_set
            referred_positive_singletons += a["prediction_set"] == [meta["positive_class"]]
    assert kept >= 1 and referred_positive_singletons >= 1   # kept negatives; {positive} alone referred
