"""`raycyto monitor` and Serve's drift gauge on a real exported bundle.

A small real karyogram sweep (40 patients x 2 images at 64 px, 2 folds, 1 epoch) is exported:
the bundle stores its validation reference (its own answers on the exported fold's test
images). Fresh patients of the same generator (another seed: images the model never saw) are
answered by ``LocalPredictor`` (the endpoint's code) and written by the real audit writer, as
they are, re-saved as JPEG at quality 30, blurred, with another stain (colour cast), with
another contrast (:data:`SHIFTED`), and as blood smears (another task). The clean log raises no alarm; every
shifted one does. ``benchmarks/drift_monitor.py`` measures the false-alarm rate.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

RAYCYTO = str(Path(sys.executable).with_name("raycyto"))
WINDOW = ["--window", "40", "--min-window", "20"]


def _png(image: np.ndarray) -> bytes:
    import cv2

    return cv2.imencode(".png", np.ascontiguousarray(image[:, :, ::-1]))[1].tobytes()


def _jpeg30(image: np.ndarray) -> bytes:
    import cv2

    return cv2.imencode(".jpg", np.ascontiguousarray(image[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 30])[1].tobytes()


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _blur(image: np.ndarray) -> bytes:
    import cv2

    return _png(cv2.GaussianBlur(image, (0, 0), 1.5))


def _stain(image: np.ndarray) -> bytes:
    return _png(_u8(image.astype(np.float32) * np.array([1.2, 0.85, 1.1], np.float32)))


def _contrast(image: np.ndarray) -> bytes:
    x = image.astype(np.float32)
    return _png(_u8((x - x.mean()) * 0.6 + x.mean()))


SHIFTED = {"jpeg_q30": _jpeg30, "blur": _blur, "stain": _stain, "contrast": _contrast}
"""Fixed, clearly visible shifts of the 64 px test images: JPEG quality 30, Gaussian blur sigma 1.5 px,
a magenta stain cast (RGB gains 1.2 / 0.85 / 1.1), contrast x0.6. This small 1-epoch probe is far less
sensitive than the main jobs' models, which the registry's milder families (``raycyto.data.shift``)
already alarm in ``benchmarks/drift_monitor.py``."""


@dataclass
class Monitored:
    model: Path
    meta: dict
    logs: dict[str, Path]           # set name -> audit log
    results: dict[str, list[dict]]  # set name -> /predict answers
    served: object                  # its ServedModel


def _images(folder: Path) -> list[np.ndarray]:
    from raycyto.data.decode import load_image

    return [load_image(str(p)) for p in sorted(folder.glob("*/*.png"))]


@pytest.fixture(scope="module")
def monitored(ray_local, tmp_path_factory) -> Monitored:
    from conftest import tiny_sweep_config

    from raycyto.config import load_config
    from raycyto.export.core import export_model
    from raycyto.serve.api import ServedModel
    from raycyto.serve.audit import AuditLog
    from raycyto.serve.predict import LocalPredictor
    from raycyto.synth import generate
    from raycyto.tune.sweep import run_sweep

    root = tmp_path_factory.mktemp("monitor")
    generate("karyogram", root / "data", patients=40, per_patient=2, seed=1, size=64, progress=False)
    cfg = tiny_sweep_config(root / "data", "monitor", cv={"folds": 2, "val_fraction": 0.3, "seed": 0})
    model = Path(export_model(run_sweep(load_config(cfg), out=root / "exp", progress=False), root / "model"))
    generate("karyogram", root / "fresh", patients=40, per_patient=2, seed=2, size=64, progress=False)
    generate("leukemia", root / "smears", patients=40, per_patient=2, seed=2, size=64, progress=False)
    rng = np.random.default_rng(0)  # served images come in no particular order
    fresh, smears = ([x[i] for i in rng.permutation(len(x))] for x in (_images(root / "fresh"), _images(root / "smears")))
    sets = {"clean": [_png(x) for x in fresh], **{k: [f(x) for x in fresh] for k, f in SHIFTED.items()},
            "other_task": [_png(x) for x in smears]}
    predictor = LocalPredictor(model)
    m = predictor.model
    served = ServedModel(key=str(model), name=m.name, version="v1", sha256=m.sha256,
                         class_names=tuple(m.class_names), input_size=64, passes=m.default_passes,
                         threshold=m.default_threshold)
    logs, results = {}, {}
    for name, files in sets.items():
        log = AuditLog(str(root / "logs" / f"{name}.jsonl"))
        results[name] = []
        for data in files:
            r = predictor.predict_bytes(data)
            log.write(served, hashlib.sha256(data).hexdigest(), r, route="/predict", latency_ms=1.0)
            results[name].append(r)
        log.close()
        logs[name] = log.path
    return Monitored(model, json.loads((model / "model.json").read_text()), logs, results, served)


def _monitor(*args: str):
    from raycyto.cli import app

    return CliRunner().invoke(app, ["monitor", *map(str, args)])


def test_export_stores_the_validation_reference(monitored):
    import pandas as pd

    ref, sel = monitored.meta["reference"], monitored.meta["selection"]
    p = pd.read_parquet(Path(sel["source"]) / "predictions.parquet")
    test = p[(p["trial_id"] == sel["trial_id"]) & (p["fold"] == sel["fold"]) & (p["split"] == "test")]
    assert ref["n"] == test["path"].nunique() >= 20
    assert f"test images of trial {sel['trial_id']} fold {sel['fold']}" in ref["source"]
    assert sum(ref["class_counts"].values()) == ref["n"] and set(ref["class_counts"]) <= {"normal", "abnormal"}
    assert len(ref["confidence"]) == len(ref["ood_score"]) == ref["n"] == ref["ood_n"]
    assert ref["confidence"] == sorted(ref["confidence"]) and ref["passes"] == monitored.meta["mc"]["passes"]
    assert ref["rule"].startswith("confidence <") and 0 <= ref["referred"] <= ref["n"]
    assert len(json.dumps(ref)) < 4000  # small
    # the same numbers Serve gives: the bundle's own answers to those files
    from raycyto.monitor.drift import answer_of, reference_json
    from raycyto.serve.predict import LocalPredictor

    predictor = LocalPredictor(monitored.model)
    again = reference_json([answer_of(predictor.predict_bytes(Path(x).read_bytes()))
                            for x in sorted(set(test["path"]))], ref["source"])
    assert again == ref


def test_clean_answers_raise_no_alarm(monitored):
    proc = subprocess.run([RAYCYTO, "monitor", str(monitored.logs["clean"]), "--model", str(monitored.model),
                           *WINDOW], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "verdict: no drift in 2 window(s), 80 answers" in out, out
    assert "bound: alarm when p < alpha / m = 0.05 / 10 = 0.005" in out, out   # 5 statistics x 2 windows
    for statistic in ("class_mix", "referral_rate", "ood_rate", "confidence", "ood_score"):
        assert out.count(statistic) == 2, (statistic, out)
    assert "DRIFT" not in out


@pytest.mark.parametrize("shift", [*SHIFTED, "other_task"])
def test_shifted_answers_raise_the_alarm_once_per_window(monitored, shift):
    r = _monitor(monitored.logs[shift], "--model", monitored.model, *WINDOW)
    assert r.exit_code == 1, r.output
    assert r.output.count("ALARM window") == 2, r.output                   # once per window
    assert "verdict: DRIFT in 2 of 2 windows" in r.output, r.output


def test_json_report_and_filters(monitored, tmp_path):
    log = tmp_path / "mixed.jsonl"
    clean = monitored.logs["clean"].read_text().splitlines()
    other = [json.dumps({**json.loads(x), "model_sha256": "0" * 64, "model": "other"})
             for x in monitored.logs["other_task"].read_text().splitlines()]
    lines = [*clean[:30], "not json {", json.dumps({"time": "x"}), *other, *clean[30:],
             json.dumps({**json.loads(clean[0]), "confidence": 1.7})]
    log.write_text("\n".join(lines) + "\n")
    r = _monitor(log, "--model", monitored.model, *WINDOW, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["answers"] == 80 and not rep["drift"] and len(rep["windows"]) == 2
    assert rep["skipped"] == {f"other version v1 (sha256 {'0' * 12})": 80}
    assert [m.split(": ", 1)[0].rsplit(":", 1)[1] for m in rep["malformed"]] == ["31", "32", str(len(lines))]
    assert "not JSON" in rep["malformed"][0] and "'model'" in rep["malformed"][1] and "'confidence'" in rep["malformed"][2]
    assert {c["statistic"] for c in rep["windows"][0]["checks"]} == {"class_mix", "referral_rate", "ood_rate",
                                                                     "confidence", "ood_score"}
    assert _monitor(log, "--model", monitored.model, "--version", "v2").exit_code == 2   # no such version
    r = _monitor(log, "--model", monitored.model, "--model-name", monitored.meta["name"], "--version", "v1",
                 "--window", "80")
    assert r.exit_code == 0 and "verdict: no drift in 1 window(s), 80 answers" in r.output, r.output


def test_bad_input_exits_2_with_a_clear_message(monitored, serve_bundle, tmp_path):
    r = _monitor(tmp_path / "missing.jsonl", "--model", monitored.model)
    assert r.exit_code == 2 and "missing.jsonl does not exist" in r.output
    r = _monitor(monitored.logs["clean"], "--model", serve_bundle)             # exported without a reference
    assert r.exit_code == 2 and "no validation reference" in r.output and "re-export" in r.output, r.output
    r = _monitor(monitored.logs["clean"], "--model", tmp_path)                 # no bundle at all
    assert r.exit_code == 2 and "model.json" in r.output
    r = _monitor(monitored.logs["clean"], "--model", monitored.model, "--min-window", "100", "--window", "100")
    assert r.exit_code == 2 and "fewer than --min-window 100" in r.output


def test_served_under_another_rule_or_passes_those_statistics_are_not_tested(monitored):
    from raycyto.monitor.drift import Sample, compare, reference_of

    ref = reference_of(monitored.meta)
    answers = [json.loads(x) for x in monitored.logs["clean"].read_text().splitlines()]
    checks = {c.statistic: c for c in compare(Sample.from_answers(
        [{**a, "rule": "confidence < 0.5", "passes": 7} for a in answers]), ref)}
    assert not checks["referral_rate"].tested and "confidence < 0.5" in checks["referral_rate"].note
    assert not checks["confidence"].tested and "[7] MC passes" in checks["confidence"].note
    assert checks["class_mix"].tested and checks["ood_score"].tested


def test_drift_watch_is_quiet_on_clean_answers_and_loud_on_another_task(monitored):
    from raycyto.monitor.drift import DriftWatch, answer_of, load_reference

    ref = load_reference(str(monitored.model), monitored.served.sha256)
    levels = {}
    for name in ("clean", "other_task"):
        watch = DriftWatch(ref, window=40, every=40)
        out = [watch.add(answer_of(r)) for r in monitored.results[name][:40]]
        assert out[:-1] == [None] * 39
        levels[name] = out[-1]
    assert levels["clean"]["window"] < -math.log10(0.05) < levels["other_task"]["window"], levels
    assert set(levels["other_task"]) == {"class_mix", "referral_rate", "ood_rate", "confidence", "ood_score",
                                         "window"}


def _scrape(name: str, **tags: str) -> float | None:
    import httpx
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in tags.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_serve_metrics_export_the_drift_gauge(monitored):
    """ServeMetrics (the ingress replica's metrics object) with the real Ray metrics agent: 200
    answers of blood smears to the karyogram model set raycyto_drift{statistic="window"} high."""
    from raycyto.serve.metrics import DRIFT_WINDOW, ServeMetrics

    metrics = ServeMetrics()
    smears = monitored.results["other_task"]
    for i in range(DRIFT_WINDOW):
        metrics.prediction(monitored.served, smears[i % len(smears)])
    tags = {"model": monitored.served.name, "version": "v1"}
    deadline = time.monotonic() + 60  # the agent takes reports every few seconds
    while (value := _scrape("ray_raycyto_drift", statistic="window", **tags)) is None:
        assert time.monotonic() < deadline, "ray_raycyto_drift not exported"
        time.sleep(2)
    assert value > 3, value
    assert _scrape("ray_raycyto_drift", statistic="ood_score", **tags) > 3
