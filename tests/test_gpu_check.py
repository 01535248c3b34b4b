"""benchmarks/gpu_check.sh --cpu, as CI runs it: every row of the table, all passing, exit 0.

Without a GPU the script checks the same paths on the CPU: run-to-run determinism of the real
sweep, four 0.25-GPU trials at once on a logical GPU, a forward pass of every study backbone in
fp32 and bf16, and a Serve request at T=100 (the module docstring of benchmarks/gpu_check.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
ROWS = ["training parity", "4 trials x 0.25 GPU", "images/s vgg16", "images/s inception_v3",
        "images/s resnext101_32x8d", "images/s senet154", "images/s efficientnet_lite0",
        "images/s efficientnet_lite1", "images/s efficientnet_lite2", "Serve /predict T=100"]


@pytest.mark.slow
def test_gpu_check_cpu_prints_every_row_and_passes(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("check "))
    rows = {line.split("|")[0].strip(): line.split("|")[-1].strip() for line in lines[header + 2:] if "|" in line}
    assert list(rows) == ROWS, proc.stdout
    assert set(rows.values()) == {"PASS"}, proc.stdout
    assert "10/10 checks passed" in proc.stdout
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["mode"] == "cpu" and set(doc["throughput"]) == {r.split()[-1] for r in ROWS if r.startswith("images/s")}
    parity = next(r for r in doc["rows"] if r["check"] == "training parity")
    assert parity["matched"] == 4 and "run-to-run" in parity["figure"]
    sched = next(r for r in doc["rows"] if r["check"] == "4 trials x 0.25 GPU")
    assert sched["most"] == 4 and sched["gpu_ids"] == [["0"]] * 4
    serve = next(r for r in doc["rows"] if r["check"] == "Serve /predict T=100")
    assert all(a == [200, 100] for a in serve["answers"]) and serve["p50_ms"] > 0
