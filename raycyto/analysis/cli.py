"""``raycyto report``: tables, figures and report.html from one experiment directory."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def report(
    exp_dir: Path = typer.Argument(..., help="Experiment folder written by `raycyto sweep`, or a main-job "
                                   "folder such as runs/demo (its experiment/ is used)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Report folder (default EXP_DIR/report, or "
                                       "runs/demo/report for a main-job folder)."),
    select: Optional[str] = typer.Option(
        None, "--select", help="Selection rule, the same as `raycyto export --select`: a validation "
        "metric (accuracy, balanced_accuracy, precision, recall, specificity, f1, auc, loss) or a "
        "constrained rule such as recall@specificity>=0.9 (default: the sweep's search metric)."),
    target_recall: Optional[float] = typer.Option(
        None, "--target-recall", help="Also report the smallest MC threshold reaching this "
        "recall on validation predictions, and the referral rate it costs."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Write summary/per_class/folds/hpo/mispredictions CSVs, PNG figures and report.html.

    Example: raycyto report runs/demo --select 'recall@specificity>=0.8' --target-recall 0.95
    """
    from rich.console import Console

    from raycyto.analysis.report import write_report
    from raycyto.errors import RaycytoError

    console = Console(stderr=True)
    try:
        path = write_report(exp_dir, out, select=select, target_recall=target_recall,
                            progress=not quiet)
    except RaycytoError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    import pandas as pd

    from raycyto.analysis.load import read_csv

    summary = read_csv(path.parent / "summary.csv")
    best = summary[summary["best"]].iloc[0]
    console.print(f"best on validation {best['select_metric']}: {best['config']} (trial "
                  f"{best['trial_id']}); test accuracy {best['accuracy_mean']:.3f} ± "
                  f"{best['accuracy_std']:.3f}, recall {best['recall_mean']:.3f} ± "
                  f"{best['recall_std']:.3f}", highlight=False, soft_wrap=True)
    for _, b in summary[summary["baseline"].astype(bool)].iterrows():
        console.print(f"baseline {b['config']}: test accuracy {b['accuracy_mean']:.3f} ± "
                      f"{b['accuracy_std']:.3f}", highlight=False, soft_wrap=True)
    if target_recall is not None:
        t = read_csv(path.parent / "thresholds.csv")
        t = t[t["best"]].iloc[0]
        console.print(f"recall {target_recall:g} on validation needs MC threshold "
                      f"{t['threshold']:.3g} (refers {t['val_referral_rate']:.1%}); on test it "
                      f"refers {t['test_referral_rate']:.1%} with recall {t['test_recall_kept']:.3f}"
                      if pd.notna(t["threshold"]) else
                      f"no MC threshold reaches recall {target_recall:g} on validation",
                      highlight=False, soft_wrap=True)
    console.print(f"wrote {path}", highlight=False, soft_wrap=True)
