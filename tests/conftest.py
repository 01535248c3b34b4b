"""Shared fixtures: one small local Ray per test session, tiny synthetic datasets."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from raycyto.serve.ports import free_ports  # noqa: F401  (tests import it from here)

# Tests never download anything; make hub-style loaders fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Serve runs as `raycyto serve` runs it (HAProxy ingress + Ray's high-throughput mode,
# raycyto.serve.app.SERVE_ENV; ray_local gives its HAProxy free ports)
os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
# ... and stops as quickly (raycyto.serve.cli.STOP_ENV): under HAProxy a replica drains for this
# long (30 s by default) before it stops, so serve.shutdown() would pass its own 30 s, the
# controller be killed in the background, and the next module's serve.start reach the dying one
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
# A proxy not ready within 5 s (Serve's default) is killed and serve.start fails with
# ActorDiedError; on a 2-core machine running two test files at once its start-up can take longer
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")
# Under HAProxy every replica listens on a port of its own, which each Ray's controller hands
# out from the bottom of one range (30000-31000 HTTP, 40000-41000 gRPC): two Rays on one machine
# (the two xdist workers; a test's own `serve run`) hand out the same ports, and one Ray's
# HAProxy reached the other's replica (a 401 from the other app's token, a dropped connection).
# Each xdist worker gets a slice of its own, split between its own Ray (and children that
# inherit it), ``serve run`` children and the multi-node clusters of tests/raycluster.py, whose
# killed nodes may leave a replica behind for a while (:func:`direct_ingress_ports`).
PORT_SLICE = 400
PORT_PARTS = {"own": (0, 200), "child": (200, 300), "cluster": (300, 400)}


def direct_ingress_ports(part: str = "own", worker: str | None = None) -> dict[str, str]:
    """Direct-ingress port ranges of this xdist worker's ``part`` of its slice."""
    n = int((worker or os.environ.get("PYTEST_XDIST_WORKER") or "gw0")[2:] or 0)
    lo, hi = (n * PORT_SLICE + x for x in PORT_PARTS[part])
    return {f"RAY_SERVE_DIRECT_INGRESS_{k}_{proto}_PORT": str(base + (lo if k == "MIN" else hi))
            for proto, base in (("HTTP", 30000), ("GRPC", 40000)) for k in ("MIN", "MAX")}


def pytest_configure(config):
    """Before any Ray starts: this worker's port slice (xdist names the worker only here)."""
    worker = getattr(config, "workerinput", {}).get("workerid")
    for k, v in direct_ingress_ports(worker=worker).items():
        if worker or k not in os.environ:  # a worker inherits the controller's setting: replace it
            os.environ[k] = v


def pytest_collection_modifyitems(config, items):
    """Longest test files first. scripts/test.sh runs the suite with ``--dist loadfile
    --no-loadscope-reorder``: xdist hands whole files to its two workers in this order, so the
    long files start at once and the short ones fill in at the end (longest-processing-time
    first) instead of one worker idling while the other runs a late 4-minute file.
    ``tests/durations.json`` holds each file's measured seconds (setup + calls, one run of
    the suite on the 2-core machine); files missing there count as short. Tests keep their
    order within a file."""
    import json

    seconds = json.loads((Path(__file__).parent / "durations.json").read_text())["seconds"]
    items.sort(key=lambda item: -seconds.get(item.nodeid.split("::")[0].rsplit("/", 1)[-1], 0.0))


def free_port() -> int:
    """A TCP port nothing listens on now (for endpoints and Ray job servers in tests)."""
    return free_ports(1)[0]


def pids_naming(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def stop_head(temp_dir: str) -> None:
    """Stop only the processes of the head we started (their command lines name our temp dir);
    ``ray stop`` would also stop every other Ray on this machine."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids_naming(temp_dir):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + 15
        while pids_naming(temp_dir) and time.time() < deadline:
            time.sleep(0.5)


def haproxy_backends(stats_port: int | str) -> set[str]:
    """The backends (Serve apps, ``http-<app>``) of the HAProxy whose stats page is on
    ``stats_port``: proof that a Serve runs behind HAProxy (raycyto.serve.app.SERVE_ENV)."""
    import csv
    import io
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{stats_port}/stats;csv", timeout=10) as r:  # noqa: S310
        rows = csv.DictReader(io.StringIO(r.read().decode().lstrip("# ")))
        return {row["pxname"] for row in rows if row["svname"] == "BACKEND"}


def shutdown_serve(timeout_s: float = 60.0) -> None:
    """``serve.shutdown()``, then wait until its controller is gone: when the controller does not
    stop in Serve's 30 s it is killed in the background, and a ``serve.start`` meanwhile (the next
    module's) would connect to the dying one."""
    import ray
    from ray import serve

    serve.shutdown()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
        except ValueError:
            return
        time.sleep(0.5)


def encode_image(image, ext: str) -> bytes:
    """An RGB uint8 array ``[H, W, 3]`` encoded as ``ext`` (".png", ".jpg", ".tif", ".bmp")."""
    import cv2

    ok, buf = cv2.imencode(ext, image[:, :, ::-1])
    assert ok, ext
    return buf.tobytes()


def tiny_sweep_config(source: str | Path, name: str, size: int = 64, samples: int = 1, **sections) -> dict:
    """The smallest real sweep config: frozen efficientnet_lite0 + head a, 2 folds, 1 epoch,
    random search with batch 8, one trial at a time, 5 MC passes; ``sections`` replace whole
    top-level sections (``grid={...}``, ``storage="file://..."``)."""
    return {
        "name": name,
        "data": {"source": str(source), "positive_class": "abnormal", "image_size": size, "input_size": size},
        "cv": {"folds": 2},
        "grid": {"backbones": ["efficientnet_lite0"], "heads": ["a"]},
        "search": {"algorithm": "random", "samples": samples, "batch_size": [8]},
        "train": {"epochs": 1},
        "resources": {"cpus_per_trial": 1, "max_concurrent": 1},
        "mc": {"passes": 5},
        **sections,
    }


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """2 shared cores: one intra-op torch thread in the test process avoids oversubscription
    stalls (Ray workers and Serve replicas set their own)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with the modest resources of this machine (2 CPUs)."""
    import ray

    if not ray.is_initialized():
        from raycyto.serve.app import serve_env

        serve_env()  # HAProxy's stats / exporter ports: free ones (each xdist worker has a Ray)
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False,
                 log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def karyo_dir(tmp_path_factory) -> Path:
    """10 synthetic patients x 2 karyograms at 96 px."""
    from raycyto.synth import generate

    out = tmp_path_factory.mktemp("karyo")
    generate("karyogram", out, patients=10, per_patient=2, seed=0, size=96, progress=False)
    return out


@pytest.fixture(scope="session")
def leuk_dir(tmp_path_factory) -> Path:
    """10 synthetic patients x 2 blood-smear fields at 64 px."""
    from raycyto.synth import generate

    out = tmp_path_factory.mktemp("leuk")
    generate("leukemia", out, patients=10, per_patient=2, seed=0, size=64, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_experiment(ray_local, karyo_dir, tmp_path_factory) -> Path:
    """EXP_DIR of one tiny real sweep on ``karyo_dir`` (complete per the contract).

    efficientnet_lite0 (pretrained, frozen) x heads a, k; 3 folds; 2 optuna samples per cell
    (4 trials); 2 epochs; 64 px input; 2 karyogram-policy copies; 10 MC passes. One trial
    raises once after its first fold (the ``RAYCYTO_FAIL_ONCE`` test hook; the marker file is
    ``EXP_DIR.parent / "fail_once.marker"``) and is retried from its checkpoint.
    """
    from raycyto.config import load_config
    from raycyto.tune.sweep import run_sweep

    root = tmp_path_factory.mktemp("tiny_experiment")
    cfg = load_config({
        "name": "tiny",
        "data": {"source": str(karyo_dir), "positive_class": "abnormal", "image_size": 64,
                 "input_size": 64, "policy": "karyogram", "copies": 2},
        "cv": {"folds": 3, "val_fraction": 0.2, "seed": 0},
        "grid": {"backbones": ["efficientnet_lite0"], "finetune": ["frozen"], "heads": ["a", "k"]},
        "search": {"algorithm": "optuna", "samples": 2, "lr": [1e-3, 1e-2], "batch_size": [8, 16]},
        "train": {"epochs": 2},
        "resources": {"cpus_per_trial": 1, "max_concurrent": 2, "feature_batch_size": 16},
        "mc": {"passes": 10, "threshold": 0.8},
    })
    os.environ["RAYCYTO_FAIL_ONCE"] = str(root / "fail_once.marker")
    try:
        return run_sweep(cfg, out=root / "exp", progress=False)
    finally:
        os.environ.pop("RAYCYTO_FAIL_ONCE", None)


@pytest.fixture(scope="session")
def serve_bundle(tmp_path_factory) -> Path:
    """A Lite0 + head d karyogram bundle (ImageNet weights, untrained head; 20 MC passes)."""
    from raycyto.models.bundle import save_bundle
    from raycyto.models.classifier import build_classifier

    model = build_classifier("efficientnet_lite0", head="d", num_classes=2, pretrained=True)
    out = tmp_path_factory.mktemp("serve_model")
    save_bundle(out, model, {"class_names": ["normal", "abnormal"], "positive_class": "abnormal",
                             "name": "demo", "mc": {"passes": 20, "threshold": 0.8}})
    return out
