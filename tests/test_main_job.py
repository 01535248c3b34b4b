"""``raycyto run``, the main job, end to end in its own process on a tiny config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml
from conftest import free_port

TINY = {
    "name": "tiny-main",
    "data": {"source": "synthetic",
             "synthetic": {"task": "karyogram", "patients": 8, "per_patient": 2, "seed": 0, "size": 96,
                           "abnormal_fraction": 0.5},
             "positive_class": "abnormal", "image_size": 96, "input_size": 32, "policy": "karyogram",
             "copies": 1},
    "cv": {"folds": 2, "val_fraction": 0.25, "seed": 0},
    "grid": {"backbones": ["efficientnet_lite0"], "finetune": ["frozen"], "heads": ["d"]},
    "search": {"algorithm": "random", "samples": 1, "batch_size": [8]},
    "train": {"epochs": 1},
    "resources": {"cpus_per_trial": 1, "max_concurrent": 1},
    "mc": {"passes": 5, "threshold": 0.8},
}



def test_raycyto_run_makes_every_output_and_the_endpoint_answers(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "out"
    raycyto = Path(sys.executable).parent / "raycyto"
    env = {**os.environ, "RAYCYTO_NUM_CPUS": "2", "COLUMNS": "200"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([str(raycyto), "run", "--config", str(config), "--out", str(out),
                           "--port", str(free_port())], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    manifest = pd.read_csv(out / "data" / "manifest.csv")
    assert len(manifest) == 16
    test = pd.read_parquet(out / "experiment" / "predictions.parquet").query("split == 'test'")
    assert len(test.query("head == 'd'")) == 16  # every image is a test image once
    assert len(test.query("head == 'probe'")) == 16  # and the linear probe beside it
    assert (out / "report" / "report.html").is_file() and (out / "report" / "summary.csv").is_file()
    assert (out / "model" / "model.json").is_file()

    rows = [line for line in log.splitlines() if line.startswith("│")]
    answered = [r for r in rows if "│ 200 " in r]
    assert len(answered) == 2 and any("│ abnormal │ 200" in r for r in answered), "\n".join(rows)
    assert "broken.png (truncated): HTTP 400" in log
    for name in ("report", "model"):
        assert str(out / name) in log
    closing = [r for r in rows if r.startswith("│ exported") or r.startswith("│ baseline")]
    assert len(closing) == 2 and closing[0].startswith("│ exported") and "frozen/probe" in closing[1], "\n".join(rows)
    # the rule may export the probe on 16 images; the main job then says so
    assert ("frozen/probe" in closing[0]) == ("no trained head beats the linear probe" in log), "\n".join(rows)
    serve_hint = next(line for line in log.splitlines() if "serve it:" in line)
    assert str(raycyto) in serve_hint or str(raycyto.relative_to(tmp_path)) in serve_hint or " raycyto serve" in serve_hint
    assert "graceful_shutdown failed" not in log and "Traceback" not in log
