"""Ray Jobs: ``ray job submit`` of a tiny sweep against a local ``ray start --head`` (token auth on)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import free_ports, tiny_sweep_config

from raycyto.analysis.load import read_csv

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))



def _pids_naming(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _stop_head(temp_dir: str) -> None:
    """Stop only the processes of the head we started (their command lines name our temp dir);
    ``ray stop`` would also stop every other Ray on this machine."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _pids_naming(temp_dir):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + 15
        while _pids_naming(temp_dir) and time.time() < deadline:
            time.sleep(0.5)


@pytest.mark.slow
def test_ray_job_submit_runs_a_tiny_sweep_against_ray_start_head(karyo_dir, tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(tiny_sweep_config(karyo_dir, "job")))
    out = tmp_path / "exp"
    # short: Ray's socket paths are length-limited. `ray start --temp-dir` writes its address to
    # <temp_dir>/ray_current_cluster, not /tmp/ray/, so a plain ray.init() in the other xdist
    # worker starts its own Ray instead of joining this cluster: the test runs in parallel.
    temp_dir = tempfile.mkdtemp(prefix="rcj", dir="/tmp")
    # every fixed default port gets a free one (other Rays on this machine hold the defaults),
    # all distinct: one port handed out twice fails `ray start`
    names = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
             "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")
    gcs, dash, *free = free_ports(2 + len(names))
    ports = [f"--{name}={port}" for name, port in zip(names, free)]
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # an activated venv
    env.pop("RAY_ADDRESS", None)
    try:
        subprocess.run([RAY, "start", "--head", "--num-cpus=2", f"--port={gcs}", "--include-dashboard=true",
                        f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}",
                        "--disable-usage-stats", *ports], env=env, check=True, capture_output=True, timeout=120)
        submit = [RAY, "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", str(REPO),
                  "--", "python", "jobs/sweep.py", "--config", str(config), "--out", str(out), "--quiet"]
        for _ in range(30):  # the head's job agent may need a few seconds after `ray start`
            job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600)
            if "No available agent" not in job.stdout + job.stderr:
                break
            time.sleep(3)
        assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
        assert "succeeded" in (job.stdout + job.stderr).lower()
    finally:
        _stop_head(temp_dir)
    results = read_csv(out / "results.csv")
    assert results["baseline"].astype(bool).tolist() == [False, True]  # the trial, then the probe
    assert results["status"].eq("TERMINATED").all()
    assert (out / "predictions.parquet").is_file() and (out / "checkpoints").is_dir()


def test_job_entrypoints_show_help_without_importing_ray():
    for script in ("sweep.py", "report.py", "export.py"):
        proc = subprocess.run([sys.executable, str(REPO / "jobs" / script), "--help"], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0 and "usage" in proc.stdout, proc.stderr
