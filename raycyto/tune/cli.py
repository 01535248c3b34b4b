"""``raycyto sweep``: run or resume a cross-validated Tune sweep (heavy imports inside)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def sweep(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Sweep config YAML."),
    data: Optional[str] = typer.Option(None, "--data", help="Override data.source (folder, manifest, URI)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Experiment directory to create."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Override storage: a folder, or s3://bucket/prefix "
                                          "(Tune state and every trial's files go there; needed on multi-node clusters)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the interrupted sweep in EXP_DIR."),
    positive_class: Optional[str] = typer.Option(None, "--positive-class", help="Override data.positive_class "
                                                 "(binary tasks: the class whose recall matters most)."),
    set_: list[str] = typer.Option([], "--set", help="Override any config field, checked like the YAML: "
                                   "--set train.epochs=30 --set 'data.classes=[cat, dog]' (repeatable)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary table."),
) -> None:
    """Run every backbone x finetune x head cell on every fold with Bayesian search per cell.

    Starts a local Ray (all cores, or RAYCYTO_NUM_CPUS) unless RAY_ADDRESS points at a cluster.

    Example: raycyto sweep --config jobs/configs/demo.yaml --out experiments/demo --set train.epochs=30
    """
    from rich.console import Console

    from raycyto.errors import exit_on_user_error
    from raycyto.tune.sweep import sweep_main

    with exit_on_user_error():  # "error: ..." on one line and exit 2, also when raised in a Ray task
        exp_dir = sweep_main(config=config, data=data, out=out, resume=resume, progress=not quiet,
                             storage=storage, positive_class=positive_class, sets=tuple(set_))
    Console().print(f"experiment directory: {exp_dir}")
