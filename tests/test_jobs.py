"""Ray Jobs: ``ray job submit`` of a tiny sweep against a local ``ray start --head`` (token auth on);
jobs/*.py are the typer commands themselves (same options as ``raycyto sweep|report|export``), and
every command the README, cluster.yaml and the RayJob print is one those commands accept."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import free_ports, stop_head, tiny_sweep_config

from raycyto.analysis.load import read_csv

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
RAYCYTO = str(Path(sys.executable).with_name("raycyto"))
JOBS = {"sweep.py": "sweep", "report.py": "report", "export.py": "export"}  # jobs/X.py -> raycyto X


def _command(name: str):
    """The click command behind ``raycyto NAME``."""
    import typer

    from raycyto.cli import app

    return typer.main.get_command(app).commands[name]


@pytest.fixture(scope="module")
def job_experiment(karyo_dir, tmp_path_factory) -> Path:
    """EXP_DIR of a tiny sweep run as the README's recipe runs it: ``ray job submit -- python
    jobs/sweep.py`` against a ``ray start --head`` of its own (token auth on)."""
    root = tmp_path_factory.mktemp("job")
    config = root / "job.yaml"
    config.write_text(yaml.safe_dump(tiny_sweep_config(karyo_dir, "job")))
    out = root / "exp"
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
        stop_head(temp_dir)
    return out


@pytest.mark.slow
def test_ray_job_submit_runs_a_tiny_sweep_against_ray_start_head(job_experiment):
    out = job_experiment
    results = read_csv(out / "results.csv")
    assert results["baseline"].astype(bool).tolist() == [False, True]  # the trial, then the probe
    assert results["status"].eq("TERMINATED").all()
    assert (out / "predictions.parquet").is_file() and (out / "checkpoints").is_dir()


@pytest.mark.slow
def test_report_and_export_jobs_run_on_the_jobs_experiment(job_experiment, tmp_path):
    """The README's next two jobs, as plain processes on the experiment the sweep job wrote
    (``python jobs/export.py EXP_DIR --out DIR`` once ended in a TypeError: its argparse copy of
    the CLI had drifted)."""
    for argv, made in ((["jobs/report.py", str(job_experiment), "--out", str(tmp_path / "report"), "--quiet"],
                        tmp_path / "report" / "report.html"),
                       (["jobs/export.py", str(job_experiment), "--out", str(tmp_path / "model")],
                        tmp_path / "model" / "model.json")):
        proc = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (argv, (proc.stdout + proc.stderr)[-4000:])
        assert made.is_file(), (argv, proc.stdout + proc.stderr)
    assert "exported" in proc.stdout and str(tmp_path / "model") in proc.stdout


def _help(argv: list[str]) -> str:
    env = {**os.environ, "COLUMNS": "150", "TERM": "dumb"}
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("script", sorted(JOBS))
def test_job_entrypoint_is_its_typer_command(script):
    """``python jobs/X.py --help`` is ``raycyto X --help`` (same text, same options), so the job
    entry points cannot drift from the CLI; a flag the command lacks exits 2 without running."""
    name = JOBS[script]
    shown = _help([sys.executable, f"jobs/{script}", "--help"])
    assert shown == _help([RAYCYTO, name, "--help"])
    flags = set(re.findall(r"(?m)^\W? ?(--[a-z][a-z-]*)", shown))  # the first column of the options table
    cmd = _command(name)
    assert flags == {o for p in cmd.params for o in p.opts if o.startswith("--")} | {"--help"}, flags
    for param in cmd.params:
        if param.param_type_name == "argument":
            assert param.name in shown.lower(), param.name
    bad = subprocess.run([sys.executable, f"jobs/{script}", "--no-such-flag"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "no-such-flag" in bad.stderr, bad.stderr


def test_job_entrypoints_show_help_without_importing_ray():
    for script in JOBS:
        proc = subprocess.run([sys.executable, "-X", "importtime", str(REPO / "jobs" / script), "--help"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "usage" in proc.stdout.lower(), proc.stderr
        imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
        assert not {m for m in imported if m == "ray" or m.startswith(("ray.", "torch"))}, script


def _job_commands(text: str) -> list[tuple[str, list[str]]]:
    """``(command, args)`` of every ``python [.../]jobs/X.py ARGS`` and every line-leading
    ``raycyto sweep|report|export ARGS`` (line-leading, or after ``ray job submit ... --``) in ``text`` (up to a closing backtick; comment markers
    stripped, ``\\`` continuations joined)."""
    text = re.sub(r"(?m)^\s*#", "", text).replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        for match in re.finditer(r"python \S*jobs/(\w+\.py)\b([^`]*)", line):
            found.append((JOBS[match.group(1)], shlex.split(match.group(2), comments=True)))
        for match in re.finditer(r"(?:^\s*|\s--\s+)raycyto (sweep|report|export)\b([^`]*)", line):
            found.append((match.group(1), shlex.split(match.group(2), comments=True)))
    return found


def _accepted(name: str, args: list[str]) -> None:
    import typer

    try:
        _command(name).make_context(f"raycyto {name}", list(args))  # parses and converts; runs nothing
    except typer.TyperException as exc:  # typer's own click: a usage error, a bad parameter
        raise AssertionError(f"raycyto {name} {shlex.join(args)}: {exc.format_message()}") from None


def test_every_printed_cluster_command_is_one_the_cli_accepts():
    """The README's cluster recipe, cluster.yaml's and the RayJob's commands, and the jobs'
    own docstrings: every ``jobs/X.py`` (or ``raycyto X``) command line parses as ``raycyto X``."""
    readme = (REPO / "README.md").read_text()
    submits = [line for line in re.sub(r"\\\n", " ", readme).splitlines() if "ray job submit" in line]
    recipe = _job_commands("\n".join(submits))
    assert sorted(name for name, _ in recipe) == ["export", "report", "sweep"], recipe
    rayjob = (REPO / "kubernetes" / "rayjob-sweep.yaml").read_text()
    cluster = (REPO / "cluster.yaml").read_text()
    commands = [*recipe, *_job_commands(yaml.safe_load(rayjob)["spec"]["entrypoint"]),
                *(c for text in (rayjob, cluster) for c in _job_commands(  # the YAML files' comments
                    "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#")))),
                *(c for script in JOBS for c in _job_commands((REPO / "jobs" / script).read_text()))]
    assert len(commands) >= 8, commands
    for name, args in commands:
        _accepted(name, args)
    with pytest.raises(AssertionError, match="--best"):  # the drifted flag of the old jobs/export.py
        _accepted("export", ["EXP_DIR", "--best", "auc"])
