"""Ray Job entrypoint: ``raycyto report`` itself (same options, same exit codes), the analysis report
of an experiment directory.

    ray job submit --working-dir . -- python jobs/report.py /abs/path/EXP_DIR
(see jobs/sweep.py for token authentication; ``-- raycyto report ...`` runs the same command).
"""

import sys

import typer

from raycyto.cli import app

if __name__ == "__main__":  # the typer command itself: options cannot drift from the CLI
    typer.main.get_command(app).commands["report"].main(sys.argv[1:], prog_name="raycyto report")
