#!/usr/bin/env bash
# Reliability: the main job with outbound network blocked (no hidden downloads).
#
# Installs first (that needs the package index), then runs `raycyto run` inside a fresh
# network namespace that has only loopback: any attempt to fetch weights or data fails
# there. Prints the proof that the network is blocked, then the job's own output and
# wall-clock. Needs root for `unshare --net` (as on the CI and developer machines).
#
#   bash benchmarks/offline_main_job.sh                  # karyogram demo -> runs/offline
#   bash benchmarks/offline_main_job.sh --task leukemia  # extra args go to `raycyto run`
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/env.sh main
exec unshare --net -- bash -c '
  ip link set lo up
  if .venv/bin/python -c "import socket; socket.create_connection((\"pypi.org\", 443), timeout=5)" 2>/dev/null; then
    echo "network is NOT blocked; refusing to call this an offline run" >&2; exit 3
  fi
  echo "network: blocked (this namespace has loopback only)"
  start=$(date +%s)
  .venv/bin/raycyto run --out runs/offline "$@"
  echo "offline main job finished in $(( $(date +%s) - start )) s"
' offline "$@"
