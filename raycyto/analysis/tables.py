"""The report's tables as pandas DataFrames (summary, per_class, folds, hpo, mispredictions,
selection, thresholds).

Selection reads validation data only, under the one rule of :mod:`raycyto.analysis.selection`
(the same rule ``raycyto export`` uses): per (backbone, finetune, head) cell the search sample
with the best validation score is selected, the best cell is highlighted, and only then are
test folds scored. Baselines (head ``probe``) get their own rows, marked ``baseline``, and
are never the best. Spreads are the sample standard deviation over folds (ddof=1).
"""

from __future__ import annotations

from typing import Union

import numpy as np
import pandas as pd

from raycyto.analysis.load import CELL, Experiment, ExperimentError
from raycyto.analysis.metrics import SUMMARY_METRICS, classification_metrics, per_class_metrics
from raycyto.analysis.selection import SelectionRule, one_se_choice, rank_trials, trial_scores
from raycyto.analysis.uncertainty import (apply_threshold, expected_calibration_error,
                                          referral_at, smallest_threshold_for_recall, top_label)

FOLD_METRICS = (*SUMMARY_METRICS, "balanced_accuracy", "referral_rate", "accuracy_kept", "ece",
                "temperature", "ece_temp", "aurc")
PER_CLASS_METRICS = ("precision", "recall", "f1")
NO_MC = "no MC dropout: every pass agrees, so no case is referred (referral figures left empty)"
Rule = Union[SelectionRule, str, None]


def resolve_rule(exp: Experiment, rule: Rule = None) -> SelectionRule:
    """``None`` -> the experiment's default rule; text -> parsed; checked against the task."""
    rule = SelectionRule.default(exp) if rule is None else (
        rule if isinstance(rule, SelectionRule) else SelectionRule.parse(rule))
    rule.check(exp)
    return rule


def config_name(backbone: str, finetune: str, head: str) -> str:
    """The label of one grid cell, e.g. ``efficientnet_lite0/frozen/a``."""
    return f"{backbone}/{finetune}/{head}"


def selection_table(exp: Experiment, rule: Rule = None) -> pd.DataFrame:
    """The selected trial per (backbone, finetune, head) cell, on validation predictions only.

    Returns:
        One row per cell: config, backbone, finetune, head, trial_id, lr, batch_size,
        samples (search samples in the cell), select_metric (the rule), val_score, baseline,
        mc_dropout, best (bool; the trial the rule selects, never a baseline), ordered best first.
    """
    rule = resolve_rule(exp, rule)
    key = ("selection", str(rule))
    if key in exp.cache:
        return exp.cache[key]
    scores = trial_scores(exp, rule)
    res = exp.results.copy()
    for col in ("score", "val_loss", "baseline", "mc_dropout"):
        res[col] = res["trial_id"].map(scores[col])
    picked = []
    for _, cell in res.groupby(CELL, sort=True):
        best = rank_trials(cell, rule).iloc[0].copy()
        best["samples"] = len(cell)
        picked.append(best)
    table = rank_trials(pd.DataFrame(picked), rule)
    table.insert(0, "config", [config_name(*r) for r in table[CELL].itertuples(index=False)])
    table["select_metric"] = str(rule)
    table["val_score"] = table["score"]
    if rule.one_se:   # the probe is a candidate too
        table["best"] = table["trial_id"] == one_se_choice(exp, rule, table)
    else:
        trained = table[~table["baseline"].astype(bool) & table["score"].notna()]
        table["best"] = table["trial_id"] == (trained["trial_id"].iloc[0] if len(trained) else None)
    cols = ["config", *CELL, "trial_id", "lr", "batch_size", "samples", "select_metric",
            "val_score", "baseline", "mc_dropout", "best"]
    exp.cache[key] = table[cols].reset_index(drop=True)
    return exp.cache[key]


def select_best(exp: Experiment, rule: Rule = None) -> pd.Series:
    """The best configuration on validation data (a row of :func:`selection_table`).

    Raises:
        ExperimentError: no trained configuration has a usable validation score.
    """
    table = selection_table(exp, rule)
    if not table["best"].any():
        raise ExperimentError(f"{exp.exp_dir}: no trained configuration has a usable validation "
                              f"score under the rule {resolve_rule(exp, rule)}")
    return table[table["best"]].iloc[0]


def _fold_row(exp: Experiment, g: pd.DataFrame, mc_dropout: bool, val: pd.DataFrame | None = None) -> dict:
    """Test metrics of one fold (``g``: its test rows; ``val``: its validation rows, which fit
    the temperature; None or empty: temperature columns NaN)."""
    from raycyto.referral.temperature import fit_temperature
    from raycyto.analysis.metrics import SELECT_METRICS
    from raycyto.analysis.selective import aurc

    y = g["label"].to_numpy()
    probs = g[exp.prob_columns].to_numpy(dtype=float)   # [N, C]
    values, notes = classification_metrics(y, g["pred"].to_numpy(), probs, exp.positive)
    values["balanced_accuracy"] = SELECT_METRICS["balanced_accuracy"][0](y, g["pred"].to_numpy(), probs, exp.positive)
    if mc_dropout:
        rate, acc_kept = referral_at(y, g["mc_label"].to_numpy(), g["refer"].to_numpy())
        area = aurc(g["mc_label"].to_numpy() == y, g["mc_confidence"].to_numpy(dtype=float))
    else:
        rate, acc_kept, area = np.nan, np.nan, np.nan
        notes.append(NO_MC)
    correct, conf = top_label(probs, y)
    temperature = ece_temp = np.nan
    if val is not None and len(val):
        fit = fit_temperature(val["label"].to_numpy(), probs=val[exp.prob_columns].to_numpy(dtype=float))
        temperature = fit.temperature
        ece_temp = expected_calibration_error(*top_label(fit.apply_probs(probs), y))
    row = {"n": len(g), **values, "referral_rate": rate, "accuracy_kept": acc_kept,
           "ece": expected_calibration_error(correct, conf), "temperature": temperature,
           "ece_temp": ece_temp, "aurc": area}
    pc = per_class_metrics(y, g["pred"].to_numpy(), exp.class_names)
    for m in PER_CLASS_METRICS:
        row.update({f"{m}_{c}": v for c, v in zip(pc["class"], pc[m])})
    row.update({f"support_{c}": int(v) for c, v in zip(pc["class"], pc["support"])})
    row["notes"] = "; ".join(notes)
    return row


def folds_table(exp: Experiment, rule: Rule = None) -> pd.DataFrame:
    """Every test metric per fold of every selected configuration.

    Returns:
        One row per (config, fold): config, backbone, finetune, head, trial_id, fold, n,
        accuracy, precision, recall, f1, auc, balanced_accuracy, referral_rate,
        accuracy_kept (NaN without MC dropout), ece (softmax, top label), temperature (fitted
        on the fold's validation rows), ece_temp (test ECE after it), aurc (area under the
        risk-coverage curve of the MC vote confidence; NaN without MC dropout),
        precision_<class>, recall_<class>, f1_<class>, support_<class>, notes.
    """
    key = ("folds", str(resolve_rule(exp, rule)))
    if key in exp.cache:
        return exp.cache[key]
    sel = selection_table(exp, rule)
    test, val = exp.test_predictions, exp.val_predictions
    rows = []
    for s in exp.track(sel.itertuples(index=False), len(sel), "test metrics per configuration"):
        val_folds = dict(tuple(val[val["trial_id"] == s.trial_id].groupby("fold")))
        for fold, g in test[test["trial_id"] == s.trial_id].groupby("fold"):
            rows.append({"config": s.config, "backbone": s.backbone, "finetune": s.finetune,
                         "head": s.head, "trial_id": s.trial_id, "fold": int(fold),
                         **_fold_row(exp, g, bool(s.mc_dropout), val_folds.get(fold))})
    exp.cache[key] = pd.DataFrame(rows)
    return exp.cache[key]


def summary_table(exp: Experiment, rule: Rule = None) -> pd.DataFrame:
    """One row per configuration: test metrics of its selected trial as fold mean and std.

    Returns:
        config, backbone, finetune, head, trial_id, lr, batch_size, samples, select_metric,
        val_score, baseline, mc_dropout, best, folds, <m>_mean, <m>_std for m in accuracy,
        precision, recall, f1, auc, balanced_accuracy, referral_rate, accuracy_kept, ece,
        temperature, ece_temp, aurc (referral and AURC columns NaN without MC dropout); notes. Binary: positive-class
        precision/recall/F1; multiclass: macro averages and one-vs-rest macro AUC.
    """
    sel = selection_table(exp, rule)
    folds = folds_table(exp, rule)
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
        fold_notes = [(r.fold, [n for n in r.notes.split("; ") if n and n != NO_MC]) for r in f.itertuples()]
        notes = [f"fold {k}: {'; '.join(n)}" for k, n in fold_notes if n]
        if not s["mc_dropout"]:
            notes.insert(0, NO_MC)
        if s["baseline"]:
            notes.insert(0, "baseline: logistic regression on the standardised frozen features")
        if pd.isna(s["val_score"]):
            notes.insert(0, "no usable validation score under the selection rule (failed, or below its floor)")
        out.at[i, "notes"] = "; ".join(notes)
    return out


def per_class_table(exp: Experiment, rule: Rule = None) -> pd.DataFrame:
    """Per class precision / recall / F1 as fold mean and std, per configuration.

    Returns:
        config, class, precision_mean, precision_std, recall_mean, recall_std, f1_mean,
        f1_std, support (test cases of the class over all folds), folds.
    """
    folds = folds_table(exp, rule)
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


def hpo_table(exp: Experiment, rule: Rule = None) -> pd.DataFrame:
    """Every search sample with its validation metrics (results.csv, test columns left out).

    Returns:
        results.csv's columns except ``test_*``, plus config, selection_score (the
        validation score selection used) and selected (bool).
    """
    rule = resolve_rule(exp, rule)
    sel = selection_table(exp, rule)
    res = exp.results.loc[:, [c for c in exp.results.columns if not c.startswith("test_")]].copy()
    res.insert(0, "config", [config_name(*r) for r in res[CELL].itertuples(index=False)])
    res["selection_score"] = res["trial_id"].map(trial_scores(exp, rule)["score"])
    res["selected"] = res["trial_id"].isin(sel["trial_id"])
    return res


def mispredictions_table(exp: Experiment, rule: Rule = None,
                         best_only: bool = False) -> pd.DataFrame:
    """Wrongly predicted test cases (MC vote != label) of the selected configurations.

    Returns:
        config, trial_id, fold, path, predicted_label, actual_label, mean_probability (MC
        mean probability of the predicted class; the deterministic one when the file has
        no mc_mean_* columns), mc_confidence, referred; most confident mistakes first.
    """
    sel = selection_table(exp, rule)
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


def threshold_for_recall(exp: Experiment, target: float, rule: Rule = None) -> pd.DataFrame:
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
    sel = selection_table(exp, rule)
    sel = sel[sel["mc_dropout"].astype(bool)]  # a threshold on MC confidence needs varying passes
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
