#!/usr/bin/env bash
# The test command: set up .venv (with test extras) and run the whole test suite.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/env.sh test
export PYTHONHASHSEED=0
exec .venv/bin/python -m pytest -q --durations=15 "$@"
