#!/usr/bin/env bash
# The test command: set up .venv (with test extras) and run the whole test suite.
# Two phases: every test but the `serial` ones on 2 xdist workers, a test file to a worker (its
# module fixtures live as in a serial run; each worker has its own local Ray; the suite waits on
# Ray, Tune and Serve start-ups far more than it computes), longest files first
# (tests/durations.json, see conftest.py), then the `serial` tests alone (they start a
# `ray start --head` cluster, which a plain ray.init() in another worker would join).
# JUnit reports go to test-results/ (scripts/test_durations.py refreshes tests/durations.json
# from them). Arguments go to both phases.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/env.sh test
export PYTHONHASHSEED=0
ok() { [ "$1" -eq 0 ] || [ "$1" -eq 5 ]; }  # 5: no test of this phase was selected
rc1=0; .venv/bin/python -m pytest -q --durations=15 -n 2 --dist loadfile --no-loadscope-reorder -m "not serial" \
    --junitxml=test-results/parallel.xml "$@" || rc1=$?
rc2=0; .venv/bin/python -m pytest -q --durations=5 -m serial --junitxml=test-results/serial.xml "$@" || rc2=$?
ok "$rc1" && ok "$rc2" && ! { [ "$rc1" -eq 5 ] && [ "$rc2" -eq 5 ]; }
