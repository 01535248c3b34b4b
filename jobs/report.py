"""Ray Job entrypoint: write the analysis report of an experiment directory.

    ray job submit --working-dir . -- python jobs/report.py /abs/path/EXP_DIR
(see jobs/sweep.py for token authentication).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and write the report; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exp_dir", type=Path, help="experiment directory written by the sweep")
    parser.add_argument("--out", type=Path, help="report folder (default EXP_DIR/report)")
    parser.add_argument("--select", help="validation metric picking the best configuration")
    args = parser.parse_args(argv)

    from raycyto.analysis.report import write_report
    from raycyto.errors import RaycytoError

    try:
        out = write_report(args.exp_dir, args.out, args.select)
    except RaycytoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
