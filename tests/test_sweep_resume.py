"""``raycyto sweep --resume`` after an interrupted (SIGINT) sweep re-runs nothing finished."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml
from conftest import tiny_sweep_config

from raycyto.analysis.load import read_csv
from raycyto.tune.search import read_search_log
from raycyto.tune.trainable import read_events

SAMPLES = 3


@pytest.mark.slow
def test_resume_after_sigint_reruns_no_finished_trial(ray_local, karyo_dir, tmp_path):
    from raycyto.tune.sweep import resume_sweep

    config = tmp_path / "resume.yaml"
    config.write_text(yaml.safe_dump(tiny_sweep_config(karyo_dir, "resume", samples=SAMPLES)))
    exp = tmp_path / "exp"
    gate = tmp_path / "gate"  # trials that start after the first has finished wait for this file
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token",
           "RAYCYTO_HOLD": f"{gate}:1"}
    proc = subprocess.Popen([sys.executable, "-m", "raycyto.cli", "sweep", "--config", str(config),
                             "--out", str(exp), "--quiet"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not read_search_log(exp / "search_log.jsonl") and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # Tune saves its state and stops the running trials
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    finished = {r["trial_id"] for r in read_search_log(exp / "search_log.jsonl")}
    assert len(finished) == 1, "the hold hook keeps every later trial unfinished until the gate opens"

    gate.touch()
    resume_sweep(exp, progress=False)

    results = read_csv(exp / "results.csv")
    results = results[~results["baseline"].astype(bool)]  # the probe row is refitted, not a trial
    assert len(results) == SAMPLES and (results["status"] == "TERMINATED").all()
    assert (results["folds_done"] == 2).all()
    for tid in finished:  # finished before the interrupt: started once, never again
        assert [e["event"] for e in read_events(exp, tid)].count("start") == 1
    log = read_search_log(exp / "search_log.jsonl")
    assert sorted(r["trial_id"] for r in log) == sorted(results["trial_id"])  # each trial completes once
    preds = pd.read_parquet(exp / "predictions.parquet")
    assert preds.groupby(["trial_id", "split"]).size().loc[(slice(None), "test")].eq(
        json.loads((exp / "experiment.json").read_text())["data"]["n_images"]).all()
