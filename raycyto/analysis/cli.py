"""``raycyto report``: tables, figures and report.html from one experiment directory."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def report(
    exp_dir: Path = typer.Argument(..., help="Experiment directory written by `raycyto sweep`."),
    out: Optional[Path] = typer.Option(None, "--out", help="Report folder (default EXP_DIR/report)."),
    select: Optional[str] = typer.Option(
        None, "--select", help="Validation metric picking the best configuration: accuracy, "
        "precision, recall, f1, auc or loss (default: recall for binary, f1 for multiclass)."),
    target_recall: Optional[float] = typer.Option(
        None, "--target-recall", help="Also report the smallest MC threshold reaching this "
        "recall on validation predictions, and the referral rate it costs."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Write summary/per_class/folds/hpo/mispredictions CSVs, PNG figures and report.html.

    Example: raycyto report runs/karyo --select recall --target-recall 0.95
    """
    from rich.console import Console

    from raycyto.analysis.report import write_report
    from raycyto.errors import RaycytoError

    console = Console(stderr=True)
    try:
        path = write_report(exp_dir, out, metric=select, target_recall=target_recall,
                            progress=not quiet)
    except RaycytoError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    console.print(f"wrote {path}", highlight=False, soft_wrap=True)
