"""Serve latency benchmark: real HTTP (httpx) against a local Ray Serve vs in-process.

Measures, side by side in one run:
  * p50 / p99 latency of POST /predict at T=1 and T=100 passes, and of the same model
    called in-process (LocalPredictor); ratio = Serve overhead;
  * throughput (requests/s) at client concurrency 1, 8 and 32 (T=100);
  * fan-out: the T passes in 1 chunk vs N chunks over N MC-head replicas, for a head-scope
    model (T=100) and a full-scope model (every pass runs the whole network).

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=20, help="requests per latency cell")
    p.add_argument("--mc-replicas", type=int, default=2)
    p.add_argument("--full-passes", type=int, default=8, help="T for the full-scope fan-out rows")
    p.add_argument("--num-cpus", type=int, default=2)
    a = p.parse_args()

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
    # thread like each replica here: two OpenMP threads on a loaded 2-core box spin-wait and
    # run 20-30x slower, which would flatter Serve.
    torch.set_num_threads(1)
    local = LocalPredictor(bundles["head"], mc_replicas=a.mc_replicas)
    local.predict_bytes(image, passes=1)  # warm-up

    ray.init(num_cpus=a.num_cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    small = dict(backbone_num_cpus=0.4, mc_num_cpus=0.2, ingress_num_cpus=0.1, mc_replicas=a.mc_replicas,
                 max_queued_requests=256, max_ongoing_requests=32)
    for name, path in bundles.items():
        serve.run(build_app(AppArgs(model_dir=str(path), **small)), name=name, route_prefix=f"/{name}")
    url = f"http://127.0.0.1:{port}"
    rows: list[tuple[str, str]] = []
    with httpx.Client(base_url=url, timeout=120) as c:
        _http_latency(c, "/head/predict", image, 3, passes=100)  # warm-up
        _http_latency(c, "/full/predict", image, 2, passes=2)
        for t in (1, 100):
            served, inproc = [], []
            for _ in range(n):  # interleaved, so both see the same background load
                served += _http_latency(c, "/head/predict", image, 1, passes=t)
                t0 = time.perf_counter()
                local.predict_bytes(image, passes=t)
                inproc.append(time.perf_counter() - t0)
            (sp50, sp99), (lp50, lp99) = _pct(served), _pct(inproc)
            rows.append((f"/predict T={t}  serve p50 / p99 (ms)", f"{sp50:8.1f} / {sp99:8.1f}"))
            rows.append((f"in-process T={t} p50 / p99 (ms)", f"{lp50:8.1f} / {lp99:8.1f}"))
            rows.append((f"Serve overhead T={t} (p50 ratio)", f"{sp50 / lp50:8.2f}x"))
        for conc in (1, 8, 32):
            rps = asyncio.run(_throughput(url, image, conc, max(n, 2 * conc), 100))
            rows.append((f"throughput T=100 concurrency {conc:>2} (req/s)", f"{rps:8.1f}"))
        for scope, t in (("head", 100), ("full", a.full_passes)):
            lat: dict[int, list[float]] = {1: [], a.mc_replicas: []}
            for _ in range(max(4, n // 2)):  # interleaved 1 vs N chunks
                for k in lat:
                    lat[k] += _http_latency(c, f"/{scope}/predict", image, 1, passes=t, fan_out=k)
            p50 = {k: _pct(v)[0] for k, v in lat.items()}
            for k in lat:
                rows.append((f"{scope} scope T={t} fan-out {k} chunk(s) p50 (ms)", f"{p50[k]:8.1f}"))
            rows.append((f"{scope} scope speed-up 1 -> {a.mc_replicas} chunks", f"{p50[1] / p50[a.mc_replicas]:8.2f}x"))
    serve.shutdown()
    ray.shutdown()

    width = max(len(k) for k, _ in rows)
    print(f"\nServe latency benchmark ({n} requests/cell, {a.num_cpus} CPUs, efficientnet_lite0 + head d, 224 px)")
    print("-" * (width + 20))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
