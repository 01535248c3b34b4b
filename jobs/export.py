"""Ray Job entrypoint: export the best trial of an experiment as a servable model bundle.

    ray job submit --working-dir . -- python jobs/export.py /abs/EXP_DIR --out /abs/model
(see jobs/sweep.py for token authentication).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and export; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exp_dir", type=Path, help="experiment directory written by the sweep")
    parser.add_argument("--out", required=True, help="folder (or s3://... URI) for the model bundle")
    parser.add_argument("--best", help="selection metric (default: the sweep's)")
    parser.add_argument("--trial", help="export this trial id instead of the best")
    args = parser.parse_args(argv)

    from raycyto.errors import RaycytoError
    from raycyto.export.core import export_model

    try:
        out = export_model(args.exp_dir, args.out, best=args.best, trial=args.trial)
    except RaycytoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"model bundle: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
