"""Shared fixtures: one small local Ray per test session, tiny synthetic datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never download anything; make hub-style loaders fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with the modest resources of this machine (2 CPUs)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False,
                 log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def karyo_dir(tmp_path_factory) -> Path:
    """10 synthetic patients x 2 karyograms at 96 px."""
    from raycyto.synth import generate

    out = tmp_path_factory.mktemp("karyo")
    generate("karyogram", out, patients=10, per_patient=2, seed=0, size=96, progress=False)
    return out


@pytest.fixture(scope="session")
def leuk_dir(tmp_path_factory) -> Path:
    """10 synthetic patients x 2 blood-smear fields at 64 px."""
    from raycyto.synth import generate

    out = tmp_path_factory.mktemp("leuk")
    generate("leukemia", out, patients=10, per_patient=2, seed=0, size=64, progress=False)
    return out
