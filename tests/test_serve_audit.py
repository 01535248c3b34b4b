"""The audit trail on a live endpoint: every answer, from /predict and from OIP v2 infer
(tritonclient.http, binary tensors; and JSON with base64 images), leaves one JSONL record with
every field, never the image; an out-of-distribution image's record says so."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")

from conftest import encode_image, free_port  # noqa: E402

from raycyto.referral.policy import OOD_REASON  # noqa: E402
from raycyto.serve.cli import STOP_ENV  # noqa: E402

# The session's Ray stops its ingress replicas as `raycyto serve`'s does (Ray's default holds a
# direct-ingress replica 30 s after serve.shutdown; nothing here needs that). Set at collection,
# before the session's Ray starts; setdefault: a value given in the environment wins.
for _key, _value in STOP_ENV.items():
    os.environ.setdefault(_key, _value)


def _cell(seed: int) -> np.ndarray:
    """A 48 x 48 'blood-smear cell': a purple disc on a pale pink background (the guard's domain)."""
    r = np.random.default_rng(seed)
    yy, xx = np.mgrid[:48, :48]
    img = np.ones((48, 48, 3)) * np.array([230.0, 200.0, 220.0])
    cy, cx, rad = r.uniform(16, 32), r.uniform(16, 32), r.uniform(8, 14)
    img[((yy - cy) ** 2 + (xx - cx) ** 2) < rad ** 2] = np.array([120.0, 60.0, 150.0]) + r.normal(0, 10, 3)
    return np.clip(img + r.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


def _photograph() -> np.ndarray:
    from sklearn.datasets import load_sample_images

    return load_sample_images().images[0][::4, ::4].copy()  # a building, 107 x 160: far from any cell


@pytest.fixture(scope="module")
def guarded(serve_bundle, tmp_path_factory) -> Path:
    """serve_bundle's network (Lite0, head d) at 64 px with a conformal calibration and a
    Mahalanobis OOD guard fitted on 'cells' (what the exported bundles of a sweep carry)."""
    from raycyto.models.bundle import load_bundle, save_bundle
    from raycyto.referral.conformal import calibrate_conformal
    from raycyto.referral.ood import fit_mahalanobis
    from raycyto.serve.predict import LoadedModel, pooled_features

    model, _ = load_bundle(serve_bundle)
    out = tmp_path_factory.mktemp("guarded")
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([2.0, 2.0], size=60)
    cal = calibrate_conformal(probs, (probs[:, 1] > rng.random(60)).astype(int), levels=(0.9,), scores=("aps",))
    meta = {"class_names": ["normal", "abnormal"], "positive_class": "abnormal", "name": "guarded",
            "image_size": 64, "input_size": 64, "mc": {"passes": 8, "threshold": 0.8},
            "referral": {"rule": "vote", "conformal": {"score": "aps", "level": 0.9, "calibration": cal.to_json()}}}
    save_bundle(out, model, meta)
    loaded = LoadedModel(out)  # the served preprocessing and embedding, as the guard sees them
    feats = np.concatenate([pooled_features(np.stack(loaded.embed([_cell(i)]))) for i in range(40)])
    guard = fit_mahalanobis(feats[:24], np.arange(24) % 2, pca_dim=8).calibrate(feats[24:], 0.1)
    far = pooled_features(np.stack(loaded.embed([_photograph()])))
    assert guard.score(far)[0] > guard.threshold > guard.score(feats[24:]).min()
    save_bundle(out, model, meta, guard=guard)
    return out


@pytest.fixture(scope="module")
def endpoint(ray_local, guarded, tmp_path_factory):
    from ray import serve

    from raycyto.serve.app import AppArgs, build_app

    audit = tmp_path_factory.mktemp("audit")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = AppArgs(model_dir=str(guarded), audit_log=str(audit / "audit-{replica}.jsonl"), mc_replicas=1,
                   backbone_num_cpus=0.4, mc_num_cpus=0.2, ingress_num_cpus=0.1, metrics=False)
    serve.run(build_app(args), name="raycyto-audit", route_prefix="/")
    yield f"127.0.0.1:{port}", audit
    serve.shutdown()


def _records(audit: Path) -> list[dict]:
    files = list(audit.glob("audit-*.jsonl"))
    assert len(files) == 1, files
    return [json.loads(line) for line in files[0].read_text().splitlines()]


def test_every_answer_of_predict_and_oip_infer_leaves_one_complete_record(endpoint, guarded):
    import tritonclient.http as th

    from raycyto.serve.audit import FIELDS

    url, audit = endpoint
    sha = hashlib.sha256((guarded / "model.json").read_bytes()).hexdigest()
    cell_png, cell_jpeg = encode_image(_cell(200), ".png"), encode_image(_cell(201), ".jpg")
    photo_png, photo_jpeg = encode_image(_photograph(), ".png"), encode_image(_photograph(), ".jpg")
    photo_bmp = encode_image(_photograph(), ".bmp")
    answers: dict[str, tuple[str, dict]] = {}  # input sha256 -> (route, the answer's fields)
    with httpx.Client(base_url=f"http://{url}", timeout=120) as c:
        for data, kw in ((cell_png, {"files": {"file": ("c.png", cell_png, "image/png")}}),
                         (photo_jpeg, {"content": photo_jpeg, "headers": {"content-type": "image/jpeg"}})):
            r = c.post("/predict", **kw)
            assert r.status_code == 200, r.text
            answers[hashlib.sha256(data).hexdigest()] = ("/predict", r.json())
        doc = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                           "data": [base64.b64encode(photo_bmp).decode()]}]}
        r = c.post("/v2/models/guarded/infer", json=doc)
        assert r.status_code == 200, r.text
        out = {o["name"]: o["data"] for o in r.json()["outputs"]}
        answers[hashlib.sha256(photo_bmp).hexdigest()] = ("/v2/models/{name}/infer", {
            "label": out["label"][0], "refer_reason": out["refer_reason"][0] or None,
            "out_of_distribution": out["out_of_distribution"][0]})
    client = th.InferenceServerClient(url=url, network_timeout=120.0)
    batch = [cell_jpeg, photo_png]
    inp = th.InferInput("image", [len(batch)], "BYTES")
    inp.set_data_from_numpy(np.array(batch, dtype=object))  # binary tensors, the client's default
    result = client.infer("guarded", [inp], model_version="")
    for i, data in enumerate(batch):
        reason = result.as_numpy("refer_reason")[i].decode()
        answers[hashlib.sha256(data).hexdigest()] = ("/v2/models/{name}/infer", {
            "label": result.as_numpy("label")[i].decode(), "confidence": float(result.as_numpy("confidence")[i]),
            "refer": bool(result.as_numpy("refer")[i]), "refer_reason": reason or None,
            "out_of_distribution": bool(result.as_numpy("out_of_distribution")[i]),
            "ood_score": float(result.as_numpy("ood_score")[i])})

    records = _records(audit)
    assert len(records) == len(answers) == 5, records   # one line per answered image, no more
    by_input = {r["input_sha256"]: r for r in records}
    assert set(by_input) == set(answers)
    for key, (route, answer) in answers.items():
        rec = by_input[key]
        assert tuple(rec) == FIELDS, rec   # every field, in order, on every record
        assert rec["route"] == route and rec["time"].endswith("Z") and rec["latency_ms"] > 0
        assert (rec["model"], rec["model_sha256"], rec["version"]) == ("guarded", sha, sha[:12])
        assert rec["passes"] == 8 and rec["rule"] == "confidence < 0.8"
        assert isinstance(rec["prediction_set"], list) and rec["prediction_set"], rec   # the bundle has sets
        assert isinstance(rec["ood_score"], float) and isinstance(rec["out_of_distribution"], bool)
        for k, v in answer.items():   # what the client was told ("rule": in words; "model": name)
            if k in FIELDS and k not in ("rule", "model"):
                assert rec[k] == (pytest.approx(v) if isinstance(v, float) else v), (k, rec, answer)
    photos = [hashlib.sha256(d).hexdigest() for d in (photo_jpeg, photo_png, photo_bmp)]
    for key in photos:   # the done-when: an OOD image's record
        rec = by_input[key]
        assert rec["refer"] and rec["refer_reason"] == OOD_REASON and rec["out_of_distribution"], rec
    for key in {hashlib.sha256(d).hexdigest() for d in (cell_png, cell_jpeg)}:
        assert by_input[key]["out_of_distribution"] is False and by_input[key]["refer_reason"] != OOD_REASON

    raw = next(audit.glob("audit-*.jsonl")).read_bytes()   # never the image, in any encoding
    for data in (cell_png, cell_jpeg, photo_png, photo_jpeg, photo_bmp):
        assert data[64:96] not in raw and base64.b64encode(data[60:120])[:40] not in raw
    assert all(len(line) < 800 for line in raw.splitlines())


def test_a_record_has_every_field_even_without_a_guard_or_a_set(tmp_path):
    from raycyto.serve.api import ServedModel
    from raycyto.serve.audit import FIELDS, AuditLog

    log = AuditLog(str(tmp_path / "a.jsonl"))
    m = ServedModel("k", "m", "v1", "a" * 64, ("x", "y"), 64, 10, 0.8)
    log.write(m, "0" * 64, {"label": "x", "confidence": 0.9, "refer": False, "refer_reason": None,
                            "threshold": 0.8, "passes": 10}, route="/predict", latency_ms=3.21)
    log.close()
    (rec,) = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert tuple(rec) == FIELDS and rec["latency_ms"] == 3.21
    assert rec["prediction_set"] is None and rec["out_of_distribution"] is None and rec["ood_score"] is None
