"""Serve latency benchmark: real HTTP (httpx) against local Ray Serves, a plain FastAPI peer and
the same model in-process, side by side in one run.

Every server runs in its own process, started with its own environment (Ray reads its
``RAY_*`` variables when it starts, so each Serve setting needs its own Ray). A comparison's
servers are up at once and its rounds go A, B, C, ... A, B, C, in a rotated order, so load and
drift on the machine hit every variant alike; each phase has only its own servers up (an idle
Ray with its replicas still takes CPU on a 2-core machine). The phases:

  1. Serve's floor, a bare deployment that reads the PNG body and answers ``{"n": bytes}`` (no
     model, no FastAPI, no raycyto code), under each ingress setting:
       - ``default``: Ray Serve's Python HTTP proxy, nothing set;
       - ``high-throughput``: ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` (raycyto's setting until
         2026-12-04);
       - ``inlined body``: ``RAY_max_direct_call_object_size`` above the body size (the body
         is inlined in the proxy -> replica call instead of going through the object store);
       - ``direct ingress``: ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``;
       - ``HAProxy``: ``raycyto.serve.app.SERVE_ENV`` (``RAY_SERVE_ENABLE_HA_PROXY=1``, which
         implies direct ingress, + high-throughput mode): what ``raycyto serve`` runs;
     and the same bare route in the plain uvicorn process of the peer below;
  2. raycyto's ``/predict`` at T=1 and T=100 under the adopted setting (HAProxy), beside the
     peer a user would pick instead of Serve (a plain uvicorn + FastAPI process running the
     same :class:`raycyto.serve.app.Engine`: batching, one worker thread, one torch thread,
     behind one ``/predict`` route) and the same model called in-process
     (``LocalPredictor``, on the main thread as ``raycyto predict`` calls it: ratio = the Serve
     overhead; and from a worker thread, as the replica and the peer run it); then throughput (requests/s) at client
     concurrency 1, 8 and 32 (T=100), the peer's at 32 and the offline batched throughput of
     the same model (decode + batches of ``max_batch_size`` + T passes each, one process, one
     torch thread), each warmed by one unmeasured round, then repeated and interleaved;
  3. the same model with ``inline: false`` (Ingress -> Backbone, one hop more) and under the
     high-throughput setting alone, beside raycyto's and the in-process call (T=100);
  4. evidence (issue 22): a karyogram bundle with a map head (top-3 chromosomes + evidence map
     on every answer, from the embedding) served twice, with the evidence and without
     (``evidence: false``), T=100, interleaved;
  5. fan-out: the T passes in 1 chunk vs N chunks over N MC-head replicas, for a head-scope
     model (T=100) and a full-scope model, and the head-scope break-even T.

The last lines: the ratio to the peer, throughput at concurrency 32 / offline, and
``serve overhead p50 T=100: X.XX×`` (vs in-process).

Example:
    .venv/bin/python benchmarks/serve_latency.py --rounds 40
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request  # module level: the routes' annotations are resolved here

from raycyto.serve.ports import free_ports

# Ray / Serve variables a variant sets; the others' values never leak into it from this shell
CONTROLLED = ("RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_ENABLE_DIRECT_INGRESS",
              "RAY_max_direct_call_object_size", "RAYCYTO_HAPROXY_AUTO_PORTS", "RAY_SERVE_HAPROXY_STATS_PORT",
              "RAY_SERVE_HAPROXY_METRICS_PORT")
READY = "READY"
# glibc's malloc hands the top of its heap back to the OS when a forward frees its tensors, and
# the next forward page-faults it back in; how often depends on each process's allocation
# history, so the same forward took 22 to 42 ms in different processes and threads of this VM
# (one process, interleaved mallopt settings: 42 ms default, 22 ms with these). Every process of
# the benchmark gets the same setting, so the ratios compare the serving paths, not the
# allocator's luck (--default-malloc: none).
MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": str(256 << 20), "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}


def _variants(body_bytes: int) -> dict[str, tuple[str, dict[str, str]]]:
    """Serve variants: name -> (label, environment). ``haproxy`` is raycyto's setting."""
    from raycyto.serve.app import SERVE_ENV

    inline = max(1 << 20, 2 * body_bytes)
    return {
        "default": ("default proxy", {}),
        "throughput": ("high-throughput mode (RAY_SERVE_THROUGHPUT_OPTIMIZED=1)",
                       {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}),
        "inlined": (f"body inlined (RAY_max_direct_call_object_size={inline})",
                    {"RAY_max_direct_call_object_size": str(inline)}),
        "direct": ("direct ingress (RAY_SERVE_ENABLE_DIRECT_INGRESS=1)", {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}),
        "haproxy": ("HAProxy (" + " ".join(f"{k}={v}" for k, v in SERVE_ENV.items()) + ")", dict(SERVE_ENV)),
    }


# ----------------------------------------------------------------------------- server processes


def _bare_app():
    """The floor: Serve's ingress + one replica that reads the body, nothing else."""
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    class Bare:
        async def __call__(self, request) -> dict:  # a Starlette Request: no FastAPI at all
            return {"n": len(await request.body())}

    return Bare.bind()


def _wait_until_answered(port: int, routes: list[str], image: bytes, timeout_s: float = 300.0) -> None:
    """Each route answers 200 (HAProxy reloads its configuration after a deploy)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
        for route in routes:
            while True:
                try:
                    if c.post(route, content=image, headers={"content-type": "image/png"},
                              params={"passes": 2}).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{route} never answered 200")
                time.sleep(0.2)


def _serve_server(a: argparse.Namespace, image: bytes) -> None:
    """One Ray + Serve with this process's environment; the apps named in ``--apps``."""
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        from raycyto.serve.app import serve_env

        serve_env()  # free ports for HAProxy's stats page and exporter, as `raycyto serve`
    import ray
    from ray import serve

    from raycyto.serve.app import AppArgs, build_app

    ray.init(num_cpus=a.num_cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    quiet = {"log_level": "WARNING", "enable_access_log": False}  # as `raycyto serve` runs (no --verbose)
    serve.start(http_options={"host": "127.0.0.1", "port": a.port}, logging_config=quiet)
    small = dict(backbone_num_cpus=0.4, mc_num_cpus=0.1, ingress_num_cpus=0.1, mc_replicas=a.mc_replicas,
                 max_queued_requests=256, max_ongoing_requests=64, max_batch_size=a.max_batch_size,
                 batch_wait_timeout_s=a.batch_wait_s)
    bundles = json.loads(a.bundles)

    def deploy(names: list[str]) -> None:
        routes = []
        for name in names:
            if name.startswith("-"):  # "-hop": delete that app (its replicas' CPUs go to the next ones)
                serve.delete(name[1:])
                continue
            if name == "bare":
                serve.run(_bare_app(), name="bare", route_prefix="/bare", logging_config=quiet)
                routes.append("/bare")
                continue
            # /hop: the head model with inline: false; /ev, /noev: the map-head karyogram model
            path = bundles[{"full": "full", "ev": "karyo", "noev": "karyo"}.get(name, "head")]
            serve.run(build_app(AppArgs(model_dir=path, inline=name != "hop", evidence=name != "noev", **small)),
                      name=name, route_prefix=f"/{name}", logging_config=quiet)
            routes.append(f"/{name}/predict")
        _wait_until_answered(a.port, routes, image)
        print(READY, flush=True)

    deploy(a.apps.split(","))
    for line in sys.stdin:  # "deploy a,-b" from the benchmark (deploy a, delete b), until it closes our stdin
        if line.startswith("deploy "):
            deploy(line.split()[1].split(","))
    serve.shutdown()
    ray.shutdown()


def _peer_server(a: argparse.Namespace, image: bytes) -> None:
    """The plain FastAPI peer: uvicorn, one process, the same Engine in-process."""
    from contextlib import asynccontextmanager

    import torch
    import uvicorn

    from raycyto.serve.app import Engine
    from raycyto.serve.predict import build_result, chunk_plan
    from raycyto.serve.validation import decode_upload

    torch.set_num_threads(1)  # as the Serve replica (1 CPU or less assigned)
    key = json.loads(a.bundles)["head"]
    engine = Engine.local([key], a.max_batch_size)
    facts: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        facts["model"] = await engine.describe(key)  # loads the bundle
        yield

    app = FastAPI(lifespan=lifespan)

    @app.post("/bare")
    async def bare(request: Request) -> dict:
        return {"n": len(await request.body())}

    @app.post("/predict")
    async def predict(request: Request, passes: int = 100, seed: int = 0) -> dict:
        data = await request.body()
        img = await asyncio.to_thread(decode_upload, data)
        out = await engine.predict(key, img, chunk_plan(passes, 1, seed))
        d = facts["model"]
        return build_result(out["probs"], d["threshold"], d["class_names"], d["info"],
                            {"count": 1, "chunks": 1, "ids": [out["replica"]]})

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=a.port, log_level="warning",
                                           access_log=False))

    def ready_then_wait() -> None:
        try:
            _wait_until_answered(a.port, ["/bare", "/predict"], image)
        except Exception as e:  # noqa: BLE001 - the benchmark sees this process end
            print(f"peer: {e}", file=sys.stderr, flush=True)
            os._exit(1)
        print(READY, flush=True)
        sys.stdin.read()
        server.should_exit = True

    threading.Thread(target=ready_then_wait, daemon=True).start()
    server.run()


class Server:
    """A server process (``--server``) with its own environment; stopped by closing its stdin."""

    def __init__(self, kind: str, port: int, env: dict[str, str], args: list[str], log: Path) -> None:
        self.kind, self.port, self.log = kind, port, log
        self.url = f"http://127.0.0.1:{port}"
        self._log = log.open("w")
        self.proc = subprocess.Popen([sys.executable, __file__, "--server", kind, "--port", str(port), *args],
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, start_new_session=True)

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        line = ""
        while line.strip() != READY:
            waiting = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]
            line = self.proc.stdout.readline() if waiting else ""
            if not line:  # it ended, or the time is up
                raise RuntimeError(f"{self.kind} server did not start:\n" + self.log.read_text()[-4000:])

    def deploy(self, apps: str, timeout_s: float) -> None:
        """Deploy more apps (a Serve server), back once they answer."""
        self.proc.stdin.write(f"deploy {apps}\n")
        self.proc.stdin.flush()
        self.wait_ready(timeout_s)

    def stop(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=120)
        except (subprocess.TimeoutExpired, OSError):
            os.killpg(self.proc.pid, 9)  # its own session: this server and its children
        self._log.close()


# ----------------------------------------------------------------------------- measurements


def _bundles(root: Path) -> dict[str, str]:
    """A head-scope (frozen) and a full-scope (last block fine-tuned + backbone dropout) bundle,
    and a karyogram one with the map head s (evidence from the embedding, the built-in layout)."""
    from raycyto.models.bundle import save_bundle
    from raycyto.models.classifier import build_classifier

    meta = {"class_names": ["normal", "abnormal"], "positive_class": "abnormal"}
    head = build_classifier("efficientnet_lite0", head="d", num_classes=2, pretrained=True)
    full = build_classifier("efficientnet_lite0", head="d", num_classes=2, finetune="last1",
                            pretrained=True, backbone_dropout=0.2)
    save_bundle(root / "head", head, {**meta, "name": "head", "mc": {"scope": "head"}})
    save_bundle(root / "full", full, {**meta, "name": "full", "mc": {"scope": "full"}})
    karyo = build_classifier("efficientnet_lite0", head="s", num_classes=2, pretrained=True,
                             head_kwargs={"grid": (14, 14)})  # blocks.4 of Lite0 at 224 px
    save_bundle(root / "karyo", karyo, {**meta, "name": "karyo", "input_size": 224, "mc": {"scope": "head"},
                                        "config": {"data": {"synthetic": {"task": "karyogram"}}}})
    return {"head": str(root / "head"), "full": str(root / "full"), "karyo": str(root / "karyo")}


def _mallopt() -> None:
    """:data:`MALLOC_ENV` for this (already running) process."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-1, int(MALLOC_ENV["MALLOC_TRIM_THRESHOLD_"]))  # M_TRIM_THRESHOLD
    libc.mallopt(-3, int(MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]))  # M_MMAP_THRESHOLD


def _image() -> bytes:
    import cv2

    return cv2.imencode(".png", (np.random.default_rng(0).random((224, 224, 3)) * 255).astype(np.uint8))[1].tobytes()


def _pct(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs) * 1000.0
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def _timed_post(client, path: str, image: bytes, **params) -> float:
    t0 = time.perf_counter()
    r = client.post(path, content=image, headers={"content-type": "image/png"}, params=params)
    elapsed = time.perf_counter() - t0
    r.raise_for_status()
    return elapsed


async def _throughput(url: str, path: str, image: bytes, concurrency: int, total: int, passes: int) -> float:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120,
                                 limits=httpx.Limits(max_connections=concurrency)) as c:
        async def one() -> None:
            async with sem:
                for _ in range(20):  # 503 = shed by the bounded queue: back off and retry
                    r = await c.post(path, content=image, params={"passes": passes},
                                     headers={"content-type": "image/png"})
                    if r.status_code != 503:
                        r.raise_for_status()
                        return
                    await asyncio.sleep(0.05)

        t0 = time.perf_counter()
        await asyncio.gather(*[one() for _ in range(total)])
        return total / (time.perf_counter() - t0)


def _offline_throughput(local, image: bytes, total: int, batch: int, passes: int) -> float:
    """Images/s of the same model in-process: decode, embed in batches, T passes per image."""
    from raycyto.serve.predict import build_result, chunk_plan
    from raycyto.serve.validation import decode_upload

    m = local.model
    t0 = time.perf_counter()
    for start in range(0, total, batch):
        images = [decode_upload(image) for _ in range(min(batch, total - start))]
        for x in m.embed(images):
            probs = np.concatenate([m.run_chunk(x, c) for c in chunk_plan(passes, 1, 0)])
            build_result(probs, 0.8, m.class_names, m.info, {"count": 1, "chunks": 1, "ids": ["offline"]})
    return total / (time.perf_counter() - t0)


def _pass_cost_ms(local, image: bytes, passes: int = 1000, reps: int = 5) -> float:
    """In-process milliseconds per head-scope MC pass (features cached, T passes at once)."""
    from raycyto.serve.predict import chunk_plan
    from raycyto.serve.validation import decode_upload

    m = local.model
    x = m.embed([decode_upload(image)])[0]
    (chunk,) = chunk_plan(passes, 1, 0)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        m.run_chunk(x, chunk)
        best = min(best, time.perf_counter() - t0)
    return best * 1000.0 / passes


def _rounds(cells: dict[str, "callable"], rounds: int, repeat: dict[str, int]) -> dict[str, list[float]]:
    """Time every cell ``rounds`` times (``repeat[cell]`` requests a round), in an order rotated
    each round, so that whatever the machine does meanwhile is shared by all cells."""
    names = list(cells)
    out: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            for _ in range(repeat.get(k, 1)):
                out[k].append(cells[k]())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=40, help="interleaved rounds of the latency cells")
    p.add_argument("--bare-per-round", type=int, default=5, help="bare-floor requests per variant and round")
    p.add_argument("--mc-replicas", type=int, default=2)
    p.add_argument("--full-passes", type=int, default=8, help="T for the full-scope fan-out rows")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs each Ray declares")
    p.add_argument("--max-batch-size", type=int, default=8, help="@serve.batch size (and offline batch)")
    p.add_argument("--batch-wait-s", type=float, default=0.0, help="@serve.batch wait for a fuller batch")
    p.add_argument("--throughput-repeats", type=int, default=2, help="interleaved repeats of the throughput cells")
    p.add_argument("--default-malloc", action="store_true", help="leave glibc's malloc settings as they are "
                   "(default: MALLOC_ENV in every process)")
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds the servers get to start")
    p.add_argument("--server", help=argparse.SUPPRESS)  # internal: run one server process
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--apps", default="bare", help=argparse.SUPPRESS)
    p.add_argument("--bundles", help=argparse.SUPPRESS)
    a = p.parse_args()
    image = _image()
    if a.server == "peer":
        return _peer_server(a, image)
    if a.server:
        return _serve_server(a, image)

    import httpx
    import torch

    from raycyto.serve.app import HAPROXY_PORT_ENV
    from raycyto.serve.predict import LocalPredictor

    tmp = Path(tempfile.mkdtemp(prefix="serve_bench_"))
    bundles = _bundles(tmp)
    variants = _variants(len(image))
    base = {k: v for k, v in os.environ.items() if k not in CONTROLLED}
    base["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "1"  # quick stop (as `raycyto serve`)
    if not a.default_malloc:
        base.update(MALLOC_ENV)  # servers, their Rays and replicas
        _mallopt()  # this process: the in-process reference and the offline throughput
    common = ["--bundles", json.dumps(bundles), "--mc-replicas", str(a.mc_replicas),
              "--num-cpus", str(a.num_cpus), "--max-batch-size", str(a.max_batch_size),
              "--batch-wait-s", str(a.batch_wait_s)]
    servers: dict[str, Server] = {}
    clients: dict[str, "httpx.Client"] = {}

    def start(name: str, env: dict[str, str], apps: str | None) -> None:
        """A server on ports chosen just before it starts (Rays starting together pick free
        ports of their own and could take one); HAProxy's stats / exporter ports too."""
        port, *haproxy = free_ports(1 + len(HAPROXY_PORT_ENV))
        if env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
            env = {**env, **dict(zip(HAPROXY_PORT_ENV, map(str, haproxy)))}
        extra = [] if apps is None else ["--apps", apps]
        servers[name] = Server(name, port, {**base, **env}, [*extra, *common], tmp / f"{name}.log")
        servers[name].wait_ready(a.start_timeout)
        clients[name] = httpx.Client(base_url=servers[name].url, timeout=120)

    def stop(*names: str) -> None:
        for name in names:
            clients.pop(name).close()
            servers.pop(name).stop()

    def warm(name: str, path: str, **params) -> None:
        for _ in range(3):
            _timed_post(clients[name], path, image, **params)

    t_start = time.perf_counter()
    try:
        # 1. the floor: every ingress setting's bare replica and the plain uvicorn route
        for name, (_, env) in variants.items():
            start(name, env, "bare")
        start("peer", {}, None)
        started_s = time.perf_counter() - t_start
        for name in servers:
            warm(name, "/bare")
        floor = _rounds({k: (lambda c=clients[k]: _timed_post(c, "/bare", image)) for k in servers},
                        a.rounds, {k: a.bare_per_round for k in servers})
        stop(*[k for k in variants if k != "haproxy"])  # idle Rays would load the rounds below

        # 2. raycyto (HAProxy) vs the FastAPI peer vs in-process; in-process reference: same
        # model, same code path minus HTTP and Ray, one torch thread like the replica and the peer
        torch.set_num_threads(1)
        local = LocalPredictor(bundles["head"], mc_replicas=a.mc_replicas)
        local.predict_bytes(image, passes=1)  # warm-up
        pass_ms = _pass_cost_ms(local, image)
        servers["haproxy"].deploy("head", a.start_timeout)
        warm("haproxy", "/head/predict", passes=100)
        warm("peer", "/predict", passes=100)

        def inproc(t: int) -> float:
            t0 = time.perf_counter()
            local.predict_bytes(image, passes=t)
            return time.perf_counter() - t0

        # the same call from a worker thread, as the replica and the peer run the model (which
        # thread is faster has gone both ways here, by up to 25%)
        worker = ThreadPoolExecutor(1)

        def inproc_thread(t: int) -> float:
            t0 = time.perf_counter()
            worker.submit(local.predict_bytes, image, passes=t).result()
            return time.perf_counter() - t0

        lat: dict[int, dict[str, list[float]]] = {}
        for t in (1, 100):
            lat[t] = _rounds({
                "serve": lambda t=t: _timed_post(clients["haproxy"], "/head/predict", image, passes=t),
                "peer": lambda t=t: _timed_post(clients["peer"], "/predict", image, passes=t),
                "inproc": lambda t=t: inproc(t),
                "thread": lambda t=t: inproc_thread(t),
            }, a.rounds, {})
        conc: dict[int, float] = {}
        for c_ in (1, 8):
            conc[c_] = asyncio.run(_throughput(servers["haproxy"].url, "/head/predict", image, c_, 2 * 16, 100))
        tp: dict[str, list[float]] = {"serve": [], "peer": [], "offline": []}
        total = max(16 * a.max_batch_size, 128)  # 4 rounds of 32 at least: a steady state, not a burst
        # one unmeasured round of each first: the first burst of 32 at a server (and the first
        # batches offline) ran 10-30% slower than the next ones here
        _offline_throughput(local, image, total, a.max_batch_size, 100)
        asyncio.run(_throughput(servers["haproxy"].url, "/head/predict", image, 32, 64, 100))
        asyncio.run(_throughput(servers["peer"].url, "/predict", image, 32, 64, 100))
        for _ in range(a.throughput_repeats):  # interleaved: offline, Serve, peer
            tp["offline"].append(_offline_throughput(local, image, total, a.max_batch_size, 100))
            tp["serve"].append(asyncio.run(_throughput(servers["haproxy"].url, "/head/predict", image, 32, total, 100)))
            tp["peer"].append(asyncio.run(_throughput(servers["peer"].url, "/predict", image, 32, total, 100)))
        stop("peer")

        # 3. the same model with inline: false (+1 hop), and under the previous setting
        servers["haproxy"].deploy("hop", a.start_timeout)
        start("previous", variants["throughput"][1], "head")
        warm("haproxy", "/hop/predict", passes=100)
        warm("previous", "/head/predict", passes=100)
        more = _rounds({
            "serve": lambda: _timed_post(clients["haproxy"], "/head/predict", image, passes=100),
            "hop": lambda: _timed_post(clients["haproxy"], "/hop/predict", image, passes=100),
            "previous": lambda: _timed_post(clients["previous"], "/head/predict", image, passes=100),
            "inproc": lambda: inproc(100),
        }, max(10, a.rounds // 2), {})
        stop("previous")

        # 4. evidence on every answer (map head) vs the same model without it
        servers["haproxy"].deploy("-hop,ev,noev", a.start_timeout)  # 2 CPUs: the hop's replicas make room
        for name in ("ev", "noev"):
            warm("haproxy", f"/{name}/predict", passes=100)
        evidence = _rounds({name: (lambda name=name: _timed_post(clients["haproxy"], f"/{name}/predict", image,
                                                                 passes=100)) for name in ("ev", "noev")},
                           a.rounds, {})

        # 5. fan-out of the passes over the MC-head replicas
        servers["haproxy"].deploy("-ev,-noev,full", a.start_timeout)
        _timed_post(clients["haproxy"], "/full/predict", image, passes=2)
        fan: dict[str, dict[int, float]] = {}
        hc = clients["haproxy"]
        for scope, t in (("head", 100), ("full", a.full_passes)):
            cells = {k: (lambda k=k, scope=scope, t=t: _timed_post(hc, f"/{scope}/predict", image, passes=t, fan_out=k))
                     for k in (1, a.mc_replicas)}
            fan[scope] = {k: _pct(v)[0] for k, v in _rounds(cells, max(6, a.rounds // 3), {}).items()}
    finally:
        stop(*list(servers))

    # ------------------------------------------------------------------------- table
    rows: list[tuple[str, str]] = []
    fp = {k: _pct(v) for k, v in floor.items()}
    kb = len(image) / 1000
    rows.append((f"-- floor: a bare replica reading the {kb:.0f} KB PNG body, {len(floor['default'])} requests each", ""))
    for name, (label, _) in variants.items():
        rows.append((f"   {label} p50 / p99 (ms)", f"{fp[name][0]:8.2f} / {fp[name][1]:8.2f}"))
    rows.append(("   plain uvicorn + FastAPI route reading the body p50 / p99 (ms)",
                 f"{fp['peer'][0]:8.2f} / {fp['peer'][1]:8.2f}"))
    p50: dict[int, dict[str, float]] = {}
    for t in (1, 100):
        pc = {k: _pct(v) for k, v in lat[t].items()}
        p50[t] = {k: v[0] for k, v in pc.items()}
        rows.append((f"-- /predict T={t}, {len(lat[t]['serve'])} requests each, p50 / p99 (ms)", ""))
        rows.append(("   raycyto, HAProxy (raycyto serve's setting), inline", f"{pc['serve'][0]:8.1f} / {pc['serve'][1]:8.1f}"))
        rows.append(("   plain uvicorn + FastAPI peer, same Engine", f"{pc['peer'][0]:8.1f} / {pc['peer'][1]:8.1f}"))
        rows.append(("   in-process (LocalPredictor)", f"{pc['inproc'][0]:8.1f} / {pc['inproc'][1]:8.1f}"))
        rows.append(("   in-process, the same call on a worker thread", f"{pc['thread'][0]:8.1f} / {pc['thread'][1]:8.1f}"))
        base_ = p50[t]["inproc"]
        rows.append((f"   Serve overhead T={t} (p50 / in-process): raycyto / peer",
                     f"{p50[t]['serve'] / base_:.2f}x / {p50[t]['peer'] / base_:.2f}x"))
        rows.append((f"   raycyto / FastAPI peer T={t} (p50)", f"{p50[t]['serve'] / p50[t]['peer']:8.2f}x"))
        rows.append((f"   raycyto / in-process on a worker thread T={t} (p50)",
                     f"{p50[t]['serve'] / p50[t]['thread']:8.2f}x"))
    rows.append(("   lowest ratio Serve allows at T=100: (in-process + HAProxy floor) / in-process",
                 f"{(p50[100]['inproc'] + fp['haproxy'][0]) / p50[100]['inproc']:8.2f}x"))
    pm = {k: _pct(v) for k, v in more.items()}
    rows.append((f"-- /predict T=100 beside other settings, {len(more['serve'])} requests each, p50 / p99 (ms)", ""))
    for k, label in (("serve", "raycyto, HAProxy, inline"), ("hop", "raycyto, HAProxy, inline: false (+1 hop to the Backbone)"),
                     ("previous", "raycyto, high-throughput mode alone (the previous setting)"),
                     ("inproc", "in-process (LocalPredictor)")):
        ratio = "" if k == "inproc" else f"   {pm[k][0] / pm['inproc'][0]:.2f}x"
        rows.append((f"   {label}", f"{pm[k][0]:8.1f} / {pm[k][1]:8.1f}{ratio}"))
    pe = {k: _pct(v) for k, v in evidence.items()}
    rows.append((f"-- evidence, map-head karyogram model, /predict T=100, {len(evidence['ev'])} requests each, "
                 "p50 / p99 (ms)", ""))
    rows.append(("   with the evidence (top 3 chromosomes + evidence map)", f"{pe['ev'][0]:8.1f} / {pe['ev'][1]:8.1f}"))
    rows.append(("   without (evidence: false)", f"{pe['noev'][0]:8.1f} / {pe['noev'][1]:8.1f}"))
    rows.append(("   evidence cost T=100 (p50 with / without)", f"{pe['ev'][0] / pe['noev'][0]:8.2f}x"))
    rows.append(("-- throughput T=100 (requests/s)", ""))
    for c_, rps in conc.items():
        rows.append((f"   raycyto concurrency {c_:>2}", f"{rps:8.1f}"))
    mean = {k: float(np.mean(v)) for k, v in tp.items()}
    rows.append((f"   raycyto concurrency 32 ({a.throughput_repeats} runs)", " / ".join(f"{v:.1f}" for v in tp["serve"])))
    rows.append(("   FastAPI peer concurrency 32", " / ".join(f"{v:.1f}" for v in tp["peer"])))
    rows.append((f"   offline batched, batch {a.max_batch_size} (img/s)", " / ".join(f"{v:.1f}" for v in tp["offline"])))
    rows.append(("   FastAPI peer concurrency 32 / offline batched", f"{mean['peer'] / mean['offline']:8.2f}x"))
    rows.append(("-- fan-out of the passes over MC-head replicas, p50 (ms)", ""))
    for scope, t in (("head", 100), ("full", a.full_passes)):
        k = a.mc_replicas
        rows.append((f"   {scope} scope T={t}: 1 chunk / {k} chunks", f"{fan[scope][1]:8.1f} / {fan[scope][k]:8.1f}"))
        rows.append((f"   {scope} scope speed-up 1 -> {k} chunks", f"{fan[scope][1] / fan[scope][k]:8.2f}x"))
    # fanning out T head passes over k replicas saves (1 - 1/k) T c of pass time and costs the
    # extra hops measured above (plus the pass time it did save at T=100)
    k = a.mc_replicas
    saved_per_pass = (1 - 1 / k) * pass_ms
    cost = fan["head"][k] - fan["head"][1] + saved_per_pass * 100
    rows.append(("   head scope MC pass cost in-process (ms/pass)", f"{pass_ms:8.4f}"))
    rows.append((f"   head scope fan-out break-even T ({k} chunks)", f"{cost / saved_per_pass:8.0f}"))

    width = max(len(k) for k, _ in rows)
    print(f"\nServe latency benchmark ({a.rounds} interleaved rounds, {a.num_cpus} CPUs per Ray, "
          f"efficientnet_lite0 + head d, 224 px; the {len(variants) + 1} floor servers started one by one in "
          f"{started_s:.0f} s, each phase with only its own servers up; malloc: "
          f"{'default' if a.default_malloc else ' '.join(f'{k}={v}' for k, v in MALLOC_ENV.items())})")
    print("-" * (width + 24))
    for k_, v in rows:
        print(f"{k_:<{width}}  {v}")
    print(f"serve overhead vs the plain FastAPI peer p50 T=100: {p50[100]['serve'] / p50[100]['peer']:.2f}×")
    print(f"throughput concurrency 32 / offline batched T=100: {mean['serve'] / mean['offline']:.2f}×")
    print(f"serve overhead p50 T=100: {p50[100]['serve'] / p50[100]['inproc']:.2f}×")


if __name__ == "__main__":
    main()
