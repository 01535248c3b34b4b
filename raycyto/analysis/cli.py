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
        None, "--target-recall", help="Binary tasks: the recall target of the risk-controlled "
        "threshold (overrides mc.target_recall; thresholds.csv; pass the same value to `raycyto "
        "export`). Multiclass: also report the smallest MC threshold reaching this macro recall on "
        "validation (no guarantee)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    evidence: bool = typer.Option(True, "--evidence/--no-evidence", help="Explain the selected "
                                  "configuration's test images with its per-fold checkpoints: evidence.csv "
                                  "(pointing accuracy, deletion test) and the case gallery."),
    layout: Optional[Path] = typer.Option(None, "--layout", help="Karyogram layout file (JSON or CSV of "
                                          "chromosome boxes) naming chromosomes in the evidence (default: "
                                          "the config's data.layout, else the built-in one for raycyto.synth "
                                          "karyograms, else maps only)."),
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
                            progress=not quiet, evidence=evidence, layout=layout)
    except RaycytoError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None

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
    thresholds = path.parent / "thresholds.csv"
    if thresholds.is_file():
        t = read_csv(thresholds)
        t = t[t["best"].astype(bool)]
        if len(t) and "statement" in t:
            exported = t[t["exported"].astype(bool)]
            row = (exported if len(exported) else t).iloc[0]
            console.print(f"risk-controlled referral, exported fold {row['fold']}: {row['statement']} "
                          f"On test folds it refers {t['test_referral_rate'].mean():.1%} (the vote rule "
                          f"{t['vote_test_referral_rate'].mean():.1%}).", highlight=False, soft_wrap=True)
        elif len(t):
            console.print(f"recall {target_recall:g} on validation needs MC threshold "
                          f"{t['threshold'].mean():.3g} on average over folds (no guarantee); on test it "
                          f"refers {t['test_referral_rate'].mean():.1%} with recall "
                          f"{t['test_recall_kept'].mean():.3f}"
                          if t["threshold"].notna().any() else
                          f"no MC threshold reaches recall {target_recall:g} on validation",
                          highlight=False, soft_wrap=True)
    conformal = read_csv(path.parent / "conformal.csv")
    served = conformal[conformal["best"].astype(bool) & ~conformal["mondrian"].astype(bool)]
    for _, c in served.iterrows():
        console.print(f"prediction set {c['score']} at {c['level']:g}: test coverage "
                      f"{c['coverage_mean']:.3f} ± {c['coverage_std']:.3f}, mean size "
                      f"{c['set_size_mean']:.2f}", highlight=False, soft_wrap=True)
    console.print(f"wrote {path}", highlight=False, soft_wrap=True)
