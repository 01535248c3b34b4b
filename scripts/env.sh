#!/usr/bin/env bash
# Create or update the project's virtual environment (.venv) and install raycyto into it.
# Sourced by scripts/main.sh and scripts/test.sh; safe to run again (re-installs only when
# pyproject.toml changed). torch/torchvision are pinned to the builds on this machine's disk.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.raycyto-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)-${1:-main}"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "==> installing raycyto and its dependencies into .venv (first run takes a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  if [ "${1:-main}" = test ]; then extra='.[test]'; else extra='.'; fi
  .venv/bin/python -m pip install -q -e "$extra"
  echo "$want" > "$stamp"
fi
