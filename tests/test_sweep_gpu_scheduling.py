"""GPU scheduling without a GPU: Ray is told it has one logical GPU, so Tune must place two
trials of ``gpus_per_trial: 0.5`` on GPU 0 *at the same time* (fractional sharing), the
feature actor must give the GPU back before they start, and each trial must see its GPU id
and still train on the CPU because torch sees no CUDA device. On a GPU node the same code
trains on ``cuda`` (``raycyto.device.worker_device``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pandas as pd
from conftest import tiny_sweep_config

from raycyto.analysis.load import read_csv
from raycyto.tune.trainable import read_events

SCRIPT = textwrap.dedent("""
    import json, sys, ray
    from raycyto.config import load_config
    from raycyto.tune.sweep import run_sweep

    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    run_sweep(load_config(json.loads(sys.argv[2])), out=sys.argv[1], progress=False)
""")


def test_half_gpu_trials_share_one_gpu_concurrently_and_fall_back_to_cpu(karyo_dir, tmp_path):
    exp = tmp_path / "exp"
    config = tiny_sweep_config(karyo_dir, "gpu-sched", size=32, train={"epochs": 3},
                               grid={"backbones": ["efficientnet_lite0"], "heads": ["a", "d"]},
                               resources={"cpus_per_trial": 1, "gpus_per_trial": 0.5, "max_concurrent": 2})
    env = {**os.environ, "RAYCYTO_BARRIER": f"{tmp_path / 'started'}:2"}  # each trial waits for the other
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(exp), json.dumps(config)], capture_output=True,
                          text=True, timeout=900, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    results = read_csv(exp / "results.csv")
    results = results[~results["baseline"].astype(bool)]  # the probe is fitted by the driver, not a trial
    assert list(results["status"]) == ["TERMINATED", "TERMINATED"]

    spans = []
    for tid in results["trial_id"]:
        events = read_events(exp, tid)
        start = next(e for e in events if e["event"] == "start")
        assert start["gpu_ids"] == ["0"], start  # the one logical GPU, shared
        assert start["device"] == "cpu"  # no CUDA device here: trains on the CPU
        spans.append((start["time"], max(e["time"] for e in events)))
    (a0, a1), (b0, b1) = spans
    # the barrier let neither trial train until both had started: they held the one GPU together
    assert a0 < b1 and b0 < a1, f"the two half-GPU trials never overlapped: {spans}"
    assert len(pd.read_parquet(exp / "predictions.parquet").query("split == 'test' and head != 'probe'")) == 2 * 20
