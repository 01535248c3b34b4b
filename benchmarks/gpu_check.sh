#!/usr/bin/env bash
# The check to run the moment a GPU is lent (<= 8 minutes on one H100/H200): CUDA training parity,
# four 0.25-GPU trials at once, bf16/fp32 images/s of every study backbone, Serve latency at T=100.
# One table on stdout, progress on stderr, exit status 1 when a check failed.
#   bash benchmarks/gpu_check.sh            # on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu      # here, without a GPU (< 2 minutes; CI runs it)
#   bash benchmarks/gpu_check.sh --out DIR  # keep every file (default: a temp folder)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python
[ -x .venv/bin/python ] && PY=.venv/bin/python
exec "$PY" benchmarks/gpu_check.py "$@"
