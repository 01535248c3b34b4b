"""The shipped Serve YAMLs, started by the Serve CLI as a user starts them (a file of its own:
two slow end-to-end tests the parallel test phase can run beside the endpoint module)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")

from conftest import direct_ingress_ports, encode_image, free_ports, haproxy_backends  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def model_dir(serve_bundle) -> Path:
    return serve_bundle


# ------------------------------------------------------------------------ the shipped YAMLs, by the Serve CLI


@contextmanager
def _serve_run(doc: dict, model_dir: Path, tmp_path: Path):
    """``serve run`` a Serve YAML document in its own Ray, with the environment the YAMLs'
    comments give (HAProxy ingress); yields the base URL once ready."""
    import os
    import signal
    import subprocess
    import sys

    import yaml

    from raycyto.serve.app import HAPROXY_PORT_ENV, SERVE_ENV

    port, *haproxy = free_ports(1 + len(HAPROXY_PORT_ENV))
    doc["http_options"].update(host="127.0.0.1", port=port)
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(doc))
    # the variables the YAMLs' comments say to export, and HAProxy ports of its own (the
    # session's Ray may hold the default ones)
    env = {**os.environ, **SERVE_ENV, **dict(zip(HAPROXY_PORT_ENV, map(str, haproxy))),
           "RAYCYTO_MODEL_DIR": str(model_dir), "RAY_ADDRESS": "local", **direct_ingress_ports("child")}
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "serve"), "run", str(config)], cwd=tmp_path,
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 240
            while True:
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "never ready:\n" + log_path.read_text()[-3000:]
                try:
                    if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(1)
            assert "http-raycyto" in haproxy_backends(haproxy[0])  # behind HAProxy
            yield url
        finally:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: serve run shuts its app and its Ray down
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _png(seed: int) -> bytes:
    return encode_image((np.random.default_rng(seed).random((40, 40, 3)) * 255).astype(np.uint8), ".png")


def test_serve_run_on_the_shipped_local_yaml_answers_predict(model_dir, tmp_path):
    """`serve run serve_configs/local.yaml`, as a user starts it: only the HTTP port is
    changed (so it cannot clash with anything on 8000); the model comes through the
    documented ``RAYCYTO_MODEL_DIR`` override."""
    import yaml

    doc = yaml.safe_load((ROOT / "serve_configs" / "local.yaml").read_text())
    with _serve_run(doc, model_dir, tmp_path) as url:
        r = httpx.post(f"{url}/predict", files={"file": ("x.png", _png(1), "image/png")}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["label"] in {"normal", "abnormal"} and body["passes"] == 20
        assert httpx.post(f"{url}/predict", content=b"", headers={"content-type": "image/png"},
                          timeout=60).status_code == 400


def test_gpu_cluster_yaml_shape_deploys_on_cpu_and_autoscales_under_load(model_dir, tmp_path):
    """serve_configs/gpu_cluster.yaml with its resources shrunk to this 2-core machine (no
    GPU, fractions of a CPU, a fast autoscaler): the app deploys with ``num_replicas: auto``
    everywhere, keeps auth on, and MCHead grows from 1 replica to 2 under a burst."""
    import concurrent.futures as cf

    import yaml

    doc = yaml.safe_load((ROOT / "serve_configs" / "gpu_cluster.yaml").read_text())
    (app,) = doc["applications"]
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    app["args"].update(auth_token_file=str(token_file), backbone_num_gpus=0)
    app.pop("runtime_env", None)
    fast = {"upscale_delay_s": 0.5, "downscale_delay_s": 600, "look_back_period_s": 1.0, "metrics_interval_s": 0.25}
    for dep in app["deployments"]:
        dep["ray_actor_options"] = {"num_cpus": 0.1, "num_gpus": 0}
        assert dep["num_replicas"] == "auto" and dep["autoscaling_config"]
        dep["autoscaling_config"] = {**dep["autoscaling_config"], "min_replicas": 1, **fast}
    mc = next(d for d in app["deployments"] if d["name"] == "MCHead")
    mc["autoscaling_config"].update(max_replicas=2, target_ongoing_requests=1)

    with _serve_run(doc, model_dir, tmp_path) as url:
        assert httpx.post(f"{url}/predict", content=_png(0), headers={"content-type": "image/png"},
                          timeout=60).status_code == 401  # auth stays on
        one = httpx.post(f"{url}/predict", params={"passes": 8, "fan_out": 1}, content=_png(0), timeout=60,
                         headers={"content-type": "image/png", "Authorization": f"Bearer {TOKEN}"})
        assert one.status_code == 200, one.text  # inline: false: the ingress holds no model, a Backbone
        assert one.json()["replicas"]["chunks"] == 1  # replica embedded it and ran the passes

        def burst(i: int) -> set[str]:
            seen: set[str] = set()
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
                end = time.monotonic() + 300  # generous on a loaded CI box; exits once both replicas answered
                while time.monotonic() < end and len(seen) < 2:
                    r = c.post("/predict", params={"passes": 64, "fan_out": 8}, content=_png(i),
                               headers={"content-type": "image/png"})
                    if r.status_code == 200:
                        seen |= set(r.json()["replicas"]["ids"])
                    time.sleep(0.02)
            return seen

        with cf.ThreadPoolExecutor(6) as pool:
            ids = set().union(*pool.map(burst, range(6)))
    assert len(ids) == 2, f"MCHead answered from {ids}: it never scaled to 2 replicas"
