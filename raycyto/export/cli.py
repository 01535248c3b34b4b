"""``raycyto export`` (registered as a command by the root CLI)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def export(
    exp_dir: Path = typer.Argument(..., help="experiment folder written by `raycyto sweep`, or a main-job "
                                   "folder such as runs/demo (its experiment/ is used)"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="folder (or s3://... URI) for the model bundle "
                                      "(default: runs/demo/model for a main-job folder, else EXP_DIR/model)"),
    select: Optional[str] = typer.Option(None, "--select", help="selection rule, the same as `raycyto report "
                                         "--select` (default: the sweep's search metric), e.g. auc or "
                                         "recall@specificity>=0.9"),
    trial: Optional[str] = typer.Option(None, "--trial", help="export this trial id instead (a baseline such "
                                        "as probe-efficientnet_lite0 only this way)"),
    target_recall: Optional[float] = typer.Option(None, "--target-recall", help="binary tasks: recall target of "
                                                  "the risk-controlled threshold (default mc.target_recall; the "
                                                  "same as `raycyto report --target-recall`)"),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="vote threshold stored for Serve "
                                              "(default: the sweep's mc.threshold)"),
    refer_rule: Optional[str] = typer.Option(None, "--refer-rule", help="referral rule stored for Serve: vote "
                                             "(confidence < threshold), set (prediction set not one class) or "
                                             "risk (risk-controlled threshold; binary) (default mc.refer_rule)"),
    layout: Optional[Path] = typer.Option(None, "--layout", help="karyogram layout stored in the bundle, so "
                                          "answers name chromosomes: a JSON or CSV file of chromosome slots "
                                          "(name,x0,y0,x1,y1 in normalised image coordinates; README: Where the "
                                          "evidence is); "
                                          "default: the config's data.layout, else the built-in one for "
                                          "raycyto.synth karyograms, else none (evidence map only)"),
) -> None:
    """Export the configuration the report calls best (chosen on validation folds) as a servable bundle,
    with its referral calibration (prediction sets, risk-controlled threshold) on the trial's
    out-of-fold test predictions: rows that chose nothing.

    Example: raycyto export runs/demo --select auc --refer-rule risk --target-recall 0.9
    """
    from raycyto.errors import RaycytoError
    from raycyto.evidence.layout import LAYOUT_FILE
    from raycyto.export.core import export_model
    from raycyto.storage import read_text

    try:
        path = export_model(exp_dir, out, select=select, trial=trial, target_recall=target_recall,
                            threshold=threshold, refer_rule=refer_rule, layout=layout)
    except RaycytoError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    meta = json.loads(read_text(f"{path}/model.json"))
    sel, test = meta.get("selection", {}), meta.get("metrics", {}).get("test", {})
    typer.echo(f"exported {meta.get('name')} (trial {sel.get('trial_id')}, fold {sel.get('fold')}; "
               f"rule {sel.get('rule')}); that fold's test accuracy {test.get('accuracy', float('nan')):.3f}, "
               f"balanced accuracy {test.get('balanced_accuracy', float('nan')):.3f} -> {path}")
    if LAYOUT_FILE in (meta.get("files") or {}):
        source = json.loads(read_text(f"{path}/{LAYOUT_FILE}")).get("source") or LAYOUT_FILE
        typer.echo(f"layout: {source} (answers name chromosomes)")
    else:
        typer.echo("layout: none (answers give the evidence map only; --layout FILE names chromosomes)")
    referral = meta.get("referral")
    if referral is None:
        typer.echo("referral: vote rule only (no out-of-fold rows to calibrate prediction sets on)")
        return
    conf, cal = referral["conformal"], referral["calibrated_on"]
    typer.echo(f"referral rule: {referral['rule']}; vote threshold {meta['mc']['threshold']:g}; prediction set "
               f"{conf['score']} at {conf['level']:g}{' per class' if conf['calibration']['mondrian'] else ''} "
               f"(calibrated on {cal['n']} {cal.get('rows', 'validation rows')}); temperature "
               f"{referral['temperature']['temperature']:.3g}")
    if "risk" in referral:
        typer.echo(f"risk-controlled threshold: {referral['risk']['statement']}")
        best = referral["risk"].get("certifiable")
        typer.echo(f"highest certifiable recall: {best['statement']}" if best else
                   "highest certifiable recall: none (too few positive out-of-fold cases)")
