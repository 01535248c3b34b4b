"""The cluster path on several Ray nodes of this one machine, as a lab's GPU cluster runs it.

A head that takes no work (0 CPUs) and two 1-CPU worker nodes (``tests/raycluster.py``), started
with ``ray start``; object storage from moto's S3 server (the S3 API, with an endpoint set by
``AWS_ENDPOINT_URL`` on every node); raycyto installed in the environment every node runs, as a
cluster image has it, so jobs run without ``--working-dir`` (on one machine the nodes share one
session folder, and a ``--working-dir`` package there vanished under the sweep's driver).

- the README's cluster recipe, line by line: sweep -> report -> export jobs, all SUCCEEDED, the
  same trials, folds, configurations and metrics as a single-node run of the same config;
- ``results.csv`` names the node of every trial; trials ran on both workers, none on the head;
- a worker node SIGKILLed under running trials: the sweep finishes every trial and records the
  restarts;
- ``ray job stop`` halfway, then ``--resume``: finished trials are not run again;
- Serve under a steady load (``serve deploy`` of the exported model: the ingress on the head, two
  Backbone replicas on the workers): the node of a Backbone replica SIGKILLed; no answer but 200
  or 503 with ``Retry-After``, every retried request answered, healthy again within 60 s.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import httpx
import pandas as pd
import pyarrow.fs as pafs
import pytest
import yaml
from conftest import free_port, tiny_sweep_config
from raycluster import BIN, RAY, LocalCluster

from raycyto.analysis.load import read_csv
from raycyto.storage import copy_tree
from raycyto.tune.sweep import STATE_PERIOD_S
from raycyto.tune.trainable import read_events

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BUCKET = "raycyto"
FOLDS = 2
# the README's placeholders -> this test's cluster (the address is the job server's)
README_PATHS = {"/home/ubuntu/raycyto/jobs/configs/leukemia_study.yaml": "{config}",
                "s3://bucket/leukemia/": f"s3://{BUCKET}/data/", "s3://bucket/raycyto": f"s3://{BUCKET}/store",
                "/home/ubuntu/runs": "{runs}", "http://127.0.0.1:8265": "{address}"}


def _wait_port(port: int, timeout_s: float = 60) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on {port}")


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server with a bucket; every process of this module (and every Ray node started
    here) reaches it through the standard AWS variables."""
    port = free_port()
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        _wait_port(port)
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], allow_bucket_creation=True).create_dir(BUCKET)
            yield pafs.FileSystem.from_uri(f"s3://{BUCKET}")[0]  # as raycyto and Tune open it
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster(s3):
    c = LocalCluster().start_head()
    try:
        c.add_worker()
        c.add_worker()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def config(karyo_dir, s3, tmp_path_factory) -> Path:
    """4 trials (heads a, k x 2 random samples), 2 folds, 2 at a time, 1 CPU each; the images in
    the bucket."""
    copy_tree(str(karyo_dir), f"s3://{BUCKET}/data")
    path = tmp_path_factory.mktemp("cluster") / "cluster.yaml"
    path.write_text(yaml.safe_dump(tiny_sweep_config(
        karyo_dir, "cluster", size=32, samples=2, grid={"backbones": ["efficientnet_lite0"], "heads": ["a", "k"]},
        resources={"cpus_per_trial": 1, "max_concurrent": 2})))
    return path


def readme_recipe() -> list[list[str]]:
    """The README's ``ray job submit`` lines (continuations joined), as argv lists."""
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    return [shlex.split(line.split("#", 1)[0]) for line in text.splitlines()
            if line.lstrip().startswith("ray job submit")]


def submit(cluster: LocalCluster, argv: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    """Run one ``ray job submit`` command line against the cluster (retried while the head's job
    agent is not up yet)."""
    argv = [RAY if argv[0] == "ray" else argv[0], *argv[1:]]
    for _ in range(30):
        proc = subprocess.run(argv, env=cluster.env, capture_output=True, text=True, timeout=timeout)
        if "No available agent" not in proc.stdout + proc.stderr:
            return proc
        time.sleep(3)
    return proc


def job_id(output: str) -> str:
    return re.search(r"raysubmit_\w+", output).group(0)


def job_status(cluster: LocalCluster, jid: str) -> str:
    proc = subprocess.run([RAY, "job", "status", f"--address={cluster.job_address}", jid], env=cluster.env,
                          capture_output=True, text=True, timeout=120)
    # "Job 'raysubmit_..' succeeded" when it ended; "Status for job '...': RUNNING" before
    found = re.findall(r"\b(PENDING|RUNNING|SUCCEEDED|FAILED|STOPPED)\b", (proc.stdout + proc.stderr).upper())
    return found[-1] if found else "UNKNOWN"


def wait_job(cluster: LocalCluster, jid: str, timeout_s: float = 420) -> str:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = job_status(cluster, jid)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(2)
    raise TimeoutError(f"job {jid} still {status} after {timeout_s:.0f}s:\n{job_logs(cluster, jid)[-6000:]}")


def job_logs(cluster: LocalCluster, jid: str) -> str:
    return subprocess.run([RAY, "job", "logs", f"--address={cluster.job_address}", jid], env=cluster.env,
                          capture_output=True, text=True, timeout=120).stdout


def start_sweep(cluster: LocalCluster, config: Path, out: Path, env: dict[str, str]) -> str:
    """Submit a sweep job without waiting (test hooks in its environment); its job id."""
    proc = submit(cluster, ["ray", "job", "submit", f"--address={cluster.job_address}", "--no-wait",
                            "--runtime-env-json", json.dumps({"env_vars": env}), "--",
                            "raycyto", "sweep", "--config", str(config), "--data", f"s3://{BUCKET}/data/manifest.csv",
                            "--storage", f"s3://{BUCKET}/store", "--out", str(out), "--quiet"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return job_id(proc.stdout + proc.stderr)


def wait_for(ready, what: str, timeout_s: float = 600) -> None:
    deadline = time.time() + timeout_s
    while not ready():
        if time.time() > deadline:
            raise TimeoutError(what)
        time.sleep(0.5)


def worker_nodes(cluster: LocalCluster) -> dict[str, bool]:
    """Node id -> alive, for the nodes that are not the head."""
    proc = subprocess.run([RAY, "list", "nodes", f"--address={cluster.job_address}", "--format=json", "--limit=100"],
                          env=cluster.env, capture_output=True, text=True, timeout=120, check=True)
    return {n["node_id"]: n["state"] == "ALIVE" for n in json.loads(proc.stdout) if not n["is_head_node"]}


def trained(results: pd.DataFrame) -> pd.DataFrame:
    return results[~results["baseline"].astype(bool)]


@pytest.fixture(scope="module")
def recipe_run(cluster, config, tmp_path_factory) -> dict:
    """The README's recipe, each ``ray job submit`` line as printed but for the placeholders."""
    runs = tmp_path_factory.mktemp("runs")
    fill = {k: v.format(config=config, runs=runs, address=cluster.job_address) for k, v in README_PATHS.items()}
    outputs = []
    for argv in readme_recipe():
        for old, new in fill.items():
            argv = [arg.replace(old, new) for arg in argv]
        proc = submit(cluster, argv)
        outputs.append((argv, proc.returncode, proc.stdout + proc.stderr))
    return {"exp": runs / "leukemia", "outputs": outputs, "model": f"{BUCKET}/store/leukemia-model"}


def test_readme_cluster_recipe_runs_job_by_job_on_three_nodes(recipe_run, s3):
    steps = [argv[argv.index("--") + 1:argv.index("--") + 3] for argv, _, _ in recipe_run["outputs"]]
    assert steps == [["raycyto", "sweep"], ["raycyto", "report"], ["raycyto", "export"]], steps
    for argv, rc, out in recipe_run["outputs"]:
        assert rc == 0 and re.search(r"Job 'raysubmit_\w+' succeeded", out), (argv, out[-4000:])
        print("\n" + shlex.join(argv[argv.index("--") + 1:]) + ": " + re.search(r"Job 'raysubmit_\w+' succeeded", out).group(0))
    exp = recipe_run["exp"]
    assert (exp / "report" / "report.html").is_file()
    assert s3.get_file_info(f"{recipe_run['model']}/model.json").type == pafs.FileType.File
    assert s3.get_file_info(f"{BUCKET}/store/leukemia/results.csv").type == pafs.FileType.File  # EXP_DIR uploaded


def test_every_trial_names_its_node_and_both_workers_ran_trials(recipe_run, cluster):
    res = trained(read_csv(recipe_run["exp"] / "results.csv"))
    assert len(res) == 4 and res["status"].eq("TERMINATED").all() and res["folds_done"].eq(FOLDS).all()
    workers = worker_nodes(cluster)
    assert set(res["node_id"]) == set(workers), (res["node_id"].tolist(), workers)  # both, never the head


def test_cluster_run_equals_a_single_node_run_of_the_same_config(recipe_run, config, karyo_dir, tmp_path):
    """Same seed, same thread count per trial (1): the same configurations, folds and metrics. What
    differs: trial ids (Tune draws them), node ids, times, and image paths (s3:// there)."""
    single = tmp_path / "single"
    proc = subprocess.run([str(BIN / "raycyto"), "sweep", "--config", str(config), "--data", str(karyo_dir),
                           "--out", str(single), "--quiet"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    key = ["backbone", "finetune", "head", "lr", "batch_size"]
    metrics = [c for c in read_csv(single / "results.csv").columns if c.startswith(("val_", "test_"))]
    a, b = (read_csv(d / "results.csv").sort_values(key).reset_index(drop=True) for d in (recipe_run["exp"], single))
    assert a[key].equals(b[key]) and len(a) == 5
    np.testing.assert_allclose(a[metrics].to_numpy(float), b[metrics].to_numpy(float), rtol=0, atol=1e-6)
    pa, pb = (pd.read_parquet(d / "predictions.parquet") for d in (recipe_run["exp"], single))
    for p in (pa, pb):
        p["image"] = p["path"].map(lambda s: s.rsplit("/", 2)[-2] + "/" + s.rsplit("/", 1)[-1])
    cols = [*key[:3], "fold", "split", "image", "label", "pred"]
    fa, fb = (p.merge(r[["trial_id", "lr", "batch_size"]], on="trial_id")[cols + ["lr", "batch_size"]]
              .sort_values(cols + ["lr"]).reset_index(drop=True) for p, r in ((pa, a), (pb, b)))
    pd.testing.assert_frame_equal(fa, fb)  # same folds, same images in them, same answers


def test_sweep_survives_a_worker_node_killed_under_running_trials(cluster, config, s3, tmp_path):
    out = tmp_path / "killed"
    barrier = tmp_path / "started"
    jid = start_sweep(cluster, config, out, {"RAYCYTO_BARRIER": f"{barrier}:2"})
    wait_for(lambda: barrier.is_dir() and len(list(barrier.iterdir())) >= 2, "two trials running at once")
    victim = cluster.workers[0]
    cluster.kill_worker(victim)
    try:
        status = wait_job(cluster, jid)
        assert status == "SUCCEEDED", job_logs(cluster, jid)[-5000:]
        res = trained(read_csv(out / "results.csv"))
        assert len(res) == 4 and res["status"].eq("TERMINATED").all() and res["folds_done"].eq(FOLDS).all()
        restarts = json.loads((out / "experiment.json").read_text())["restarts"]
        assert restarts and set(restarts) <= set(res["trial_id"]), restarts  # the lost trial, restarted
        assert res.set_index("trial_id").loc[list(restarts), "restarts"].ge(1).all()
        for tid in restarts:
            starts = [e for e in read_events(out, tid) if e["event"] == "start"]
            assert len(starts) >= 2 and starts[-1]["node_id"] != starts[0]["node_id"]  # rerun elsewhere
        assert list(worker_nodes(cluster).values()).count(False) == 1  # the cluster knows it lost one
    finally:
        cluster.workers.remove(victim)
        cluster.add_worker()  # back to two workers for the next test


def test_stopped_sweep_job_resumed_reruns_no_finished_trial(cluster, config, tmp_path):
    out = tmp_path / "stopped"
    gate = tmp_path / "gate"  # never created: trials that start after 2 have finished wait on it
    jid = start_sweep(cluster, config, out, {"RAYCYTO_HOLD": f"{gate}:2"})

    def finished() -> list[str]:
        events = out / "events"
        done = [p.stem for p in events.glob("*.jsonl")] if events.is_dir() else []
        return [t for t in done if sum(e["event"] == "fold_done" for e in read_events(out, t)) == FOLDS]

    wait_for(lambda: len(finished()) >= 2, "two trials finished")
    first = finished()
    time.sleep(3 * STATE_PERIOD_S)  # Tune's state snapshot (and its upload) holds them now
    subprocess.run([RAY, "job", "stop", f"--address={cluster.job_address}", jid], env=cluster.env,
                   capture_output=True, text=True, timeout=120)
    assert wait_job(cluster, jid) == "STOPPED"
    proc = submit(cluster, ["ray", "job", "submit", f"--address={cluster.job_address}", "--",
                            "raycyto", "sweep", "--resume", str(out), "--quiet"])
    assert proc.returncode == 0 and "succeeded" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-5000:]
    res = trained(read_csv(out / "results.csv"))
    assert len(res) == 4 and res["status"].eq("TERMINATED").all() and res["folds_done"].eq(FOLDS).all()
    assert set(first) <= set(res["trial_id"])
    for tid in first:  # finished before the stop: started once, never again
        assert sum(e["event"] == "start" for e in read_events(out, tid)) == 1, tid


def serve_config(model: str, port: int) -> dict:
    """``serve deploy`` config: the standard proxy and the Ingress on the head (it takes no CPU
    there: ``node:__internal_head__`` pins it), two 0.5-CPU Backbone replicas on the workers."""
    return {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
            "applications": [{
                "name": "raycyto", "route_prefix": "/", "import_path": "raycyto.serve.app:build_app",
                "args": {"model_dir": model, "inline": False, "backbone_replicas": 2, "backbone_num_cpus": 0.5,
                         "mc_replicas": 1, "mc_num_cpus": 0, "ingress_num_cpus": 0, "passes": 20},
                "deployments": [
                    {"name": "Ingress", "ray_actor_options": {"num_cpus": 0, "resources": {"node:__internal_head__": 0.01}}},
                    {"name": "MCHead", "ray_actor_options": {"num_cpus": 0, "resources": {"node:__internal_head__": 0.01}}}]}]}


def backbone_replicas(cluster: LocalCluster) -> list[dict]:
    proc = subprocess.run([RAY, "list", "actors", f"--address={cluster.job_address}", "--format=json", "--limit=500",
                           "--filter", "state=ALIVE"], env=cluster.env, capture_output=True, text=True, timeout=120,
                          check=True)
    return [a for a in json.loads(proc.stdout) if "Backbone" in (a.get("class_name") or "")]


class Load:
    """Steady load: ``clients`` threads, each posting one image after another; a 503 is retried
    after its ``Retry-After``. Every answer is recorded as (time, status, Retry-After, attempt)."""

    def __init__(self, url: str, image: bytes, clients: int = 2) -> None:
        self.url, self.image = url, image
        self.answers: list[tuple[float, int, str | None, int]] = []
        self.unanswered: list[str] = []  # requests that never got a 200 (after retries)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                for attempt in range(60):
                    try:
                        r = client.post(self.url, content=self.image, headers={"content-type": "image/png"})
                        status, retry = r.status_code, r.headers.get("retry-after")
                    except httpx.HTTPError as e:  # a connection the server dropped: an error, no answer
                        status, retry = -1, type(e).__name__
                    self.answers.append((time.time(), status, retry, attempt))
                    if status == 200:
                        break
                    if status != 503:
                        self.unanswered.append(f"{status} {retry}")
                        break
                    time.sleep(min(float(retry or 1), 2.0))
                else:
                    self.unanswered.append("503 x 60")

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)

    def ok_since(self, t0: float) -> int:
        return sum(1 for t, s, _, _ in self.answers if t >= t0 and s == 200)


def test_serve_survives_the_node_of_a_replica_killed_under_load(cluster, recipe_run, karyo_dir, tmp_path):
    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(serve_config(f"s3://{recipe_run['model']}", port)))
    proc = subprocess.run([str(BIN / "serve"), "deploy", str(config), f"--address={cluster.job_address}"],
                          env=cluster.env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    url = f"http://127.0.0.1:{port}/predict"
    image = sorted((karyo_dir / "abnormal").glob("*.png"))[0].read_bytes()

    def ready() -> bool:
        try:
            return httpx.post(url, content=image, headers={"content-type": "image/png"}, timeout=30).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, "the endpoint answers", timeout_s=300)
    wait_for(lambda: len(backbone_replicas(cluster)) == 2, "two Backbone replicas", timeout_s=120)
    try:
        with Load(url, image, clients=4) as load:
            wait_for(lambda: load.ok_since(0) >= 10, "steady answers", timeout_s=120)
            replica = backbone_replicas(cluster)[0]
            raylet = int(Path(f"/proc/{replica['pid']}/stat").read_text().rsplit(")", 1)[1].split()[1])  # ppid
            victim = next(w for w in cluster.workers if raylet in w.raylet_pids())
            killed = time.time()
            cluster.kill_worker(victim)
            cluster.workers.remove(victim)
            # healthy: 10 answers in a row, all 200, within 60 s of the kill
            def healthy() -> bool:
                after = [s for t, s, _, _ in load.answers if t > killed]
                return len(after) >= 10 and all(s == 200 for s in after[-10:])

            wait_for(healthy, "healthy again after the kill", timeout_s=60)
            recovered = time.time() - killed
            time.sleep(2)
        after = [(s, r) for t, s, r, _ in load.answers if t > killed]
        codes = Counter(s for s, _ in after)
        print(f"\nserve fault: node {victim.node_manager_port} killed; answers after the kill {dict(codes)}, "
              f"retried {sum(1 for a in load.answers if a[3] > 0)}, healthy after {recovered:.1f}s, "
              f"unanswered {load.unanswered}")
        assert set(codes) <= {200, 503}, codes
        assert all(r is not None for s, r in after if s == 503), "a 503 without Retry-After"
        assert not load.unanswered, load.unanswered
        assert recovered <= 60
        # Serve replaces the lost replica on the surviving worker
        wait_for(lambda: len(backbone_replicas(cluster)) == 2, "the lost Backbone replica replaced", timeout_s=90)
    finally:
        subprocess.run([str(BIN / "serve"), "shutdown", "-y", f"--address={cluster.job_address}"],
                       env=cluster.env, capture_output=True, text=True, timeout=120)
