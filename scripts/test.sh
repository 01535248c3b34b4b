#!/usr/bin/env bash
# The test command: set up .venv (with test extras) and run the whole test suite.
# Every test on 2 xdist workers, a test file to a worker (its module fixtures live as in a
# serial run; each worker has its own local Ray; the suite waits on Ray, Tune and Serve
# start-ups far more than it computes), longest files first (tests/durations.json, see
# conftest.py). A JUnit report goes to test-results/ (scripts/test_durations.py refreshes
# tests/durations.json from it). Arguments go to pytest.
# A failed test runs once more (--reruns 1; the summary counts reruns as "rerun"): several Rays
# share this machine, and a Serve test has failed once from another Ray's replica on its port
# (tests/conftest.py gives each its own port range); a test that fails twice fails the suite.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/env.sh test
export PYTHONHASHSEED=0
exec .venv/bin/python -m pytest -q --durations=15 -n 2 --dist loadfile --no-loadscope-reorder --reruns 1 \
    --junitxml=test-results/parallel.xml "$@"
