"""Ray Job entrypoint: ``raycyto sweep`` itself (same options, same exit codes), run or resume a sweep
on the cluster the job runs in.

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
(an entrypoint of ``raycyto sweep`` with the same options runs the same command.)
"""

import sys

import typer

from raycyto.cli import app

if __name__ == "__main__":  # the typer command itself: options cannot drift from the CLI
    typer.main.get_command(app).commands["sweep"].main(sys.argv[1:], prog_name="raycyto sweep")
