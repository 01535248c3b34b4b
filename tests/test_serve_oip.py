"""Several models on one real Serve endpoint (serve_configs/main_jobs.yaml's args), used by
real clients: NVIDIA's tritonclient.http (binary and JSON tensors), schemathesis from
/openapi.json, a Prometheus scrape of Ray's metrics agent, and the JSONL audit log."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import re
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

httpx = pytest.importorskip("httpx")

from conftest import encode_image, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "oip-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
KARYO, SMEAR = "karyogram-demo", "leukemia-demo"


@dataclass
class Served:
    url: str
    port: int
    bundles: dict[str, Path]  # "karyo", "karyo2", "smear"
    audit: Path
    png: bytes
    jpeg: bytes

    def client(self, token: str | None = TOKEN) -> "httpx.Client":
        return httpx.Client(base_url=self.url, timeout=60,
                            headers={"Authorization": f"Bearer {token}"} if token else {})


@pytest.fixture(scope="module")
def served(ray_local, tmp_path_factory):
    import torch
    from ray import serve

    from raycyto.models.bundle import save_bundle
    from raycyto.models.classifier import build_classifier
    from raycyto.serve.app import AppArgs, build_app

    root = tmp_path_factory.mktemp("oip")
    specs = {"karyo": (KARYO, ["normal", "abnormal"]), "karyo2": (KARYO, ["normal", "abnormal"]),
             "smear": (SMEAR, ["ALL", "AML", "CLL", "CML", "HLT"])}
    bundles = {}
    for i, (key, (name, classes)) in enumerate(specs.items()):
        model = build_classifier("efficientnet_lite0", head="d", num_classes=len(classes), pretrained=True)
        with torch.no_grad():  # different head weights -> a different sha256 per bundle
            list(model.parameters())[-1].add_(0.05 * i)
        save_bundle(root / key, model, {"class_names": classes, "name": name, "input_size": 64,
                                        "mc": {"passes": 12, "threshold": 0.8}})
        bundles[key] = root / key
    (root / "token").write_text(TOKEN)
    doc = yaml.safe_load((ROOT / "serve_configs" / "main_jobs.yaml").read_text())
    (app,) = doc["applications"]
    args = dict(app["args"])
    assert [m["model_dir"] for m in args["models"]] == ["runs/demo/model", "runs/leukemia/model"]
    args["models"] = [{"model_dir": str(bundles["karyo"])}, {"model_dir": str(bundles["smear"])},
                      {"model_dir": str(bundles["karyo2"]), "version": "v2"}]  # a new karyogram version
    args.update(auth_token_file=str(root / "token"), audit_log=str(root / "audit" / "audit-{replica}.jsonl"),
                backbone_num_cpus=0.4, mc_num_cpus=0.2, ingress_num_cpus=0.1)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(AppArgs.model_validate(args)), name="raycyto-oip", route_prefix="/")
    image = (np.random.default_rng(3).random((40, 56, 3)) * 255).astype(np.uint8)
    yield Served(f"http://127.0.0.1:{port}", port, bundles, root / "audit", encode_image(image, ".png"),
                 encode_image(image, ".jpg"))
    serve.shutdown()  # the next module starts Serve on its own port


def _sha(bundle: Path) -> str:
    return hashlib.sha256((bundle / "model.json").read_bytes()).hexdigest()


# ------------------------------------------------------------------------ several models


def test_each_model_and_version_answers_with_its_own_sha256(served):
    shas = {k: _sha(p) for k, p in served.bundles.items()}
    assert len(set(shas.values())) == 3
    with served.client() as c:
        index = c.get("/models").json()["models"]
        assert [(m["name"], m["sha256"]) for m in index] == [
            (KARYO, shas["karyo"]), (SMEAR, shas["smear"]), (KARYO, shas["karyo2"])]
        assert [m["version"] for m in index] == [shas["karyo"][:12], shas["smear"][:12], "v2"]
        assert [m["default"] for m in index] == [False, True, True]  # the last listed version of a name
        for m in index:
            r = c.post("/predict", params={"model": m["name"], "version": m["version"], "passes": 8},
                       content=served.png, headers={"content-type": "image/png"})
            assert r.status_code == 200, r.text
            assert r.json()["model"] == {"name": m["name"], "version": m["version"], "sha256": m["sha256"]}
            assert set(r.json()["probabilities"]) == set(m["class_names"])
            oip = c.post(f"/v2/models/{m['name']}/versions/{m['version']}/infer", json={
                "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                            "data": [base64.b64encode(served.png).decode()]}]}).json()
            assert oip["parameters"]["sha256"] == m["sha256"] and oip["model_version"] == m["version"]
        first = c.post("/predict", content=served.png, headers={"content-type": "image/png"}).json()
        assert first["model"]["sha256"] == shas["karyo"]  # /predict alone: the first model listed
        latest = c.get(f"/v2/models/{KARYO}").json()
        assert latest["versions"] == [shas["karyo"][:12], "v2"] and latest["parameters"]["sha256"] == shas["karyo2"]
        assert c.get(f"/v2/models/{SMEAR}/ready").json()["ready"] is True
        assert c.get(f"/v2/models/{KARYO}/versions/v9").status_code == 404
        assert c.post("/predict", params={"model": "nope"}, content=served.png,
                      headers={"content-type": "image/png"}).status_code == 404


# ------------------------------------------------------------------------ tritonclient


def _triton(served):
    """A tritonclient.http client. Pass it ``headers=dict(AUTH)``: the client adds its
    Inference-Header-Content-Length to the dict it is given, which would leak into later calls."""
    import tritonclient.http as th

    return th, th.InferenceServerClient(url=f"127.0.0.1:{served.port}", network_timeout=120.0)


def test_tritonclient_health_metadata_and_infer_binary_and_json(served):
    th, client = _triton(served)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(SMEAR, headers=dict(AUTH))
    assert "binary_tensor_data" in client.get_server_metadata(headers=dict(AUTH))["extensions"]
    meta = client.get_model_metadata(SMEAR, headers=dict(AUTH))
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert {o["name"] for o in meta["outputs"]} >= {"label", "confidence", "refer", "probabilities"}
    assert {(m["name"], m["state"]) for m in client.get_model_repository_index(headers=dict(AUTH))} == {
        (KARYO, "READY"), (SMEAR, "READY")}

    def infer(data: bytes, binary: bool, **kw):
        inp = th.InferInput("image", [1], "BYTES")
        value = data if binary else base64.b64encode(data)  # JSON BYTES are strings: base64 text
        inp.set_data_from_numpy(np.array([value], dtype=object), binary_data=binary)
        return client.infer(SMEAR, [inp], headers=dict(AUTH), parameters={"passes": 16, "seed": 3}, **kw)

    answers = {}
    for fmt, data in (("png", served.png), ("jpeg", served.jpeg)):
        binary = infer(data, True)  # the client's defaults: binary input, all outputs binary
        outputs = [th.InferRequestedOutput(n, binary_data=False) for n in ("label", "confidence", "probabilities")]
        as_json = infer(data, False, outputs=outputs)
        assert binary.get_response()["outputs"][0]["parameters"]["binary_data_size"] > 0
        assert "data" in as_json.get_response()["outputs"][0]
        label = binary.as_numpy("label")
        assert label.shape == (1,) and label[0].decode() in ("ALL", "AML", "CLL", "CML", "HLT")
        assert binary.as_numpy("probabilities").shape == (1, 5) and binary.as_numpy("refer").dtype == bool
        assert binary.as_numpy("probabilities").sum() == pytest.approx(1.0, abs=1e-5)
        assert as_json.as_numpy("label")[0] == label[0].decode()
        assert as_json.as_numpy("confidence")[0] == binary.as_numpy("confidence")[0]
        np.testing.assert_allclose(as_json.as_numpy("probabilities").reshape(1, 5),
                                   binary.as_numpy("probabilities"), atol=1e-12)
        answers[fmt] = binary.as_numpy("confidence")[0]
    with served.client() as c:  # the same seed over /predict gives the same number
        r = c.post("/predict", params={"model": SMEAR, "passes": 16, "seed": 3}, content=served.png,
                   headers={"content-type": "image/png"}).json()
    assert r["confidence"] == answers["png"]


def test_tritonclient_sees_a_4xx_with_a_message_for_a_bad_image(served):
    from tritonclient.utils import InferenceServerException

    th, client = _triton(served)
    for bad, binary in ((b"certainly not an image", True), (served.png[:40], True),
                        (base64.b64encode(b"GIF89a" + bytes(40)), False)):
        inp = th.InferInput("image", [1], "BYTES")
        inp.set_data_from_numpy(np.array([bad], dtype=object), binary_data=binary)
        with pytest.raises(InferenceServerException) as e:
            client.infer(SMEAR, [inp], headers=dict(AUTH))
        assert e.value.status() in ("400", "415"), (e.value.status(), e.value.message())
        assert "inputs[0]" in e.value.message() and len(e.value.message()) > 20
    with pytest.raises(InferenceServerException) as e:
        client.infer("no-such-model", [inp], headers=dict(AUTH))
    assert e.value.status() == "404" and SMEAR in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata(SMEAR)  # no token
    assert e.value.status() == "401"


def _binary_body(header: dict, items: list[bytes]) -> tuple[bytes, dict]:
    blob = b"".join(struct.pack("<I", len(b)) + b for b in items)
    header = json.loads(json.dumps(header).replace('"SIZE"', str(len(blob))))
    head = json.dumps(header).encode()
    return head + blob, {"Inference-Header-Content-Length": str(len(head))}


def test_no_infer_body_of_any_shape_gets_a_5xx(served):
    """Hand-made OIP bodies around the binary extension, incl. the raw body that used to 500."""
    good = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": "SIZE"}}]}
    body, hdr = _binary_body(good, [served.png])
    cases: list[tuple[bytes, dict]] = [
        (body, {}),  # binary body without the header: the UnicodeDecodeError 500 of issue 13
        (served.png, {}), (served.png, {"content-type": "application/json"}),
        (body, {"Inference-Header-Content-Length": "-5"}), (body, {"Inference-Header-Content-Length": "x"}),
        (body, {"Inference-Header-Content-Length": str(len(body) + 10)}),
        (body, {"Inference-Header-Content-Length": "3"}), (body, {"Inference-Header-Content-Length": "0"}),
        (body[:-10], hdr),  # element shorter than its length prefix
        (body + b"\x01\x02", hdr),  # stray bytes after the tensor
        (body + struct.pack("<I", 2**31) + b"x", hdr),
        _binary_body({**good, "inputs": [{**good["inputs"][0], "shape": [2]}]}, [served.png]),
        _binary_body({**good, "inputs": [{**good["inputs"][0], "datatype": "FP32"}]}, [served.png]),
        _binary_body({**good, "inputs": [{**good["inputs"][0], "name": "pixels"}]}, [served.png]),
        _binary_body({**good, "inputs": [{**good["inputs"][0], "data": ["x"]}]}, [served.png]),
        _binary_body({**good, "outputs": [{"name": "nope"}]}, [served.png]),
        _binary_body(good, [b""]), _binary_body(good, [b"\xff" * 64]),
        (b"\x89PNG" + bytes(range(256)), {"Inference-Header-Content-Length": "4"}),
        (gzip.compress(b"{not json"), {"content-encoding": "gzip"}),
        (b"garbage", {"content-encoding": "gzip"}), (b"x", {"content-encoding": "br"}),
        (gzip.compress(b" " * (3 * 1024 * 1024) + b"{}"), {"content-encoding": "gzip"}),  # inflates past the limit
        (b"", {}), (b"null", {}), (b'{"inputs": [{"name": "image", "shape": [1e99], "datatype": "BYTES"}]}', {}),
        (json.dumps({"inputs": [{"name": "image", "shape": [-1], "datatype": "BYTES", "data": []}]}).encode(), {}),
        (json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [["a", ["b"]]]}],
                     "parameters": "x"}).encode(), {}),
    ]
    bad = []
    with served.client() as c:
        for content, headers in cases:
            r = c.post(f"/v2/models/{SMEAR}/infer", content=content, headers=headers)
            if not 400 <= r.status_code < 500 or not r.json().get("message"):
                bad.append((headers, content[:60], r.status_code, r.text[:200]))
        ok = c.post(f"/v2/models/{SMEAR}/infer", content=body, headers=hdr)
        zipped = c.post(f"/v2/models/{SMEAR}/infer", content=gzip.compress(body),
                        headers={**hdr, "content-encoding": "gzip"})
    assert not bad, bad
    assert ok.status_code == 200 and zipped.status_code == 200, (ok.text, zipped.text)


# ------------------------------------------------------------------------ auth, fuzzing


def _fill(path: str) -> str:
    return path.replace("{name}", SMEAR).replace("{version}", "v2")


def test_auth_covers_every_model_route(served):
    """Every route in /openapi.json except liveness/readiness answers 401 without the token."""
    open_routes = {("/v2/health/live", "get"), ("/v2/health/ready", "get")}
    with served.client(token=None) as anon, served.client(token="wrong") as wrong:
        paths = anon.get("/openapi.json").json()["paths"]
        checked = []
        for path, item in paths.items():
            for method in item:
                if (path, method) in open_routes:
                    assert anon.request(method, path).status_code == 200
                    continue
                for c in (anon, wrong):
                    r = c.request(method, _fill(path), content=served.png, headers={"content-type": "image/png"})
                    assert r.status_code == 401, (method, path, r.status_code, r.text)
                checked.append(path)
    assert {"/predict", "/models", "/v2", "/v2/repository/index", "/v2/models/{name}",
            "/v2/models/{name}/ready", "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}",
            "/v2/models/{name}/versions/{version}/ready", "/v2/models/{name}/versions/{version}/infer"} <= set(checked)


def test_openapi_documents_errors_and_model_names_for_the_fuzzer(served):
    with served.client(token=None) as c:
        spec = c.get("/openapi.json").json()
    for path, item in spec["paths"].items():
        for method, op in item.items():
            codes = {int(k) for k in op["responses"] if k.isdigit()}
            assert codes - {200, 422} or path.startswith("/v2/health/live"), (method, path, codes)
    infer = spec["paths"]["/v2/models/{name}/infer"]["post"]
    (name,) = [p for p in infer["parameters"] if p["name"] == "name"]
    assert name["schema"]["enum"] == [KARYO, SMEAR]
    assert {"400", "401", "404", "413", "415", "422", "503"} <= set(infer["responses"])
    example = infer["requestBody"]["content"]["application/json"]["example"]
    with served.client() as c:  # the documented example really works
        assert c.post(f"/v2/models/{KARYO}/infer", json=example).status_code == 200


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(served, tmp_path):
    exe = Path(sys.executable).parent / "schemathesis"
    t0 = time.monotonic()
    proc = subprocess.run(
        [str(exe), "run", f"{served.url}/openapi.json", "--checks", "not_a_server_error",
         "--max-examples", "25", "--max-time", "60", "--seed", "13", "--workers", "1",
         "--request-timeout", "30", "-H", f"Authorization: Bearer {TOKEN}", "--no-shrink",
         "--report", "ndjson", "--report-dir", str(tmp_path), "--suppress-health-check", "all"],
        capture_output=True, text=True, timeout=180, cwd=tmp_path)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert elapsed < 150, elapsed
    events = (tmp_path / next(p.name for p in tmp_path.glob("*.ndjson"))).read_text()
    # the fuzzer reached inference: some generated infer requests were answered 200
    assert re.search(r'/v2/models/\{name\}[^"]*/infer', events) and '"status_code": 200' in events.replace(
        '"status_code":200', '"status_code": 200')


# ------------------------------------------------------------------------ metrics, audit


def _metrics_url() -> str:
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    return f"http://127.0.0.1:{port}/metrics"


def _scrape(name: str, **tags: str) -> float:
    """Sum of a metric's samples whose tags include ``tags`` (0 when absent)."""
    text = httpx.get(_metrics_url(), timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in tags.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_increase_after_requests(served):
    probes = {  # (metric, tags) -> how much the requests below must add at least
        ("ray_raycyto_requests_total", (("route", "/predict"), ("status", "200"), ("model", SMEAR))): 3,
        ("ray_raycyto_requests_total", (("route", "/predict"), ("status", "415"))): 1,
        ("ray_raycyto_predictions_total", (("model", SMEAR),)): 3,
        ("ray_raycyto_mc_passes_total", (("model", SMEAR),)): 3 * 7,
        ("ray_raycyto_request_latency_ms_count", (("route", "/predict"), ("model", SMEAR))): 3,
        ("ray_raycyto_batch_size_count", (("model", SMEAR),)): 1,
        ("ray_raycyto_referral_rate", (("model", SMEAR),)): 0,  # present (a gauge may go either way)
    }
    before = {k: _scrape(k[0], **dict(k[1])) for k in probes}
    with served.client() as c:
        for _ in range(3):
            assert c.post("/predict", params={"model": SMEAR, "passes": 7}, content=served.png,
                          headers={"content-type": "image/png"}).status_code == 200
        assert c.post("/predict", content=b"GIF89a" + bytes(30), headers={"content-type": "image/png"}).status_code == 415
    deadline = time.monotonic() + 120  # Ray's agent takes the replicas' reports every few seconds
    while True:
        now = {k: _scrape(k[0], **dict(k[1])) for k in probes}
        short = {k[0]: (before[k], now[k]) for k, need in probes.items()
                 if now[k] - before[k] < need or (need == 0 and f"{k[0]}{{" not in httpx.get(_metrics_url()).text)}
        if not short:
            break
        assert time.monotonic() < deadline, f"metrics did not increase: {short}"
        time.sleep(2)


def test_audit_log_records_answers_never_the_image(served):
    with served.client() as c:
        r = c.post("/predict", params={"model": KARYO, "version": "v2", "passes": 5}, content=served.jpeg,
                   headers={"content-type": "image/jpeg"}).json()
    files = list(served.audit.glob("audit-*.jsonl"))
    assert len(files) == 1, files
    records = [json.loads(line) for line in files[0].read_text().splitlines()]
    mine = [x for x in records if x["input_sha256"] == hashlib.sha256(served.jpeg).hexdigest()
            and x["version"] == "v2"]
    assert mine, records[-3:]
    rec = mine[-1]
    assert rec["model_sha256"] == _sha(served.bundles["karyo2"]) and rec["model"] == KARYO
    assert (rec["label"], rec["confidence"], rec["refer"]) == (r["label"], r["confidence"], r["refer"])
    assert rec["rule"] and rec["time"].endswith("Z") and rec["route"] == "/predict"
    # every field (tests/test_serve_audit.py); these bundles have no set and no guard
    assert (rec["prediction_set"], rec["out_of_distribution"], rec["ood_score"]) == (None, None, None)
    assert rec["refer_reason"] == r["refer_reason"] and rec["latency_ms"] > 0
    text = files[0].read_text()   # one short line per answer (~500 characters with the longest route)
    assert base64.b64encode(served.jpeg[:60]).decode()[:40] not in text and len(text) < 700 * len(records)


def test_audit_log_rotates_by_size(tmp_path):
    from raycyto.serve.api import ServedModel
    from raycyto.serve.audit import AuditLog

    m = ServedModel("k", "m", "v1", "a" * 64, ("x", "y"), 64, 10, 0.8)
    log = AuditLog(str(tmp_path / "a-{replica}.jsonl"), max_bytes=2048, backups=2, replica="r1")
    for i in range(60):
        log.write(m, f"{i:064x}", {"label": "x", "confidence": 0.9, "refer": False, "threshold": 0.8, "passes": 10})
    log.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["a-r1.jsonl", "a-r1.jsonl.1", "a-r1.jsonl.2"]
    assert all(p.stat().st_size <= 2048 for p in tmp_path.iterdir())
    last = json.loads((tmp_path / "a-r1.jsonl").read_text().splitlines()[-1])
    assert last["input_sha256"] == f"{59:064x}" and last["rule"] == "confidence < 0.8"
