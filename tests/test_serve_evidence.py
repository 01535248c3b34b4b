"""Evidence on the live endpoint (issue 22, item 2): a karyogram bundle with a map head answers
/predict and OIP infer with the same top-3 chromosomes and evidence map as LocalPredictor, through
the local host (inline) and the remote one (Backbone), with or without fan-out; explain=true adds
the overlay PNG; a pooled head (Grad-CAM) explains itself only when asked."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

httpx = pytest.importorskip("httpx")

from conftest import encode_image, free_port, shutdown_serve  # noqa: E402

ROUTES = ("/inline", "/hop")  # the Ingress's own Engine; the Backbone deployment (inline: false)


@pytest.fixture(scope="module")
def karyo_bundle(tmp_path_factory) -> Path:
    """Lite0 + map head s (4 x 4 cells at 64 px) of a synthetic-karyogram bundle: the built-in layout."""
    from raycyto.evidence.layout import karyogram_layout, write_to_bundle
    from raycyto.models.bundle import save_bundle
    from raycyto.models.classifier import build_classifier

    model = build_classifier("efficientnet_lite0", head="s", num_classes=2, pretrained=True,
                             head_kwargs={"grid": (4, 4)})
    out = tmp_path_factory.mktemp("karyo_model")
    save_bundle(out, model, {"class_names": ["normal", "abnormal"], "positive_class": "abnormal",
                             "name": "karyo", "input_size": 64, "mc": {"passes": 12, "threshold": 0.8},
                             "config": {"data": {"source": "synthetic", "synthetic": {"task": "karyogram"}}}})
    write_to_bundle(out, karyogram_layout())  # as raycyto export stores it
    return out


@pytest.fixture(scope="module")
def url(ray_local, karyo_bundle, serve_bundle):
    from ray import serve

    from raycyto.serve.app import AppArgs, build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    small = dict(models=[{"model_dir": str(karyo_bundle)}, {"model_dir": str(serve_bundle)}], mc_replicas=2,
                 mc_num_cpus=0.1, ingress_num_cpus=0.1, backbone_num_cpus=0.3)
    for route in ROUTES:
        serve.run(build_app(AppArgs(inline=route == "/inline", **small)), name=f"evidence{route.replace('/', '-')}",
                  route_prefix=route)
    yield f"http://127.0.0.1:{port}"
    shutdown_serve()


@pytest.fixture(scope="module")
def png() -> bytes:
    return encode_image((np.random.default_rng(3).random((64, 64, 3)) * 255).astype(np.uint8), ".png")


@pytest.mark.parametrize("route", ROUTES)
def test_live_evidence_is_local_predictors_through_either_host(url, route, karyo_bundle, png):
    from raycyto.serve.predict import LocalPredictor

    local = LocalPredictor(karyo_bundle, mc_replicas=2).predict_bytes(png)
    assert [set(e) for e in local["evidence"]] == [{"chromosome", "score"}] * 3
    with httpx.Client(base_url=url + route, timeout=120) as c:
        answers = [c.post("/predict", content=png, headers={"content-type": "image/png"}, params=p)
                   for p in ({"model": "karyo"}, {"model": "karyo", "fan_out": 2})]  # one hop; embed + MC heads
        index = c.get("/models").json()["models"]
    for r in answers:
        assert r.status_code == 200, r.text
        body = r.json()
        assert [e["chromosome"] for e in body["evidence"]] == [e["chromosome"] for e in local["evidence"]]
        np.testing.assert_allclose([e["score"] for e in body["evidence"]], [e["score"] for e in local["evidence"]],
                                   atol=1e-4)
        np.testing.assert_allclose(body["evidence_map"]["share"], local["evidence_map"]["share"], atol=1e-5)
        assert "overlay_png" not in body  # only with explain=true
    assert answers[1].json()["replicas"]["chunks"] == 2
    rows = {m["name"]: m for m in index}
    assert rows["karyo"]["chromosome_evidence"] and rows["karyo"]["evidence"] == "every answer"
    assert not rows["demo"]["chromosome_evidence"] and rows["demo"]["evidence"] == "explain=true"


@pytest.mark.parametrize("route", ROUTES)
def test_explain_adds_the_overlay_and_gradcam_evidence_only_when_asked(url, route, png):
    with httpx.Client(base_url=url + route, timeout=120) as c:
        karyo = c.post("/predict", files={"file": ("k.png", png, "image/png")}, data={"explain": "true"},
                       params={"model": "karyo"})  # explain as a form field
        plain = c.post("/predict", content=png, headers={"content-type": "image/png"}, params={"model": "demo"})
        asked = c.post("/predict", content=png, headers={"content-type": "image/png"},
                       params={"model": "demo", "explain": "true"})
    for r in (karyo, plain, asked):
        assert r.status_code == 200, r.text
    overlay = cv2.imdecode(np.frombuffer(base64.b64decode(karyo.json()["overlay_png"]), np.uint8), cv2.IMREAD_COLOR)
    assert overlay is not None and overlay.shape[:2] == (64, 64)
    assert len(karyo.json()["evidence"]) == 3
    assert not {"evidence", "evidence_map", "overlay_png"} & set(plain.json())  # Grad-CAM: only on explain
    body = asked.json()
    assert body["evidence_map"]["method"] == "gradcam" and "overlay_png" in body
    assert "evidence" not in body  # no chromosome layout in that bundle
    assert body["probabilities"] == plain.json()["probabilities"]  # the explanation changes no number


def test_oip_infer_returns_the_evidence_row_and_the_overlay_on_explain(url, png, karyo_bundle):
    from raycyto.serve.predict import LocalPredictor

    local = LocalPredictor(karyo_bundle, mc_replicas=2).predict_bytes(png)
    image = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(png).decode()]}
    with httpx.Client(base_url=f"{url}/hop", timeout=120) as c:
        metadata = c.get("/v2/models/karyo").json()
        plain = c.post("/v2/models/karyo/infer", json={"inputs": [image]})
        explained = c.post("/v2/models/karyo/infer", json={"inputs": [image], "parameters": {"explain": True},
                                           "outputs": [{"name": "overlay_png"}, {"name": "evidence"}]})
    assert {"evidence", "overlay_png"} <= {o["name"] for o in metadata["outputs"]}
    assert plain.status_code == 200 and explained.status_code == 200, (plain.text, explained.text)
    rows = {o["name"]: o for o in plain.json()["outputs"]}
    assert "overlay_png" not in rows  # not asked to explain
    (evidence,) = rows["evidence"]["data"]
    assert [e["chromosome"] for e in json.loads(evidence)] == [e["chromosome"] for e in local["evidence"]]
    rows = {o["name"]: o for o in explained.json()["outputs"]}
    assert cv2.imdecode(np.frombuffer(base64.b64decode(rows["overlay_png"]["data"][0]), np.uint8),
                        cv2.IMREAD_COLOR).shape[:2] == (64, 64)
