"""A clean stop of `raycyto serve` (its own process and Ray), as systemd, Docker and Kubernetes
stop it: SIGTERM under load. New requests get 503 or find the port closed, the ones in flight
finish, no native stack dump, exit status 0, one line saying it stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")

from conftest import encode_image, free_port  # noqa: E402

REQUESTS, WORKERS, SPACING_S = 40, 8, 0.02


class Load:
    """``REQUESTS`` POSTs to /predict from ``WORKERS`` threads, each on a fresh connection (no
    keep-alive, as independent clients), started ``SPACING_S`` apart; counts those sent and
    not yet answered."""

    def __init__(self, url: str, png: bytes) -> None:
        self.client = httpx.Client(base_url=url, timeout=90, limits=httpx.Limits(max_keepalive_connections=0))
        self.png = png
        self.lock = threading.Lock()
        self.outstanding = self.answered = 0
        self.t0 = time.monotonic()

    def one(self, i: int) -> tuple[float, float, str]:
        """(when its request went out, or when the connection failed; when it ended; the outcome)."""
        time.sleep(max(0.0, self.t0 + i * SPACING_S - time.monotonic()))
        sent: list[float] = []

        def trace(event: str, info: dict) -> None:
            if event == "http11.send_request_headers.started":
                with self.lock:
                    sent.append(time.monotonic())
                    self.outstanding += 1

        try:
            r = self.client.post("/predict", content=self.png, headers={"content-type": "image/png"},
                                 extensions={"trace": trace})
            outcome = str(r.status_code)
            if r.status_code == 503:
                assert r.json()["error"] == "unavailable" and r.headers.get("retry-after"), r.text
        except httpx.ConnectError:
            outcome = "refused"
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
            outcome = "cut"
        end = time.monotonic()
        with self.lock:
            self.outstanding -= bool(sent)
            self.answered += 1
        return (sent[0] if sent else end), end, outcome


def test_sigterm_under_load_finishes_the_requests_in_flight_and_exits_0(serve_bundle, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    png = encode_image((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8), ".png")
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "raycyto"), "serve", str(serve_bundle), "--port", str(port),
             "--num-cpus", "2", "--mc-replicas", "1"],
            stdout=o, stderr=e, cwd=tmp_path, start_new_session=True, env={**os.environ, "RAY_ADDRESS": "local"})
        try:
            deadline = time.monotonic() + 300  # a loaded 2-core box
            while "ready:" not in out.read_text():
                assert proc.poll() is None, out.read_text()[-3000:] + err.read_text()[-3000:]
                assert time.monotonic() < deadline, "never ready:\n" + err.read_text()[-3000:]
                time.sleep(0.5)
            assert httpx.post(f"{url}/predict", content=png, headers={"content-type": "image/png"},
                              timeout=120).status_code == 200   # warm

            load = Load(url, png)
            with ThreadPoolExecutor(WORKERS) as pool, load.client:
                futures = [pool.submit(load.one, i) for i in range(REQUESTS)]
                give_up = time.monotonic() + 60
                while (load.answered < REQUESTS // 5 or load.outstanding < 4) and time.monotonic() < give_up:
                    time.sleep(0.002)   # a fifth answered and several in flight: stop it now
                t_sig = time.monotonic()
                proc.send_signal(signal.SIGTERM)  # the process only, as `kill -TERM <pid>`
                results = [f.result() for f in futures]
            rc = proc.wait(timeout=120)
            t_exit = time.monotonic()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    stdout, stderr = out.read_text(), err.read_text()

    before = [o for sent, _, o in results if sent < t_sig]   # sent before the signal
    in_flight = [o for sent, end, o in results if sent < t_sig < end]
    after = [o for sent, _, o in results if sent >= t_sig]
    counts = {"before the signal": Counter(before), "of which in flight at it": Counter(in_flight),
              "after it": Counter(after), "exit": rc, "stop took (s)": round(t_exit - t_sig, 1)}
    print(f"\nSIGTERM under load: {counts}\n{stdout.splitlines()[-1] if stdout else ''}")
    assert rc == 0, (counts, stdout[-2000:], stderr[-3000:])
    assert "SIGTERM received" not in stderr and "***" not in stderr and "Traceback" not in stderr, stderr[-3000:]
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("stopped on SIGTERM: took no new requests, finished the "), stdout[-2000:]
    assert "cut" not in last, last
    # sent before the signal: answered (200), or refused politely if it reached the ingress after it
    assert set(before) <= {"200", "503"}, counts
    assert in_flight and set(in_flight) <= {"200", "503"} and "200" in in_flight, counts
    # after it: a 503, or a connection error once Serve is down (refused; or cut when it went
    # down between accepting the connection and answering); never another 5xx
    assert set(after) <= {"200", "503", "refused", "cut"}, counts
    assert after and set(after) & {"503", "refused", "cut"}, counts
    with pytest.raises(httpx.ConnectError):   # nothing listens any more
        httpx.get(f"{url}/v2/health/live", timeout=5)


def test_drain_refuses_new_requests_and_counts_the_ones_in_flight():
    """DrainMiddleware in-process (no Serve): the drain route needs its token; once draining, new
    requests and readiness get 503 while liveness stays 200 and a request in flight finishes."""
    import asyncio

    from raycyto.serve.api import DRAIN_HEADER, DRAIN_PATH, ApiSettings, ModelIndex, ServedModel, build_api

    class Backend:
        index = ModelIndex([ServedModel("k", "m", "v1", "a" * 64, ("x", "y"), 64, 10, 0.8)])

        def __init__(self) -> None:
            self.release = asyncio.Event()
            self.started = asyncio.Event()

        async def predict(self, model, image, passes, threshold, seed, fan_out=None, u=None, explain=False) -> dict:
            self.started.set()
            await self.release.wait()
            return {"label": "x", "confidence": 1.0, "refer": False, "passes": passes}

        async def ready(self, model=None) -> bool:
            return True

    png = encode_image(np.zeros((8, 8, 3), np.uint8), ".png")

    async def scenario() -> None:
        backend = Backend()
        plain = build_api(backend, ApiSettings(drain_token=None))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(plain), base_url="http://t") as c:
            assert (await c.post(DRAIN_PATH, headers={DRAIN_HEADER: ""})).status_code == 404   # no token: no route
        api = build_api(backend, ApiSettings(drain_token="s3cret"))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://t") as c:
            assert (await c.post(DRAIN_PATH, headers={DRAIN_HEADER: "wrong"})).status_code == 404
            assert (await c.get(DRAIN_PATH, headers={DRAIN_HEADER: "s3cret"})).status_code in (404, 405)
            slow = asyncio.create_task(c.post("/predict", content=png, headers={"content-type": "image/png"}))
            await asyncio.wait_for(backend.started.wait(), 10)
            r = await c.post(DRAIN_PATH, headers={DRAIN_HEADER: "s3cret"})
            assert r.json() == {"draining": True, "in_flight": 1}
            refused = await c.post("/predict", content=png, headers={"content-type": "image/png"})
            assert refused.status_code == 503 and refused.json()["error"] == "unavailable"
            assert refused.headers["retry-after"] == "1" and refused.headers["connection"] == "close"
            infer = await c.post("/v2/models/m/infer", json={})
            assert infer.status_code == 503 and "shutting down" in infer.json()["error"]   # OIP's error shape
            ready = await c.get("/v2/health/ready")
            assert ready.status_code == 503 and ready.json() == {"ready": False, "draining": True}
            assert (await c.get("/v2/health/live")).status_code == 200
            backend.release.set()
            answer = await asyncio.wait_for(slow, 10)   # the one in flight finishes
            assert answer.status_code == 200 and answer.json()["label"] == "x"
            assert (await c.post(DRAIN_PATH, headers={DRAIN_HEADER: "s3cret"})).json()["in_flight"] == 0

    asyncio.run(scenario())
