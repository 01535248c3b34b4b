"""The script to run the moment a GPU is lent: CUDA paths of raycyto in a few minutes, one table.

Checks (one table row each, with its figure and, where it has a criterion, PASS / FAIL):

1. **training parity**: the real ``run_sweep`` on a tiny synthetic karyogram set (Lite0 frozen at
   64 px, head d, 2 folds, 2 epochs, 4 random-search samples) once with ``gpus_per_trial: 0``
   (CPU trials, CPU feature actor) and once with ``gpus_per_trial: 0.25`` (CUDA trials, CUDA
   feature actor), same seeds; the per-trial metrics of results.csv are compared trial by trial
   (matched on head, lr, batch size). Criterion: every |val_loss / test_loss difference| <=
   ``LOSS_TOL``. Accuracy and AUC differences are printed too but not gated: cuDNN's TF32
   convolutions move features by ~1e-3 and 16 test images per fold move accuracy in steps of
   1/16. With ``--cpu`` both runs are CPU runs, so the row checks run-to-run determinism.
2. **four 0.25-GPU trials at once**: the CUDA run's 4 trials each hold 0.25 of GPU 0 and wait at
   their start until all 4 have started (the sweep's ``RAYCYTO_BARRIER`` hook); from the trials'
   event files (start and last-event times) the row gives how many ran at the same time and for
   how long. Criterion: 4 at once, each on GPU id 0 (and on ``cuda`` where torch sees a GPU).
   With ``--cpu`` Ray is given one logical GPU (as tests/test_sweep_gpu_scheduling.py does), so
   the scheduling is real and the training runs on the CPU.
3. **images/s per study backbone**, fp32 and bf16 autocast: forward passes (``torch.inference_mode``)
   of VGG16, InceptionV3, ResNeXt101-32x8d, SENet154 and EfficientNet-Lite0/1/2 with random
   weights at each backbone's registry input size, channels-last, batch ``--batch`` (default
   64), warm-up passes first, timed between ``torch.cuda.synchronize()`` calls. Criterion: the
   outputs are finite. fp32 is PyTorch's default (cuDNN may use TF32 for convolutions).
   ``--cpu``: batch 1, one timed pass, 64 px (75 for InceptionV3): a smoke test, not a figure.
4. **Serve latency at T=100**: the CUDA run's best trained trial exported with
   ``raycyto.export.core.export_model``, served as ``raycyto serve`` serves it (``build_app``,
   inline ingress that holds the model; ``backbone_num_gpus: 1`` on a GPU, so the replica's
   ``worker_device()`` is ``cuda``), one karyogram posted to ``/predict?passes=100`` ``--requests``
   times after a warm-up; p50. Criterion: every answer 200 with 100 passes (on a GPU, also: the
   replica process holds a CUDA context, per ``nvidia-smi``).

Each phase runs in its own process under a timeout (on a GPU: sweeps + Serve 330 s, throughput
120 s; about 7.5 min at most in all, under the 8 minutes a device check may take), so a hung
phase fails its rows instead of the script. Progress goes to stderr, the table to stdout, every
figure to ``OUT/gpu_check.json`` (``benchmarks/scale_model.py --throughput-json`` reads the
images/s from it). Exit status 1 when a check failed or timed out.

Example:
    bash benchmarks/gpu_check.sh            # on the GPU machine
    bash benchmarks/gpu_check.sh --cpu      # here, < 2 minutes (CI runs it)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import numpy as np

BACKBONES = ("vgg16", "inception_v3", "resnext101_32x8d", "senet154",
             "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
TRIALS = 4                 # 0.25 GPU each: one GPU's worth
LOSS_TOL = 0.01            # parity criterion on val_loss / test_loss (see the module docstring)
PARITY_METRICS = ("val_loss", "test_loss", "val_accuracy", "test_accuracy", "val_auc", "test_auc")
PHASE_TIMEOUT_S = {"gpu": {"sweeps": 330, "throughput": 120}, "cpu": {"sweeps": 300, "throughput": 120}}  # --cpu: ~80 s alone, more beside a test suite
ROW_NAMES = ("training parity", "4 trials x 0.25 GPU", *(f"images/s {b}" for b in BACKBONES),
             "Serve /predict T=100")
T0 = time.time()


def log(msg: str) -> None:
    print(f"[gpu_check {time.time() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _emit(path: Path, **record: Any) -> None:
    """Append one JSON record to a phase's result file (what finished survives a timeout)."""
    with open(path, "a") as f:
        f.write(json.dumps(record, default=float) + "\n")


def _records(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    return {r["check"]: r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip())}


# ----------------------------------------------------------------------------- phase: sweeps + Serve


def sweep_config(source: Path, name: str, gpus: float) -> dict:
    """The tiny sweep both parity runs share; only ``gpus_per_trial`` differs."""
    return {
        "name": name,
        "data": {"source": str(source), "positive_class": "abnormal", "image_size": 64, "input_size": 64},
        "cv": {"folds": 2, "seed": 0},
        "grid": {"backbones": ["efficientnet_lite0"], "finetune": ["frozen"], "heads": ["d"]},
        "search": {"algorithm": "random", "samples": TRIALS, "lr": [1e-3, 1e-2], "batch_size": [8], "seed": 0},
        "train": {"epochs": 2, "precision": "fp32"},
        "resources": {"cpus_per_trial": 1, "gpus_per_trial": gpus, "max_concurrent": TRIALS,
                      "feature_actors": 1, "feature_batch_size": 16},
        "mc": {"passes": 10},
    }


def trained(results: Any) -> Any:
    return results[~results["baseline"].astype(bool)]


def compare_runs(a: Any, b: Any) -> dict:
    """Per-trial metric differences of two results.csv frames, trials matched on (head, lr, batch).

    Returns:
        {"matched": n, "unmatched": [...], "max_abs": {metric: max |a - b|}}.
    """
    key = ["head", "lr", "batch_size"]
    a, b = trained(a).copy(), trained(b).copy()
    for df in (a, b):
        df["lr"] = df["lr"].round(12)
    merged = a.merge(b, on=key, suffixes=("_a", "_b"))
    unmatched = sorted(set(map(tuple, a[key].values)) ^ set(map(tuple, b[key].values)))
    max_abs = {m: float(np.nanmax(np.abs(merged[f"{m}_a"] - merged[f"{m}_b"]))) if len(merged) else float("nan")
               for m in PARITY_METRICS}
    return {"matched": int(len(merged)), "unmatched": [list(u) for u in unmatched], "max_abs": max_abs}


def concurrency(spans: list[tuple[float, float]]) -> tuple[int, float]:
    """Most intervals open at one instant, and how long all of them overlapped (s, 0 if never).

    Args:
        spans: (start, end) per trial.
    """
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    open_, most = 0, 0
    for _, d in events:
        open_ += d
        most = max(most, open_)
    overlap = min(e for _, e in spans) - max(s for s, _ in spans) if spans else 0.0
    return most, max(0.0, overlap)


def _replica_on_gpu() -> Optional[bool]:
    """Whether a Ray Serve replica process holds a CUDA context (nvidia-smi), None without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for pid in out.split():
        try:
            if b"ServeReplica" in Path(f"/proc/{pid.strip()}/cmdline").read_bytes():
                return True
        except OSError:
            continue
    return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def phase_sweeps(out: Path, cpu: bool, requests: int) -> None:
    """Parity runs, the 4-trial concurrency check, export and Serve; records to out/sweeps.jsonl."""
    from raycyto.serve.app import serve_env
    from raycyto.serve.cli import STOP_ENV

    serve_env()  # Serve's high-throughput mode, as `raycyto serve`: before Ray starts
    for key, value in STOP_ENV.items():  # and its short replica drain at shutdown (not Ray's 30 s)
        os.environ.setdefault(key, value)
    import httpx
    import ray
    import torch
    from ray import serve

    from raycyto.analysis.load import read_csv
    from raycyto.config import load_config
    from raycyto.export.core import export_model
    from raycyto.serve.app import AppArgs, build_app
    from raycyto.synth import generate
    from raycyto.tune.sweep import run_sweep
    from raycyto.tune.trainable import read_events

    rec = out / "sweeps.jsonl"
    cuda = torch.cuda.is_available() and not cpu
    ncpu = os.cpu_count() or 2
    # --cpu: one logical GPU and enough logical CPUs for 4 one-CPU trials (2 real cores here)
    ray.init(num_cpus=max(TRIALS + 1, ncpu), num_gpus=1 if not cuda else None, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    log(f"ray up: {ray.cluster_resources()}")
    data = generate("karyogram", out / "data", patients=16, per_patient=2, seed=0, size=64, progress=False)
    runs = {}
    for name, gpus in (("cpu", 0.0), ("gpu", 0.25)):
        t0 = time.time()
        if name == "gpu":  # each trial waits at its start until all 4 have started
            os.environ["RAYCYTO_BARRIER"] = f"{out / 'barrier'}:{TRIALS}"
        try:
            runs[name] = run_sweep(load_config(sweep_config(data, f"gpu-check-{name}", gpus)),
                                   out=out / f"exp_{name}", progress=False)
        finally:
            os.environ.pop("RAYCYTO_BARRIER", None)
        log(f"sweep gpus_per_trial={gpus:g}: {time.time() - t0:.1f}s")
    res = {k: read_csv(v / "results.csv") for k, v in runs.items()}
    cmp = compare_runs(res["cpu"], res["gpu"])
    loss_diff = max(cmp["max_abs"]["val_loss"], cmp["max_abs"]["test_loss"])
    ok = cmp["matched"] == TRIALS and not cmp["unmatched"] and loss_diff <= LOSS_TOL
    other = "cuda" if cuda else "cpu (--cpu: run-to-run determinism)" if cpu else "cpu (no CUDA device)"
    _emit(rec, check="training parity", ok=bool(ok), cuda=cuda, tolerance=LOSS_TOL, **cmp,
          figure=f"cpu vs {other}: {cmp['matched']}/{TRIALS} trials matched; max |d loss| {loss_diff:.2e}, "
                 f"|d acc| {max(cmp['max_abs']['val_accuracy'], cmp['max_abs']['test_accuracy']):.3f}, "
                 f"|d auc| {max(cmp['max_abs']['val_auc'], cmp['max_abs']['test_auc']):.3f}",
          criterion=f"|d val/test loss| <= {LOSS_TOL:g}")

    spans, gpu_ids, devices = [], [], []
    for tid in trained(res["gpu"])["trial_id"]:
        events = read_events(runs["gpu"], tid)
        start = next(e for e in events if e["event"] == "start")
        spans.append((start["time"], max(e["time"] for e in events)))
        gpu_ids.append(start["gpu_ids"])
        devices.append(start["device"])
    most, overlap = concurrency(spans)
    want_device = "cuda" if cuda else "cpu"
    ok = most == TRIALS and all(g == ["0"] for g in gpu_ids) and all(d == want_device for d in devices)
    _emit(rec, check="4 trials x 0.25 GPU", ok=bool(ok), most=most, overlap_s=overlap, gpu_ids=gpu_ids,
          devices=devices, figure=f"{most} at once (all {len(spans)} overlapped {overlap:.1f}s), GPU ids "
                                  f"{sorted({','.join(g) for g in gpu_ids})}, devices {sorted(set(devices))}"
                                  + ("" if cuda else " (logical GPU)"),
          criterion=f"{TRIALS} at once on GPU 0, device {want_device}")

    # Serve: the CUDA run's best trained trial (lowest validation loss), as `raycyto serve` serves it
    best = trained(res["gpu"]).sort_values(["val_loss", "trial_id"]).iloc[0]["trial_id"]
    model_dir = export_model(runs["gpu"], out / "model", trial=str(best))
    log(f"exported trial {best} -> {model_dir}")
    port = _free_port()
    quiet = {"log_level": "WARNING", "enable_access_log": False}
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=quiet)
    args = AppArgs(model_dir=str(model_dir), mc_replicas=1, mc_num_cpus=0.25, ingress_num_cpus=0.25,
                   backbone_num_cpus=1.0, backbone_num_gpus=1.0 if cuda else 0.0)
    serve.run(build_app(args), name="raycyto", route_prefix="/", logging_config=quiet)
    image = sorted((out / "data" / "abnormal").glob("*.png"))[0].read_bytes()
    lat, answers = [], []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
        for i in range(requests + 1):  # the first is the warm-up
            t0 = time.perf_counter()
            r = client.post("/predict", params={"passes": 100}, content=image, headers={"content-type": "image/png"})
            if i:
                lat.append(time.perf_counter() - t0)
            answers.append((r.status_code, r.json().get("passes") if r.status_code == 200 else r.text[:200]))
    on_gpu = _replica_on_gpu() if cuda else None
    errors = _logged_errors([a[1] for a in answers if a[0] != 200])
    serve.shutdown()
    ray.shutdown()
    p50 = float(np.percentile(np.asarray(lat) * 1000, 50))
    ok = all(a == (200, 100) for a in answers) and (on_gpu is not False)
    codes = ", ".join(f"{n} x {c}" for c, n in sorted(Counter(a[0] for a in answers).items()))
    where = ("replica on cuda (nvidia-smi)" if on_gpu else "replica NOT on the GPU" if on_gpu is False else
             "backbone on cuda (nvidia-smi absent)") if cuda else "cpu"
    _emit(rec, check="Serve /predict T=100", ok=bool(ok), p50_ms=p50, latencies_ms=[x * 1000 for x in lat],
          answers=answers, errors=errors, trial=str(best),
          figure=f"p50 {p50:.1f} ms over {requests} requests ({codes}), {where}",
          criterion="200 with passes=100" + (", replica on GPU" if cuda else ""))


def _logged_errors(texts: list[str], lines: int = 40) -> list[str]:
    """The Ray session log lines after each 5xx answer's ``ref`` (raycyto's error id): the
    traceback a failed request left, kept in the phase's record."""
    import ray

    found = []
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for ref in dict.fromkeys(m.group(1) for t in texts if (m := re.search(r"ref ([0-9a-f]+)", str(t)))):
        for path in sorted(logs.rglob("*")):
            if not path.is_file():
                continue
            text = path.read_text(errors="replace").splitlines()
            hits = [i for i, line in enumerate(text) if ref in line]
            if hits:
                found.append(f"{path.name}: " + "\n".join(text[hits[0]:hits[0] + lines]))
                break
    return found[:2]


# ----------------------------------------------------------------------------- phase: throughput


def phase_throughput(out: Path, cpu: bool, batch: int) -> None:
    """fp32 and bf16 forward images/s of every study backbone; records to out/throughput.jsonl."""
    import torch

    from raycyto.device import autocast
    from raycyto.models.registry import build_backbone, get_spec

    rec = out / "throughput.jsonl"
    cuda = torch.cuda.is_available() and not cpu
    device = "cuda" if cuda else "cpu"
    if cuda:
        torch.backends.cudnn.benchmark = True
    warmup, iters = (3, 10) if cuda else (0, 1)
    batch = batch if cuda else 1
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for name in BACKBONES:
        spec = get_spec(name)
        size = spec.input_size if cuda else max(64, spec.min_input_size)  # --cpu: a smoke test
        t_build = time.time()
        model = build_backbone(name, pretrained=False).eval().to(device)
        t_build = time.time() - t_build
        x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        figures, finite = {}, True
        for precision in ("fp32", "bf16"):
            with torch.inference_mode(), autocast(device, precision):
                for _ in range(warmup):
                    model(x)
                sync()
                t0 = time.perf_counter()
                for _ in range(iters):
                    y = model(x)
                sync()
                dt = time.perf_counter() - t0
            finite = finite and bool(torch.isfinite(y.float()).all())
            figures[precision] = batch * iters / dt
        _emit(rec, check=f"images/s {name}", ok=finite, backbone=name, size=size, batch=batch, iters=iters,
              device=device, fp32=figures["fp32"], bf16=figures["bf16"], build_s=t_build,
              figure=f"{size}px fp32 {figures['fp32']:.1f} / bf16 {figures['bf16']:.1f} img/s "
                     f"(x{figures['bf16'] / figures['fp32']:.2f}), batch {batch}, {device}"
                     + ("" if cuda else " (--cpu smoke: batch 1, 1 pass, small input)"),
              criterion="outputs finite")
        log(f"{name}: fp32 {figures['fp32']:.1f} img/s, bf16 {figures['bf16']:.1f} img/s at {size}px")
        del model
        if cuda:
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- driver


def run_phase(phase: str, out: Path, argv: list[str], timeout_s: float) -> Optional[str]:
    """Run one phase in a child process; returns None, or why it did not finish."""
    cmd = [sys.executable, __file__, "--phase", phase, "--out", str(out), *argv]
    log(f"phase {phase} (timeout {timeout_s:.0f}s)")
    t0 = time.time()
    # own session: on a timeout the whole group (Ray's processes included) is stopped
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        return f"timed out after {timeout_s:.0f}s"
    log(f"phase {phase} done in {time.time() - t0:.1f}s (exit {rc})")
    return None if rc == 0 else f"exit status {rc}"


def _stop_group(proc: subprocess.Popen) -> None:
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except OSError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def table(rows: list[dict]) -> str:
    """The one table: check | figure | criterion | result."""
    head = ("check", "figure", "criterion", "result")
    cells = [head] + [(r["check"], r.get("figure", ""), r.get("criterion", ""), r["result"]) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    line = lambda c: " | ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), "-+-".join("-" * w for w in widths)] + [line(c) for c in cells[1:]])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="run here without a GPU (both parity runs on CPU, a "
                                                      "logical GPU for the scheduling, tiny throughput passes)")
    p.add_argument("--out", type=Path, default=None, help="folder for every file (default: a temp folder)")
    p.add_argument("--batch", type=int, default=64, help="throughput batch on the GPU")
    p.add_argument("--requests", type=int, default=5, help="timed /predict requests")
    p.add_argument("--phase", choices=("sweeps", "throughput"), help=argparse.SUPPRESS)
    a = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.phase:
        a.out.mkdir(parents=True, exist_ok=True)
        if a.phase == "sweeps":
            phase_sweeps(a.out, a.cpu, a.requests)
        else:
            phase_throughput(a.out, a.cpu, a.batch)
        return 0

    import torch

    out = a.out or Path(tempfile.mkdtemp(prefix="raycyto_gpu_check_"))
    out.mkdir(parents=True, exist_ok=True)
    mode = "cpu" if a.cpu or not torch.cuda.is_available() else "gpu"
    if mode == "cpu" and not a.cpu:
        log("no CUDA device: running as --cpu")
    argv = (["--cpu"] if mode == "cpu" else []) + ["--batch", str(a.batch), "--requests", str(a.requests)]
    for name in ("sweeps.jsonl", "throughput.jsonl"):
        (out / name).unlink(missing_ok=True)
    failures = {ph: run_phase(ph, out, argv, PHASE_TIMEOUT_S[mode][ph]) for ph in ("throughput", "sweeps")}
    found = {**_records(out / "sweeps.jsonl"), **_records(out / "throughput.jsonl")}
    rows = []
    for check in ROW_NAMES:
        r = dict(found.get(check) or {"check": check, "ok": False})
        if check not in found:
            phase = "throughput" if check.startswith("images/s") else "sweeps"
            r["figure"] = f"not measured: phase {phase} {failures[phase] or 'ended without it'}"
        r["result"] = "PASS" if r["ok"] else "FAIL"
        rows.append(r)
    device = torch.cuda.get_device_name(0) if mode == "gpu" else "CPU (--cpu)"
    summary = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": device, "mode": mode,
               "wall_s": round(time.time() - T0, 1), "rows": rows,
               "throughput": {r["backbone"]: {k: r[k] for k in ("size", "batch", "fp32", "bf16", "device")}
                              for r in rows if "backbone" in r}}
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=float))
    print(f"raycyto gpu_check on {device} ({summary['date']}, {summary['wall_s']:.0f} s; files in {out})")
    print(table(rows))
    failed = [r["check"] for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)}/{len(rows)} checks passed" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
