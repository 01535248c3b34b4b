"""Write every table (CSV), figure (PNG) and report.html for one experiment."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from raycyto.analysis import plots
from raycyto.analysis.html import Section, render_html
from raycyto.analysis.load import Experiment, load_experiment
from raycyto.analysis.metrics import SUMMARY_METRICS, confusion, recall_of
from raycyto.analysis.tables import (folds_table, hpo_table, mispredictions_table, per_class_table,
                                     resolve_rule, select_best, selection_table, summary_table,
                                     threshold_for_recall)
from raycyto.analysis.uncertainty import (expected_calibration_error, referral_curve,
                                          reliability_bins, top_label)


def _referral_job(exp: Experiment, rows: pd.DataFrame, cfg: str, path: Path,
                  note: str = "") -> tuple[str, str, Callable[[], Path]]:
    """Referral curve of one configuration's test predictions, configured threshold marked."""
    def draw() -> Path:
        y, mc = rows["label"].to_numpy(), rows["mc_label"].to_numpy()
        curve = referral_curve(y, mc, rows["mc_confidence"].to_numpy(), exp.num_classes, exp.positive)
        kept = ~rows["refer"].to_numpy(dtype=bool)
        at = {"kept_share": float(kept.mean()),
              "accuracy_kept": float(np.mean(y[kept] == mc[kept])) if kept.any() else np.nan,
              "recall_kept": recall_of(y[kept], mc[kept], exp.num_classes, exp.positive)}
        recall_name = f"{exp.class_names[exp.positive]} recall" if exp.positive is not None \
            else "macro recall"
        return plots.referral_plot(curve, exp.threshold, at, recall_name,
                                   f"{cfg}: referral by MC confidence, test", path)

    return path.name, f"referral curve, {cfg}, test (configured threshold marked){note}", draw


def _best_with_varying_confidence(exp: Experiment, summary: pd.DataFrame
                                  ) -> tuple[str, pd.DataFrame] | None:
    """(config, test rows) of the configuration with the best validation score whose MC
    confidence varies (heads with dropout); None when every configuration is deterministic."""
    test = exp.test_predictions
    for _, row in summary.sort_values("val_score", ascending=False).iterrows():
        rows = test[test["trial_id"] == row["trial_id"]]
        if rows["mc_confidence"].nunique() > 1:
            return row["config"], rows
    return None


def _figure_jobs(exp: Experiment, best: pd.Series, summary: pd.DataFrame, hpo: pd.DataFrame,
                 out: Path) -> list[tuple[str, str, Callable[[], Path]]]:
    """(file name, caption, draw) for every figure; drawing is deferred for the progress bar."""
    test = exp.test_predictions
    test = test[test["trial_id"] == best["trial_id"]]
    y = test["label"].to_numpy()                                   # [N]
    probs = test[exp.prob_columns].to_numpy(dtype=float)           # [N, C]
    names, c, cfg = exp.class_names, exp.num_classes, best["config"]
    jobs: list[tuple[str, str, Callable[[], Path]]] = []
    if len(test):
        jobs.append(("confusion_all.png", f"confusion matrix, {cfg}, all test folds",
                     lambda: plots.confusion_plot(confusion(y, test["pred"].to_numpy(), c), names,
                                                  f"{cfg}: all test folds", out / "confusion_all.png")))
        for fold, g in test.groupby("fold"):
            name = f"confusion_fold{fold}.png"
            jobs.append((name, f"confusion matrix, {cfg}, test fold {fold}",
                         lambda g=g, fold=fold, name=name: plots.confusion_plot(
                             confusion(g["label"].to_numpy(), g["pred"].to_numpy(), c), names,
                             f"{cfg}: test fold {fold}", out / name)))
        jobs.append(("roc.png", f"ROC, {cfg}, test" + ("" if exp.binary else " (one-vs-rest)"),
                     lambda: plots.roc_plot(y, probs, names, exp.positive, f"{cfg}: test ROC",
                                            out / "roc.png", folds=test["fold"].to_numpy())))

        def reliability() -> Path:
            curves = {}
            sources = {"softmax": exp.prob_columns}
            if set(exp.mc_mean_columns) <= set(test.columns):
                sources["MC mean"] = exp.mc_mean_columns
            for label, cols in sources.items():
                correct, conf = top_label(test[cols].to_numpy(dtype=float), y)
                curves[label] = (reliability_bins(correct, conf),
                                 expected_calibration_error(correct, conf))
            return plots.reliability_plot(curves, f"{cfg}: reliability, test",
                                          out / "reliability.png")

        jobs.append(("reliability.png", f"reliability diagram with ECE, {cfg}, test", reliability))

        jobs.append(_referral_job(exp, test, cfg, out / "referral.png"))
        if test["mc_confidence"].nunique() <= 1:  # no dropout in the best: show the best one with it
            alt = _best_with_varying_confidence(exp, summary)
            if alt is not None:
                jobs.append(_referral_job(exp, alt[1], alt[0], out / "referral_mc.png",
                                          " (best configuration whose MC passes vary)"))
    histories = exp.history(best["trial_id"])
    if histories:
        jobs.append(("training_curves.png", f"training curves per epoch, {cfg}",
                     lambda: plots.training_curves_plot(histories, cfg, out / "training_curves.png")))
    jobs.append(("hpo_scatter.png", "search samples: validation loss vs learning rate and batch size",
                 lambda: plots.hpo_scatter_plot(hpo, out / "hpo_scatter.png")))
    jobs.append(("comparison.png", "configurations compared on test folds (mean ± std)",
                 lambda: plots.comparison_plot(summary, SUMMARY_METRICS, out / "comparison.png")))
    return jobs


def write_report(exp_dir: str | Path, out_dir: str | Path | None = None, select: str | None = None,
                 target_recall: float | None = None, progress: bool = False) -> Path:
    """Write summary/per_class/folds/hpo/mispredictions/selection CSVs, PNG figures and report.html.

    Args:
        exp_dir: experiment directory written by ``raycyto sweep``, or a main-job folder
            (``runs/demo``) holding one in ``experiment/``.
        out_dir: where to write (default ``exp_dir/report``; ``runs/demo/report`` for a main-job folder).
        select: the selection rule (:mod:`raycyto.analysis.selection`; default: the sweep's
            search metric), the same one ``raycyto export`` uses.
        target_recall: also write thresholds.csv with the smallest MC threshold reaching this
            recall on validation predictions, its referral rate, and what it gives on test.
        progress: rich progress bars.

    Returns:
        Path of report.html.
    """
    from raycyto.analysis.load import default_report_dir, resolve_experiment_dir

    exp_dir = resolve_experiment_dir(exp_dir)
    exp = load_experiment(exp_dir, progress=progress)
    out = Path(out_dir) if out_dir is not None else default_report_dir(exp_dir)
    out.mkdir(parents=True, exist_ok=True)
    metric = resolve_rule(exp, select)

    selection = selection_table(exp, metric)
    best = select_best(exp, metric)
    summary = summary_table(exp, metric)
    tables = {"summary": summary, "per_class": per_class_table(exp, metric),
              "folds": folds_table(exp, metric), "hpo": hpo_table(exp, metric),
              "mispredictions": mispredictions_table(exp, metric), "selection": selection}
    if target_recall is not None:
        tables["thresholds"] = threshold_for_recall(exp, target_recall, metric)
    for name, df in tables.items():
        df.to_csv(out / f"{name}.csv", index=False)

    jobs = _figure_jobs(exp, best, summary, tables["hpo"], out)
    for _, _, draw in exp.track(jobs, len(jobs), "drawing figures"):
        draw()

    is_best = lambda df: (df["config"] == best["config"]).to_numpy()  # noqa: E731
    sections = [
        Section("summary: test folds of the trial selected per configuration", summary,
                summary["best"].to_numpy(),
                f"selected by {metric.describe()}, on validation folds only; highlighted: the "
                "best configuration (the one `raycyto export` exports); baseline rows: the linear probe. "
                "Binary: positive-class precision/recall/F1; multiclass: macro averages. "
                "std = sample std over folds."),
    ]
    if "thresholds" in tables:
        sections.append(Section(f"threshold for recall {target_recall:g} (chosen on validation)",
                                tables["thresholds"], tables["thresholds"]["best"].to_numpy()))
    sections += [
        Section("per class", tables["per_class"], is_best(tables["per_class"])
                if len(tables["per_class"]) else None),
        Section("folds", tables["folds"], is_best(tables["folds"]) if len(tables["folds"]) else None),
        Section("search samples (validation only)", tables["hpo"],
                tables["hpo"]["selected"].to_numpy(), "highlighted: the sample selected per cell"),
        Section("mispredictions (MC vote wrong), selected configurations", tables["mispredictions"],
                is_best(tables["mispredictions"]) if len(tables["mispredictions"]) else None),
    ]
    notes = [f"experiment: {exp.exp_dir}",
             f"best configuration by {metric.describe()}: {best['config']} "
             f"(trial {best['trial_id']}, validation {metric} {best['val_score']:.4g})"]
    page = render_html(exp, f"raycyto report: {exp.meta.get('task', '')} "
                            f"({', '.join(exp.class_names)})", sections,
                       [(name, caption) for name, caption, _ in jobs], notes)
    path = out / "report.html"
    path.write_text(page)
    return path
