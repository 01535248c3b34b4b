"""Ray Job entrypoint: run (or resume) a raycyto sweep on the cluster the job runs in.

Submit to a local head node (Ray 2.60 keeps token authentication ON):

    RAY_AUTH_MODE=token ray start --head --num-cpus 2     # creates ~/.ray/auth_token if missing
    export RAY_AUTH_MODE=token                           # the client must use token auth too
    # the client reads the token from ~/.ray/auth_token (same machine/user), or from
    #   RAY_AUTH_TOKEN=<token>  or  RAY_AUTH_TOKEN_PATH=/path/to/token  (remote clients);
    # print it on the head with:  ray get-auth-token
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/sweep.py --config jobs/configs/demo.yaml --out /tmp/experiments/demo

Inside the job RAY_ADDRESS is set, so the sweep connects to that cluster instead of
starting its own. With a relative --out the experiment lands in the job's working
directory copy; pass an absolute path (or shared storage) to keep it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the sweep; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="sweep config YAML")
    parser.add_argument("--data", help="override data.source")
    parser.add_argument("--out", type=Path, help="experiment directory")
    parser.add_argument("--storage", help="override storage: a folder or s3://bucket/prefix (multi-node clusters)")
    parser.add_argument("--resume", type=Path, help="continue the sweep in this EXP_DIR")
    parser.add_argument("--positive-class", help="override data.positive_class")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)

    from raycyto.errors import RaycytoError
    from raycyto.tune.sweep import sweep_main

    try:
        exp_dir = sweep_main(config=args.config, data=args.data, out=args.out, resume=args.resume,
                             progress=not args.quiet, storage=args.storage, positive_class=args.positive_class,
                             sets=tuple(args.set))
    except RaycytoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"experiment directory: {exp_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
