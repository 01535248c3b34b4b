"""Serve latency benchmark: real HTTP (httpx) against a local Ray Serve vs in-process.

Measures, side by side in one run:
  * p50 / p99 latency of POST /predict at T=1 and T=100 passes, and of the same model
    called in-process (LocalPredictor); ratio = Serve overhead. Head-scope requests take the
    inline fast path (the Ingress replica embeds and runs the passes: the HTTP proxy's hop is
    the only one); the same model with ``inline: false`` (Ingress -> Backbone, one hop more)
    is timed beside it;
  * throughput (requests/s) at client concurrency 1, 8 and 32 (T=100), next to the offline
    batched throughput of the same model (decode + batches of ``max_batch_size`` + T passes
    each, one process, as many torch threads as the serving replica);
  * fan-out: the T passes in 1 chunk vs N chunks over N MC-head replicas, for a head-scope
    model (T=100) and a full-scope model (every pass runs the whole network), and the
    head-scope break-even T above which fanning out would pay;
  * Serve's own floor on this machine: a bare deployment that reads the same PNG body and
    answers ``{"n": bytes}`` (no model, no FastAPI, no raycyto code), timed interleaved with the
    rest; ``(in-process + floor) / in-process`` is the lowest ratio any Serve app could show
    here;
  * last line: ``serve overhead p50 T=100: X.XX×``.

Serve runs in Ray's high-throughput mode as ``raycyto serve`` runs it
(``raycyto.serve.app.SERVE_ENV``; ``--plain-serve`` turns it off for comparison).

Example:
    .venv/bin/python benchmarks/serve_latency.py --requests 20 --mc-replicas 2
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import tempfile
import time
from pathlib import Path

import numpy as np


def _bare_app():
    """The floor: Serve's HTTP proxy + one replica that reads the body, nothing else."""
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    class Bare:
        async def __call__(self, request) -> dict:  # a Starlette Request: no FastAPI at all
            return {"n": len(await request.body())}

    return Bare.bind()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bundles(root: Path) -> dict[str, Path]:
    """A head-scope (frozen) and a full-scope (last block fine-tuned + backbone dropout) bundle."""
    from raycyto.models.bundle import save_bundle
    from raycyto.models.classifier import build_classifier

    meta = {"class_names": ["normal", "abnormal"], "positive_class": "abnormal"}
    head = build_classifier("efficientnet_lite0", head="d", num_classes=2, pretrained=True)
    full = build_classifier("efficientnet_lite0", head="d", num_classes=2, finetune="last1",
                            pretrained=True, backbone_dropout=0.2)
    save_bundle(root / "head", head, {**meta, "name": "head", "mc": {"scope": "head"}})
    save_bundle(root / "full", full, {**meta, "name": "full", "mc": {"scope": "full"}})
    return {"head": root / "head", "full": root / "full"}


def _pct(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs) * 1000.0
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def _http_latency(client, path: str, image: bytes, n: int, **params) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = client.post(path, content=image, headers={"content-type": "image/png"}, params=params)
        out.append(time.perf_counter() - t0)
        r.raise_for_status()
    return out


async def _throughput(url: str, image: bytes, concurrency: int, total: int, passes: int) -> float:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120,
                                 limits=httpx.Limits(max_connections=concurrency)) as c:
        async def one() -> None:
            async with sem:
                for _ in range(20):  # 503 = shed by the bounded queue: back off and retry
                    r = await c.post("/head/predict", content=image, params={"passes": passes},
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
    best = min(_timed(lambda: m.run_chunk(x, chunk)) for _ in range(reps))
    return best * 1000.0 / passes


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=20, help="requests per latency cell")
    p.add_argument("--mc-replicas", type=int, default=2)
    p.add_argument("--full-passes", type=int, default=8, help="T for the full-scope fan-out rows")
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--max-batch-size", type=int, default=8, help="Backbone @serve.batch size (and offline batch)")
    p.add_argument("--plain-serve", action="store_true", help="without Ray Serve's high-throughput mode")
    a = p.parse_args()
    if not a.plain_serve:
        from raycyto.serve.app import serve_env

        serve_env()  # before Ray starts: the proxy and replicas inherit it

    import cv2
    import httpx
    import ray
    import torch
    from ray import serve

    from raycyto.serve.app import AppArgs, build_app
    from raycyto.serve.predict import LocalPredictor

    tmp = Path(tempfile.mkdtemp(prefix="serve_bench_"))
    bundles = _bundles(tmp)
    image = cv2.imencode(".png", (np.random.default_rng(0).random((224, 224, 3)) * 255).astype(np.uint8))[1].tobytes()
    n = a.requests

    # in-process reference (same model, same code path minus HTTP and Ray), with one torch
    # thread like the serving replica here: two OpenMP threads on a loaded 2-core box
    # spin-wait and run 20-30x slower, which would flatter Serve.
    torch.set_num_threads(1)
    local = LocalPredictor(bundles["head"], mc_replicas=a.mc_replicas)
    local.predict_bytes(image, passes=1)  # warm-up
    offline_rps = _offline_throughput(local, image, max(4 * a.max_batch_size, 32), a.max_batch_size, 100)
    pass_ms = _pass_cost_ms(local, image)

    ray.init(num_cpus=a.num_cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"enable_access_log": False})
    small = dict(backbone_num_cpus=0.4, mc_num_cpus=0.1, ingress_num_cpus=0.1, mc_replicas=a.mc_replicas,
                 max_queued_requests=256, max_ongoing_requests=64, max_batch_size=a.max_batch_size)
    apps = {**bundles, "hop": bundles["head"]}  # /hop: the head-scope model with inline: false
    for name, path in apps.items():
        serve.run(build_app(AppArgs(model_dir=str(path), inline=name != "hop", **small)),
                  name=name, route_prefix=f"/{name}")
    serve.run(_bare_app(), name="bare", route_prefix="/bare")
    url = f"http://127.0.0.1:{port}"
    rows: list[tuple[str, str]] = []
    overhead: dict[int, float] = {}
    with httpx.Client(base_url=url, timeout=120) as c:
        _http_latency(c, "/head/predict", image, 3, passes=100)  # warm-up
        _http_latency(c, "/full/predict", image, 2, passes=2)
        _http_latency(c, "/hop/predict", image, 3, passes=100)
        _http_latency(c, "/bare/predict", image, 3)
        floor: list[float] = []
        for t in (1, 100):
            served, hop2, inproc = [], [], []
            for _ in range(n):  # interleaved, so all see the same background load
                served += _http_latency(c, "/head/predict", image, 1, passes=t)
                hop2 += _http_latency(c, "/hop/predict", image, 1, passes=t)
                floor += _http_latency(c, "/bare/predict", image, 1)
                t0 = time.perf_counter()
                local.predict_bytes(image, passes=t)
                inproc.append(time.perf_counter() - t0)
            (sp50, sp99), (hp50, hp99), (lp50, lp99) = _pct(served), _pct(hop2), _pct(inproc)
            overhead[t] = sp50 / lp50
            rows.append((f"/predict T={t}  serve p50 / p99 (ms)", f"{sp50:8.1f} / {sp99:8.1f}"))
            rows.append((f"/predict T={t}  inline: false (+1 hop) p50 / p99 (ms)", f"{hp50:8.1f} / {hp99:8.1f}"))
            rows.append((f"in-process T={t} p50 / p99 (ms)", f"{lp50:8.1f} / {lp99:8.1f}"))
            rows.append((f"Serve overhead T={t} inline: false (p50 ratio)", f"{hp50 / lp50:8.2f}x"))
            rows.append((f"Serve overhead T={t} (p50 ratio)", f"{overhead[t]:8.2f}x"))
        fp50, fp99 = _pct(floor)
        rows.append((f"Serve floor: bare replica reading the same {len(image) // 1000} KB body p50 / p99 (ms)",
                     f"{fp50:8.1f} / {fp99:8.1f}"))
        rows.append(("lowest ratio Serve allows here at T=100: (in-process + floor) / in-process",
                     f"{(lp50 + fp50) / lp50:8.2f}x"))
        for conc in (1, 8, 32):
            rps = asyncio.run(_throughput(url, image, conc, max(n, 2 * conc), 100))
            rows.append((f"throughput T=100 concurrency {conc:>2} (req/s)", f"{rps:8.1f}"))
        rows.append((f"offline batched throughput T=100, batch {a.max_batch_size} (img/s)", f"{offline_rps:8.1f}"))
        rows.append(("throughput concurrency 32 / offline batched", f"{rps / offline_rps:8.2f}x"))
        hop = {}
        for scope, t in (("head", 100), ("full", a.full_passes)):
            lat: dict[int, list[float]] = {1: [], a.mc_replicas: []}
            for _ in range(max(4, n // 2)):  # interleaved 1 vs N chunks
                for k in lat:
                    lat[k] += _http_latency(c, f"/{scope}/predict", image, 1, passes=t, fan_out=k)
            p50 = {k: _pct(v)[0] for k, v in lat.items()}
            for k in lat:
                rows.append((f"{scope} scope T={t} fan-out {k} chunk(s) p50 (ms)", f"{p50[k]:8.1f}"))
            rows.append((f"{scope} scope speed-up 1 -> {a.mc_replicas} chunks", f"{p50[1] / p50[a.mc_replicas]:8.2f}x"))
            hop[scope] = p50[a.mc_replicas] - p50[1]
        # fanning out T head passes over k replicas saves (1 - 1/k) T c of pass time and costs
        # the extra hops measured above (plus the pass time it did save at T=100)
        k = a.mc_replicas
        saved_per_pass = (1 - 1 / k) * pass_ms
        cost = hop["head"] + saved_per_pass * 100
        rows.append(("head scope MC pass cost in-process (ms/pass)", f"{pass_ms:8.4f}"))
        rows.append((f"head scope fan-out break-even T ({k} chunks)", f"{cost / saved_per_pass:8.0f}"))
    serve.shutdown()
    ray.shutdown()

    width = max(len(k) for k, _ in rows)
    mode = "plain Serve" if a.plain_serve else "Serve high-throughput mode"
    print(f"\nServe latency benchmark ({n} requests/cell, {a.num_cpus} CPUs, {mode}, efficientnet_lite0 + head d, 224 px)")
    print("-" * (width + 20))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(f"serve overhead p50 T=100: {overhead[100]:.2f}×")


if __name__ == "__main__":
    main()
