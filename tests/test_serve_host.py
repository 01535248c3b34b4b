"""The Ingress's model host and how Serve is started: the local host (Engine, batching with
local_batch outside a replica) batches concurrent requests, images of different sizes included,
and answers as each request alone does; both hosts have the whole ModelHost interface;
serve_env's HAProxy settings; the remote host on a live Serve loses Backbone replicas under
load without a 500 (retried on another replica, else 503 + Retry-After) and heals."""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
import time
from collections import Counter

import httpx
import numpy as np
import pytest
import ray
from conftest import encode_image, free_port, shutdown_serve
from ray import serve

from raycyto.serve import app as serve_app
from raycyto.serve.app import AppArgs, Engine, ModelHost, RemoteHost, build_app, local_batch, serve_env
from raycyto.serve.predict import chunk_plan


def test_both_hosts_have_the_whole_model_host_interface():
    wanted = {n for n, f in inspect.getmembers(ModelHost, inspect.iscoroutinefunction) if not n.startswith("_")}
    assert wanted == {"describe", "ready", "embed", "predict"}
    for host in (Engine, RemoteHost):
        for name in wanted:
            assert inspect.iscoroutinefunction(getattr(host, name)), (host, name)
            assert list(inspect.signature(getattr(host, name)).parameters) == \
                list(inspect.signature(getattr(ModelHost, name)).parameters), (host, name)


def test_a_batch_of_different_image_sizes_answers_as_each_image_alone(serve_bundle):
    """serve_bundle has no image_size: images keep their decoded size until the backbone input,
    so a batch of different sizes used to fail to stack (a 500 on a busy endpoint)."""
    import json

    assert json.loads((serve_bundle / "model.json").read_text()).get("image_size") is None
    rng = np.random.default_rng(0)
    images = [(rng.random(shape) * 255).astype(np.uint8) for shape in ((48, 64, 3), (64, 64, 3), (80, 56, 3))]
    images.append(images[0].copy())  # the first one again: one size group of two
    plan = chunk_plan(6, 1, seed=3)
    key = str(serve_bundle)

    class Sizes(list):  # the engine's batch metrics: records each batch's size
        def batch(self, name: str, n: int) -> None:
            self.append(n)

    sizes, single = Sizes(), Sizes()

    async def run() -> tuple[list[dict], list[dict], dict]:
        batched = Engine.local([key], max_batch_size=8, batch_wait_timeout_s=0.2, metrics=sizes)
        together = await asyncio.gather(*[batched.predict(key, im, plan) for im in images])
        alone = Engine.local([key], max_batch_size=1, metrics=single)
        one_by_one = [await alone.predict(key, im, plan) for im in images]
        return together, one_by_one, await batched.describe(key)

    together, one_by_one, described = asyncio.run(run())
    assert sizes == [4] and single == [1, 1, 1, 1]  # the four sizes shared one batch (outside Serve)
    assert described["info"]["name"] == "demo" and described["scope"] == "head"
    for a, b in zip(together, one_by_one):
        assert a["probs"].shape == (6, 2) and a["replica"] == "local"
        np.testing.assert_allclose(a["probs"], b["probs"], atol=1e-5)
    np.testing.assert_allclose(together[0]["probs"], together[3]["probs"], atol=1e-6)  # same image, same seed


def test_local_batch_runs_what_queued_meanwhile_and_gives_each_caller_its_answer_or_the_error():
    seen: list[list] = []

    @local_batch(max_batch_size=3)
    async def double(xs: list) -> list:
        seen.append(list(xs))
        if "boom" in xs:
            raise ValueError("boom")
        return [2 * x for x in xs]

    async def run() -> tuple[list, list]:
        return (await asyncio.gather(*[double(i) for i in range(5)]),
                await asyncio.gather(double(1), double("boom"), return_exceptions=True))

    answers, failed = asyncio.run(run())
    assert answers == [0, 2, 4, 6, 8] and seen[:2] == [[0, 1, 2], [3, 4]]
    assert all(isinstance(e, ValueError) for e in failed)  # one batch, both callers get its error


@pytest.fixture
def environ(monkeypatch) -> dict:
    """A copy of the environment as ``os.environ`` for the test (nothing leaks into the session)."""
    env = dict(os.environ)
    monkeypatch.setattr(os, "environ", env)
    return env


def test_serve_env_sets_the_mode_and_free_haproxy_ports_and_keeps_what_the_user_set(environ):
    for key in (*serve_app.SERVE_ENV, *serve_app.HAPROXY_PORT_ENV, serve_app.AUTO_PORTS_ENV):
        environ.pop(key, None)
    stats, metrics = serve_app.HAPROXY_PORT_ENV
    environ[stats] = "18404"  # the user's
    set_ = serve_env()
    assert {k: os.environ[k] for k in serve_app.SERVE_ENV} == serve_app.SERVE_ENV
    assert os.environ[stats] == "18404" and stats not in set_
    chosen = int(os.environ[metrics])
    assert chosen > 0 and set_[metrics] == str(chosen) and os.environ[serve_app.AUTO_PORTS_ENV] == f"{metrics}={chosen}"
    # a child process inherits this environment and starts its own Ray: the port serve_env chose
    # is chosen again (the parent's HAProxy may hold it), the user's stays
    for _ in range(5):
        serve_env()
        if int(os.environ[metrics]) != chosen:
            break
    assert int(os.environ[metrics]) != chosen and os.environ[stats] == "18404"
    environ[metrics] = "19101"  # a port the user gives a child process whose parent chose one
    serve_env()
    assert os.environ[metrics] == "19101" and os.environ[stats] == "18404"


def test_serve_env_leaves_haproxy_ports_alone_when_haproxy_is_off(environ):
    for key in (*serve_app.HAPROXY_PORT_ENV, serve_app.AUTO_PORTS_ENV):
        environ.pop(key, None)
    environ["RAY_SERVE_ENABLE_HA_PROXY"] = "0"
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in serve_env()
    assert not any(k in os.environ for k in serve_app.HAPROXY_PORT_ENV)


@pytest.mark.parametrize("name", ["local.yaml", "main_jobs.yaml", "gpu_cluster.yaml"])
def test_every_serve_config_says_how_to_start_ray_for_it(name):
    from pathlib import Path

    text = (Path(__file__).parents[1] / "serve_configs" / name).read_text()
    assert all(f"{k}={v}" in text for k, v in serve_app.SERVE_ENV.items()), name


def _backbone_actors(app: str) -> list:
    """Handles of the running Backbone replica actors of Serve app ``app``."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{app}#Backbone#")]
    return [ray.get_actor(n, namespace="serve") for n in names]


@pytest.mark.slow
def test_a_backbone_replica_killed_under_load_costs_no_500_and_serve_heals(ray_local, serve_bundle):
    """The remote host (Ingress -> Backbone, inline: false) on a local Serve with 2 Backbone
    replicas: one killed under steady requests, then both; every answer is 200 or 503 with
    Retry-After (never a 500), and the endpoint answers 200 again within 60 s. The call timeout
    (20 s) is far above a loaded CI machine's answer time, so a 503 after the first kill can only
    mean the retry did not take the call to the surviving replica."""

    port, app = free_port(), "host-kill"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(AppArgs(model_dir=str(serve_bundle), inline=False, backbone_replicas=2,
                                    backbone_num_cpus=0.25, mc_replicas=1, mc_num_cpus=0.1, ingress_num_cpus=0.1,
                                    backbone_timeout_s=20.0)), name=app, route_prefix="/")
        png = encode_image((np.random.default_rng(0).random((48, 48, 3)) * 255).astype(np.uint8), ".png")
        codes: list[tuple[int, bool]] = []
        sent_after_kill: list[tuple[int, bool]] = []  # answers to requests sent after the first kill
        killed, stop = threading.Event(), threading.Event()

        def client() -> None:  # steady requests, one at a time per client
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
                while not stop.is_set():
                    after = killed.is_set()
                    r = c.post("/predict", content=png, headers={"content-type": "image/png"}, params={"passes": 4})
                    codes.append((r.status_code, "retry-after" in r.headers))
                    if after:
                        sent_after_kill.append(codes[-1])

        threads = [threading.Thread(target=client) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            time.sleep(2)
            victims = _backbone_actors(app)
            assert len(victims) == 2
            ray.kill(victims[0], no_restart=True)  # one replica dies mid-traffic: its calls go to the other
            killed.set()
            deadline = time.monotonic() + 60  # >= 4 s and >= 6 answers, however slow the machine
            time.sleep(4)
            while time.monotonic() < deadline and len(sent_after_kill) < 6:
                time.sleep(0.5)
            one_killed = list(sent_after_kill)
            for v in _backbone_actors(app):  # then every replica: 503 + Retry-After until Serve restarts them
                ray.kill(v, no_restart=True)
            time.sleep(5)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and [c for c, _ in codes[-3:]] != [200] * 3:
                time.sleep(1)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        seen = f"(status, Retry-After): one replica killed {Counter(one_killed)}, in all {Counter(codes)}"
        assert {c for c, _ in codes} <= {200, 503}, seen
        assert all(retry for c, retry in codes if c == 503), seen  # every 503 says when to retry
        assert len(one_killed) >= 6 and all(c == 200 for c, _ in one_killed), seen  # the retry took them
        assert [c for c, _ in codes[-3:]] == [200] * 3, seen  # healthy again within 60 s
    finally:
        shutdown_serve()  # the next module's serve.start gets its own controller and port
