"""The report's tables as pandas DataFrames (summary, per_class, folds, hpo, mispredictions,
selection, thresholds).

Selection reads validation data only (``Experiment.val_predictions`` and the ``val_``
columns of results.csv): per (backbone, finetune, head) cell the search sample with the
best validation metric is selected, and only then are its test folds scored.
Spreads are the sample standard deviation over folds (pandas ``std``, ddof=1).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from raycyto.analysis.load import CELL, FAILED_STATUSES, Experiment, ExperimentError
from raycyto.analysis.metrics import (SELECT_METRICS, SUMMARY_METRICS, classification_metrics,
                                      per_class_metrics)
from raycyto.analysis.uncertainty import (apply_threshold, expected_calibration_error,
                                          referral_at, smallest_threshold_for_recall, top_label)

FOLD_METRICS = (*SUMMARY_METRICS, "referral_rate", "accuracy_kept", "ece")
PER_CLASS_METRICS = ("precision", "recall", "f1")


def default_metric(exp: Experiment) -> str:
    """Positive-class recall for binary tasks, macro F1 otherwise."""
    return "recall" if exp.binary else "f1"


def config_name(backbone: str, finetune: str, head: str) -> str:
    """The label of one grid cell, e.g. ``efficientnet_lite0/frozen/a``."""
    return f"{backbone}/{finetune}/{head}"


def _check_metric(metric: str) -> None:
    if metric not in SELECT_METRICS:
        raise ExperimentError(f"--select {metric!r}: unknown metric; choose one of "
                              f"{sorted(SELECT_METRICS)}")


def trial_scores(exp: Experiment, metric: str | None = None) -> pd.Series:
    """Validation score of every trial (fold mean), indexed by trial_id; NaN if unusable.

    Computed from split == 'val' predictions; falls back to results.csv ``val_<metric>``
    for a trial without validation predictions, and always for ``loss``.
    """
    metric = metric or default_metric(exp)
    _check_metric(metric)
    key = ("scores", metric)
    if key in exp.cache:
        return exp.cache[key]
    fn, _ = SELECT_METRICS[metric]
    res = exp.results.set_index("trial_id")
    col = f"val_{metric}"
    scores = pd.to_numeric(res[col], errors="coerce") if col in res else \
        pd.Series(np.nan, index=res.index)
    if fn is not None:
        val = exp.val_predictions
        groups = val.groupby("trial_id", sort=False)
        for trial, rows in exp.track(groups, groups.ngroups, f"validation {metric} per trial"):
            per_fold = [fn(g["label"].to_numpy(), g["pred"].to_numpy(),
                           g[exp.prob_columns].to_numpy(), exp.positive)
                        for _, g in rows.groupby("fold")]
            scores[trial] = float(np.nanmean(per_fold)) if not np.all(np.isnan(per_fold)) \
                else np.nan
    failed = res["status"].astype(str).str.lower().isin(FAILED_STATUSES)
    scores[failed] = np.nan
    exp.cache[key] = scores.astype(float)
    return exp.cache[key]


def _rank(df: pd.DataFrame, score: str, higher_better: bool) -> pd.DataFrame:
    """Best first: score (NaN last), then lower val_loss, then trial_id (deterministic)."""
    order = df.assign(_s=df[score] * (-1 if higher_better else 1),
                      _l=pd.to_numeric(df.get("val_loss", np.nan), errors="coerce"))
    return order.sort_values(["_s", "_l", "trial_id"], na_position="last").drop(columns=["_s", "_l"])


def selection_table(exp: Experiment, metric: str | None = None) -> pd.DataFrame:
    """The selected trial per (backbone, finetune, head) cell, on validation metrics only.

    Returns:
        One row per cell: config, backbone, finetune, head, trial_id, lr, batch_size,
        samples (search samples in the cell), select_metric, val_score, best (bool; the
        cell with the best validation score), ordered best first.
    """
    metric = metric or default_metric(exp)
    higher = SELECT_METRICS[metric][1] if metric in SELECT_METRICS else True
    scores = trial_scores(exp, metric)
    res = exp.results.copy()
    res["val_score"] = res["trial_id"].map(scores)
    picked = []
    for _, cell in res.groupby(CELL, sort=True):
        best = _rank(cell, "val_score", higher).iloc[0].copy()
        best["samples"] = len(cell)
        picked.append(best)
    table = _rank(pd.DataFrame(picked), "val_score", higher)
    table.insert(0, "config", [config_name(*r) for r in table[CELL].itertuples(index=False)])
    table["select_metric"] = metric
    table["best"] = False
    if table["val_score"].notna().any():
        table.iloc[0, table.columns.get_loc("best")] = True
    cols = ["config", *CELL, "trial_id", "lr", "batch_size", "samples", "select_metric",
            "val_score", "best"]
    return table[cols].reset_index(drop=True)


def select_best(exp: Experiment, metric: str | None = None) -> pd.Series:
    """The best configuration on validation data (a row of :func:`selection_table`).

    Raises:
        ExperimentError: no trial has a usable validation score.
    """
    table = selection_table(exp, metric)
    if not table["best"].any():
        raise ExperimentError(f"{exp.exp_dir}: no trial has a validation "
                              f"{metric or default_metric(exp)} to select on")
    return table[table["best"]].iloc[0]


def _fold_row(exp: Experiment, g: pd.DataFrame) -> dict:
    y = g["label"].to_numpy()
    probs = g[exp.prob_columns].to_numpy(dtype=float)   # [N, C]
    values, notes = classification_metrics(y, g["pred"].to_numpy(), probs, exp.positive)
    rate, acc_kept = referral_at(y, g["mc_label"].to_numpy(), g["refer"].to_numpy())
    correct, conf = top_label(probs, y)
    row = {"n": len(g), **values, "referral_rate": rate, "accuracy_kept": acc_kept,
           "ece": expected_calibration_error(correct, conf)}
    pc = per_class_metrics(y, g["pred"].to_numpy(), exp.class_names)
    for m in PER_CLASS_METRICS:
        row.update({f"{m}_{c}": v for c, v in zip(pc["class"], pc[m])})
    row.update({f"support_{c}": int(v) for c, v in zip(pc["class"], pc["support"])})
    row["notes"] = "; ".join(notes)
    return row


def folds_table(exp: Experiment, metric: str | None = None) -> pd.DataFrame:
    """Every test metric per fold of every selected configuration.

    Returns:
        One row per (config, fold): config, backbone, finetune, head, trial_id, fold, n,
        accuracy, precision, recall, f1, auc, referral_rate, accuracy_kept, ece,
        precision_<class>, recall_<class>, f1_<class>, support_<class>, notes.
    """
    key = ("folds", metric or default_metric(exp))
    if key in exp.cache:
        return exp.cache[key]
    sel = selection_table(exp, metric)
    test = exp.test_predictions
    rows = []
    for s in exp.track(sel.itertuples(index=False), len(sel), "test metrics per configuration"):
        for fold, g in test[test["trial_id"] == s.trial_id].groupby("fold"):
            rows.append({"config": s.config, "backbone": s.backbone, "finetune": s.finetune,
                         "head": s.head, "trial_id": s.trial_id, "fold": int(fold),
                         **_fold_row(exp, g)})
    exp.cache[key] = pd.DataFrame(rows)
    return exp.cache[key]


def summary_table(exp: Experiment, metric: str | None = None) -> pd.DataFrame:
    """One row per configuration: test metrics of its selected trial as fold mean and std.

    Returns:
        config, backbone, finetune, head, trial_id, lr, batch_size, samples, select_metric,
        val_score, best, folds, <m>_mean, <m>_std for m in accuracy, precision, recall,
        f1, auc, referral_rate, accuracy_kept, ece; notes. Binary: positive-class
        precision/recall/F1; multiclass: macro averages and one-vs-rest macro AUC.
    """
    sel = selection_table(exp, metric)
    folds = folds_table(exp, metric)
    out = sel.copy()
    out["folds"] = 0
    for m in FOLD_METRICS:
        out[f"{m}_mean"] = np.nan
        out[f"{m}_std"] = np.nan
    out["notes"] = ""
    for i, s in out.iterrows():
        f = folds[folds["config"] == s["config"]] if len(folds) else folds
        out.at[i, "folds"] = len(f)
        if f.empty:
            out.at[i, "notes"] = "no test predictions for the selected trial"
            continue
        for m in FOLD_METRICS:
            out.at[i, f"{m}_mean"] = f[m].mean()
            out.at[i, f"{m}_std"] = f[m].std()
        notes = [f"fold {r.fold}: {r.notes}" for r in f.itertuples() if r.notes]
        if pd.isna(s["val_score"]):
            notes.insert(0, "no trial of this cell has a usable validation score (failed?)")
        out.at[i, "notes"] = "; ".join(notes)
    return out


def per_class_table(exp: Experiment, metric: str | None = None) -> pd.DataFrame:
    """Per class precision / recall / F1 as fold mean and std, per configuration.

    Returns:
        config, class, precision_mean, precision_std, recall_mean, recall_std, f1_mean,
        f1_std, support (test cases of the class over all folds), folds.
    """
    folds = folds_table(exp, metric)
    rows = []
    for config, f in (folds.groupby("config", sort=False) if len(folds) else []):
        for c in exp.class_names:
            row = {"config": config, "class": c}
            for m in PER_CLASS_METRICS:
                row[f"{m}_mean"] = f[f"{m}_{c}"].mean()
                row[f"{m}_std"] = f[f"{m}_{c}"].std()
            row["support"] = int(f[f"support_{c}"].sum())
            row["folds"] = len(f)
            rows.append(row)
    return pd.DataFrame(rows)


def hpo_table(exp: Experiment, metric: str | None = None) -> pd.DataFrame:
    """Every search sample with its validation metrics (results.csv, test columns left out).

    Returns:
        results.csv's columns except ``test_*``, plus config, selection_score (the
        validation score selection used) and selected (bool).
    """
    sel = selection_table(exp, metric)
    res = exp.results.loc[:, [c for c in exp.results.columns if not c.startswith("test_")]].copy()
    res.insert(0, "config", [config_name(*r) for r in res[CELL].itertuples(index=False)])
    res["selection_score"] = res["trial_id"].map(trial_scores(exp, metric))
    res["selected"] = res["trial_id"].isin(sel["trial_id"])
    return res


def mispredictions_table(exp: Experiment, metric: str | None = None,
                         best_only: bool = False) -> pd.DataFrame:
    """Wrongly predicted test cases (MC vote != label) of the selected configurations.

    Returns:
        config, trial_id, fold, path, predicted_label, actual_label, mean_probability (MC
        mean probability of the predicted class; the deterministic one when the file has
        no mc_mean_* columns), mc_confidence, referred; most confident mistakes first.
    """
    sel = selection_table(exp, metric)
    if best_only:
        sel = sel[sel["best"]]
    test = exp.test_predictions
    test = test[test["trial_id"].isin(sel["trial_id"]) & (test["mc_label"] != test["label"])]
    mean_cols = exp.mc_mean_columns if set(exp.mc_mean_columns) <= set(test.columns) \
        else exp.prob_columns
    mean_probs = test[mean_cols].to_numpy(dtype=float)   # [N, C]
    names = np.array(exp.class_names)
    config = dict(zip(sel["trial_id"], sel["config"]))
    out = pd.DataFrame({
        "config": test["trial_id"].map(config).to_numpy(),
        "trial_id": test["trial_id"].to_numpy(),
        "fold": test["fold"].to_numpy(),
        "path": test["path"].to_numpy(),
        "predicted_label": names[test["mc_label"].to_numpy()],
        "actual_label": names[test["label"].to_numpy()],
        "mean_probability": mean_probs[np.arange(len(test)), test["mc_label"].to_numpy()],
        "mc_confidence": test["mc_confidence"].to_numpy(dtype=float),
        "referred": test["refer"].to_numpy(),
    })
    return out.sort_values(["config", "mc_confidence", "path"],
                           ascending=[True, False, True]).reset_index(drop=True)


def threshold_for_recall(exp: Experiment, target: float, metric: str | None = None) -> pd.DataFrame:
    """Smallest MC-confidence threshold reaching ``target`` recall on validation predictions.

    Recall is positive-class recall (macro recall when the task has no positive class) of the
    MC vote on the kept cases (confidence >= threshold). The threshold is chosen on split ==
    'val' and then applied unchanged to split == 'test'.

    Returns:
        One row per selected configuration: config, trial_id, best, target, threshold (NaN
        if unreachable), val_referral_rate, val_recall_kept, val_accuracy_kept,
        test_referral_rate, test_recall_kept, test_accuracy_kept.
    """
    if not 0 < target <= 1:
        raise ExperimentError(f"--target-recall {target}: must be in (0, 1]")
    sel = selection_table(exp, metric)
    rows = []
    for s in sel.itertuples(index=False):
        val = exp.val_predictions[exp.val_predictions["trial_id"] == s.trial_id]
        choice = smallest_threshold_for_recall(
            val["label"].to_numpy(), val["mc_label"].to_numpy(), val["mc_confidence"].to_numpy(),
            target, exp.num_classes, exp.positive)
        row = {"config": s.config, "trial_id": s.trial_id, "best": s.best, "target": target,
               "threshold": choice.threshold, "val_referral_rate": choice.referral_rate,
               "val_recall_kept": choice.recall_kept, "val_accuracy_kept": choice.accuracy_kept}
        test = exp.test_predictions[exp.test_predictions["trial_id"] == s.trial_id]
        applied = apply_threshold(test["label"].to_numpy(), test["mc_label"].to_numpy(),
                                  test["mc_confidence"].to_numpy(), choice.threshold,
                                  exp.num_classes, exp.positive) if choice.reached else {}
        row.update({f"test_{k}": applied.get(k, np.nan)
                    for k in ("referral_rate", "recall_kept", "accuracy_kept")})
        rows.append(row)
    return pd.DataFrame(rows)
