"""A multi-node Ray cluster on this one machine, started the way a real one is: ``ray start
--head`` (no CPUs: it takes no work) and worker nodes joined with ``ray start --address``.

Every node gets its own free ports; the nodes share one session folder under a short temp dir
of their own, so a plain ``ray.init()`` elsewhere (another xdist worker) never joins it. raycyto
is installed in the interpreter every node runs (this virtual environment), as a cluster image
would have it: jobs run without ``--working-dir``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import direct_ingress_ports, free_ports, pids_naming, stop_head

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
WORKER_PORTS = ("node-manager-port", "object-manager-port", "metrics-export-port",
                "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port")
HEAD_PORTS = (*WORKER_PORTS, "ray-client-server-port")


@dataclass
class Worker:
    node_manager_port: int
    node_id: str = ""

    def raylet_pids(self) -> list[int]:
        return [p for p in pids_naming(f"--node_manager_port={self.node_manager_port}")
                if "raylet" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace").split("\0")[0]]


@dataclass
class LocalCluster:
    temp_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="rcm", dir="/tmp"))
    gcs_port: int = 0
    dashboard_port: int = 0
    workers: list[Worker] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0",
               "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # an activated venv
               **direct_ingress_ports("cluster")}  # replica ports apart from the test Ray's
        env.pop("RAY_ADDRESS", None)
        return env

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def job_address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _ray_start(self, args: list[str], names: tuple[str, ...]) -> dict[str, int]:
        ports = dict(zip(names, free_ports(len(names))))
        subprocess.run([RAY, "start", *args, *(f"--{k}={v}" for k, v in ports.items()), "--disable-usage-stats"],
                       env=self.env, check=True, capture_output=True, timeout=180)
        return ports

    def start_head(self) -> "LocalCluster":
        self.gcs_port, self.dashboard_port = free_ports(2)
        self._ray_start(["--head", "--num-cpus=0", f"--port={self.gcs_port}", "--include-dashboard=true",
                         f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1",
                         f"--temp-dir={self.temp_dir}"], HEAD_PORTS)
        return self

    def add_worker(self, num_cpus: int = 1, resources: dict | None = None) -> Worker:
        args = [f"--address={self.address}", f"--num-cpus={num_cpus}"]
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        ports = self._ray_start(args, WORKER_PORTS)
        worker = Worker(ports["node-manager-port"])
        self.workers.append(worker)
        return worker

    def kill_worker(self, worker: Worker) -> None:
        """SIGKILL the worker node's raylet (its workers and agents die with it)."""
        pids = worker.raylet_pids()
        assert pids, f"no raylet with node manager port {worker.node_manager_port}"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)

    def job(self, *argv: str, timeout: float = 900) -> subprocess.CompletedProcess:
        """``ray job submit --address <dashboard> -- ARGV`` (waits for the job; its logs on stdout)."""
        cmd = [RAY, "job", "submit", f"--address={self.job_address}", *argv]
        for _ in range(30):  # the head's job agent may need a few seconds after `ray start`
            proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
            if "No available agent" not in proc.stdout + proc.stderr:
                return proc
            time.sleep(3)
        return proc

    def stop(self) -> None:
        stop_head(self.temp_dir)
