"""Ray Job entrypoint: ``raycyto export`` itself (same options, same exit codes), the best trial of an
experiment as a servable model bundle.

    ray job submit --working-dir . -- python jobs/export.py /abs/EXP_DIR --out /abs/model
(see jobs/sweep.py for token authentication; ``-- raycyto export ...`` runs the same command).
"""

import sys

import typer

from raycyto.cli import app

if __name__ == "__main__":  # the typer command itself: options cannot drift from the CLI
    typer.main.get_command(app).commands["export"].main(sys.argv[1:], prog_name="raycyto export")
