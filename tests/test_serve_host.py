"""The Ingress's model host and how Serve is started, without a Serve: the local host (Engine,
batching with local_batch outside a replica) batches concurrent requests, images of different
sizes included, and answers as each request alone does; both hosts have the whole ModelHost
interface; serve_env's HAProxy settings."""

from __future__ import annotations

import asyncio
import inspect
import os

import numpy as np
import pytest

from raycyto.serve import app as serve_app
from raycyto.serve.app import Engine, ModelHost, RemoteHost, local_batch, serve_env
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
    assert chosen > 0 and set_[metrics] == str(chosen) and os.environ[serve_app.AUTO_PORTS_ENV] == metrics
    # a child process inherits this environment and starts its own Ray: the port serve_env chose
    # is chosen again (the parent's HAProxy may hold it), the user's stays
    for _ in range(5):
        serve_env()
        if int(os.environ[metrics]) != chosen:
            break
    assert int(os.environ[metrics]) != chosen and os.environ[stats] == "18404"


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
