"""`raycyto serve` as a user runs it, in its own process and Ray: quiet, behind HAProxy, and
usable by tritonclient.http with the client's defaults."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")

from conftest import free_ports, haproxy_backends  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from raycyto.models.bundle import save_bundle
    from raycyto.models.classifier import build_classifier

    out = tmp_path_factory.mktemp("cli_model")
    model = build_classifier("efficientnet_lite0", head="d", num_classes=2, pretrained=True)
    save_bundle(out, model, {"class_names": ["normal", "abnormal"], "name": "demo", "input_size": 64,
                             "mc": {"passes": 10}})
    return out


def test_raycyto_serve_is_quiet_and_answers_tritonclient_with_its_defaults(bundle, tmp_path):
    import cv2
    import tritonclient.http as th

    from raycyto.serve.app import HAPROXY_PORT_ENV

    port, stats = free_ports(2)
    out = tmp_path / "terminal.txt"
    with out.open("wb") as term:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "raycyto"), "serve", str(bundle), "--port", str(port),
             "--num-cpus", "2", "--mc-replicas", "1"],
            stdout=term, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
            env={**os.environ, "RAY_ADDRESS": "local", HAPROXY_PORT_ENV[0]: str(stats)})  # a user's stats port
        try:
            deadline = time.monotonic() + 300  # waits on the "ready" line itself; generous for a loaded CI box
            while "ready:" not in out.read_text():
                assert proc.poll() is None, out.read_text()[-3000:]
                assert time.monotonic() < deadline, "never ready:\n" + out.read_text()[-3000:]
                time.sleep(1)
            at_start = out.read_text().splitlines()

            client = th.InferenceServerClient(url=f"127.0.0.1:{port}", network_timeout=120.0)
            assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("demo")
            assert client.get_model_metadata("demo")["inputs"][0]["datatype"] == "BYTES"
            png = cv2.imencode(".png", (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))[1]
            for _ in range(5):
                inp = th.InferInput("image", [1], "BYTES")
                inp.set_data_from_numpy(np.array([png.tobytes()], dtype=object))
                result = client.infer("demo", [inp])  # the client's defaults: binary in and out
                assert result.as_numpy("label")[0] in (b"normal", b"abnormal")
            assert result.get_response()["parameters"]["passes"] == [10]
            assert "http-raycyto" in haproxy_backends(stats)  # it serves behind HAProxy (SERVE_ENV)
            time.sleep(2)  # give stray per-request lines time to show up
            after = out.read_text().splitlines()
        finally:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    ready = [line for line in at_start if line.startswith("ready:")]
    assert ready and f"127.0.0.1:{port}/predict" in ready[0]
    assert any(line.startswith("metrics: http://") for line in at_start), at_start
    assert len(at_start) <= 4, at_start  # ready + metrics (+ Ray's one token-auth notice)
    assert not [line for line in at_start if " INFO " in line or "(ServeReplica" in line], at_start
    assert len(after) - len(at_start) <= 5, after[len(at_start):]  # at most one line per request
