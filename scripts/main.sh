#!/usr/bin/env bash
# The main job: set up .venv and run raycyto end to end on the built-in synthetic karyograms
# (generate -> sweep -> report -> export -> serve -> query). Extra arguments go to `raycyto run`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/env.sh main
exec .venv/bin/raycyto run "$@"
