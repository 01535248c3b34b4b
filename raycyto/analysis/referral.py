"""Referral with a guarantee, measured per trial and fold on rows that chose nothing.

Every guarantee is cross-fitted (:mod:`raycyto.referral.fit`): for fold k of a trial it is
calibrated on the other folds' out-of-fold test rows and measured on fold k's test rows;
validation rows, which stopped training, fitted the temperature and ranked the
configurations, calibrate nothing.

- conformal prediction sets (:mod:`raycyto.referral.conformal`: LAC and APS at the configured
  levels, marginal and class-conditional) on the MC mean probabilities (``mc_mean_*``, what
  Serve returns; ``prob_*`` for older files);
- the risk-controlled referral threshold (:mod:`raycyto.referral.risk`, binary tasks): the
  loosest MC vote-confidence threshold certified by learn-then-test to keep positive-class
  recall among the cases not referred >= ``mc.target_recall`` with probability
  ``1 - mc.risk_delta``, and the highest recall certifiable at all.

The report writes the measurements (conformal.csv, thresholds.csv); ``raycyto export`` stores
:func:`raycyto.referral.fit.calibrate_trial` (every fold's test rows) in model.json.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import numpy as np
import pandas as pd

from raycyto.referral.conformal import SCORES, conformal_folds, conformal_summary
from raycyto.referral.fit import levels_of, min_positives, probability_columns, with_uniforms

if TYPE_CHECKING:  # pragma: no cover
    from raycyto.analysis.load import Experiment
    from raycyto.config import MCConfig

TOLERANCE = 0.05   # coverage within ± this of the nominal level counts as "on target"


# ----------------------------------------------------------------------------- tables


def conformal_table(exp: "Experiment", selection: pd.DataFrame, mc: "MCConfig",
                    ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Conformal sets of every selected configuration, cross-fitted: for each fold, calibrated on
    the other folds' out-of-fold test rows, coverage measured on that fold's test rows.

    Args:
        selection: :func:`raycyto.analysis.tables.selection_table`.

    Returns:
        (summary, folds). summary is conformal.csv: config, trial_id, best, level, score,
        mondrian (marginal and class-conditional rows), probabilities, coverage_mean,
        coverage_std, set_size_mean, singleton_rate,
        empty_rate, coverage_<class>_mean, folds, n_calibration_mean, on_target (coverage
        within ±0.05 of the level); folds: one row per (config, fold, score, level, mondrian).
    """
    cols, source = probability_columns(exp)
    preds = exp.test_predictions[exp.test_predictions["trial_id"].isin(selection["trial_id"])]
    preds = with_uniforms(exp, preds)
    # marginal, and class-conditional (Mondrian): each class's coverage on its own
    parts = []
    for mondrian in (False, True):
        f = conformal_folds(preds, cols, levels_of(mc), SCORES, mondrian=mondrian)
        if not f.empty:
            parts.append(f.assign(mondrian=mondrian))
    if not parts:
        return pd.DataFrame(columns=["config", "level", "score", "coverage_mean", "coverage_std",
                                     "set_size_mean", "singleton_rate"]), pd.DataFrame()
    folds = pd.concat(parts, ignore_index=True)
    summary = conformal_summary(folds, by=("trial_id", "mondrian"))
    n_cal = folds.groupby(["trial_id", "mondrian", "level", "score"])["n_calibration"].mean()
    summary["n_calibration_mean"] = [n_cal[tuple(k)] for k in
                                     summary[["trial_id", "mondrian", "level", "score"]].itertuples(index=False)]
    rename = {f"coverage_class{k}_mean": f"coverage_{c}_mean" for k, c in enumerate(exp.class_names)}
    rename.update({f"coverage_class{k}": f"coverage_{c}" for k, c in enumerate(exp.class_names)})
    summary = summary.rename(columns=rename)
    folds = folds.rename(columns=rename).drop(columns=["thresholds"])
    meta = selection.set_index("trial_id")[["config", "best"]]
    for df in (summary, folds):
        df.insert(0, "config", df["trial_id"].map(meta["config"]))
        df.insert(2, "best", df["trial_id"].map(meta["best"]).astype(bool))
        df["probabilities"] = source
    summary["on_target"] = (summary["coverage_mean"] - summary["level"]).abs() <= TOLERANCE
    order = {t: i for i, t in enumerate(selection["trial_id"])}
    summary = summary.sort_values(["trial_id", "mondrian", "score", "level"],
                                  key=lambda s: s.map(order) if s.name == "trial_id" else s)
    first = ["config", "trial_id", "best", "level", "score", "mondrian", "probabilities",
             "coverage_mean", "coverage_std", "set_size_mean", "singleton_rate", "empty_rate"]
    summary = summary[first + [c for c in summary.columns if c not in first]]
    return summary.reset_index(drop=True), folds


def _fold_splits(exp: "Experiment", selection: pd.DataFrame):
    """(selection row, fold, calibration rows, test rows) of every selected trial's folds:
    the calibration rows are the other folds' out-of-fold test rows (cross-fitting)."""
    for s in selection.itertuples(index=False):
        test = exp.test_predictions[exp.test_predictions["trial_id"] == s.trial_id]
        for fold in sorted(test["fold"].unique()):
            cal = test[test["fold"] != fold]
            if not cal.empty:
                yield s, fold, cal, test[test["fold"] == fold]


def _kept_metrics(y: np.ndarray, pred: np.ndarray, conf: np.ndarray, threshold: float,
                  positive: int) -> dict[str, float]:
    """Referral rate and, among kept cases, positive recall / accuracy at ``threshold``
    (NaN threshold: every case referred)."""
    kept = conf >= threshold if not math.isnan(threshold) else np.zeros(len(y), bool)
    pos = kept & (y == positive)
    return {"referral_rate": float(1 - kept.mean()) if len(y) else math.nan,
            "recall_kept": float(np.mean(pred[pos] == positive)) if pos.any() else math.nan,
            "accuracy_kept": float(np.mean(pred[kept] == y[kept])) if kept.any() else math.nan,
            "positives_kept": int(pos.sum())}


def risk_table(exp: "Experiment", selection: pd.DataFrame, mc: "MCConfig",
               exported: Optional[tuple[str, int]] = None) -> pd.DataFrame:
    """Risk-controlled referral per selected configuration and fold (binary tasks).

    The threshold is chosen on the other folds' out-of-fold rows (learn-then-test on the MC
    vote confidence), then applied unchanged to the fold's test rows, next to the configured
    vote threshold (``mc.threshold``, the studies' rule). ``certifiable_*``: the highest recall
    target those rows certify at ``mc.risk_delta``, its threshold and its test referral rate.

    Args:
        exported: (trial_id, fold) that ``raycyto export`` picks, flagged ``exported``.

    Returns:
        thresholds.csv: config, trial_id, best, fold, exported, target, delta, threshold
        (NaN: none certified, every case referred), certified, cal_n, cal_positives,
        min_positives, cal_referral_rate, cal_recall_kept, p_value, certifiable_recall,
        certifiable_threshold, certifiable_test_referral_rate, certifiable_test_recall_kept,
        test_n, test_referral_rate,
        test_recall_kept, test_accuracy_kept, test_positives_kept, test_met (recall among kept
        test cases >= target; NaN when no positive is kept), vote_threshold,
        vote_test_referral_rate, vote_test_recall_kept, statement.
    """
    if not exp.binary or mc.target_recall is None:
        return pd.DataFrame()
    from raycyto.referral.risk import certifiable_recall, risk_controlled_threshold

    rows = []
    pos_name = exp.class_names[exp.positive]
    for s, fold, cal, test in _fold_splits(exp, selection):
        args = (cal["label"].to_numpy(), cal["mc_label"].to_numpy(), cal["mc_confidence"].to_numpy(dtype=float),
                exp.positive)
        g = risk_controlled_threshold(*args, mc.target_recall, mc.risk_delta)
        best = certifiable_recall(*args, mc.risk_delta)
        y, pred = test["label"].to_numpy(), test["mc_label"].to_numpy()
        conf = test["mc_confidence"].to_numpy(dtype=float)
        at = _kept_metrics(y, pred, conf, g.threshold, exp.positive)
        at_best = _kept_metrics(y, pred, conf, best.threshold if best else math.nan, exp.positive)
        vote = _kept_metrics(y, pred, conf, exp.threshold, exp.positive)
        met = at["recall_kept"] >= mc.target_recall - 1e-12 if not math.isnan(at["recall_kept"]) \
            else math.nan
        rows.append({
            "config": s.config, "trial_id": s.trial_id, "best": bool(s.best), "fold": int(fold),
            "exported": exported == (s.trial_id, int(fold)),
            "target": mc.target_recall, "delta": mc.risk_delta, "threshold": g.threshold,
            "certified": g.certified, "cal_n": g.n, "cal_positives": g.n_positive,
            "min_positives": min_positives(mc.target_recall, mc.risk_delta),
            "cal_referral_rate": g.referral_rate, "cal_recall_kept": g.recall_kept,
            "p_value": g.p_value,
            "certifiable_recall": best.target if best else math.nan,
            "certifiable_threshold": best.threshold if best else math.nan,
            "certifiable_test_referral_rate": at_best["referral_rate"],
            "certifiable_test_recall_kept": at_best["recall_kept"],
            "test_n": len(test),
            **{f"test_{k}": v for k, v in at.items()}, "test_met": met,
            "vote_threshold": exp.threshold,
            "vote_test_referral_rate": vote["referral_rate"],
            "vote_test_recall_kept": vote["recall_kept"],
            "statement": g.statement(pos_name),
        })
    return pd.DataFrame(rows)


def risk_summary(thresholds: pd.DataFrame) -> pd.DataFrame:
    """Per configuration: risk_threshold_mean, risk_certified_folds, risk_referral_rate_mean/std,
    risk_recall_kept_mean/std, risk_met_folds (test folds whose kept recall met the target,
    of those keeping a positive), vote_referral_rate_mean (the same folds, the vote rule)."""
    if thresholds.empty:
        return pd.DataFrame(columns=["trial_id"])
    g = thresholds.groupby("trial_id", sort=False)
    met = thresholds.assign(_m=thresholds["test_met"].astype(float))
    return pd.DataFrame({
        "risk_threshold_mean": g["threshold"].mean(),
        "risk_certified_folds": g["certified"].sum().astype(int),
        "risk_referral_rate_mean": g["test_referral_rate"].mean(),
        "risk_referral_rate_std": g["test_referral_rate"].std(),
        "risk_recall_kept_mean": g["test_recall_kept"].mean(),
        "risk_recall_kept_std": g["test_recall_kept"].std(),
        "risk_met_folds": met.groupby("trial_id", sort=False)["_m"].sum().astype(int),
        "risk_tested_folds": met.groupby("trial_id", sort=False)["_m"].count().astype(int),
        "vote_referral_rate_mean": g["vote_test_referral_rate"].mean(),
        "certifiable_recall_mean": g["certifiable_recall"].mean(),
        "certifiable_referral_rate_mean": g["certifiable_test_referral_rate"].mean(),
    }).reset_index()


def empirical_thresholds(exp: "Experiment", selection: pd.DataFrame, target: float) -> pd.DataFrame:
    """Multiclass ``--target-recall``: the smallest MC threshold whose kept calibration cases
    (the other folds' out-of-fold rows) reach ``target`` macro recall (no guarantee: the
    empirical choice), per configuration and fold, applied to that fold's test rows."""
    from raycyto.analysis.uncertainty import apply_threshold, smallest_threshold_for_recall

    rows = []
    for s, fold, cal, test in _fold_splits(exp, selection):
        ch = smallest_threshold_for_recall(cal["label"].to_numpy(), cal["mc_label"].to_numpy(),
                                           cal["mc_confidence"].to_numpy(), target,
                                           exp.num_classes, exp.positive)
        applied = apply_threshold(test["label"].to_numpy(), test["mc_label"].to_numpy(),
                                  test["mc_confidence"].to_numpy(), ch.threshold,
                                  exp.num_classes, exp.positive) if ch.reached else {}
        rows.append({"config": s.config, "trial_id": s.trial_id, "best": bool(s.best),
                     "fold": int(fold), "target": target, "threshold": ch.threshold,
                     "certified": False, "method": "empirical (no guarantee): macro recall",
                     "cal_referral_rate": ch.referral_rate, "cal_recall_kept": ch.recall_kept,
                     **{f"test_{k}": applied.get(k, math.nan)
                        for k in ("referral_rate", "recall_kept", "accuracy_kept")}})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- strata

NOT_METADATA = {"trial_id", "backbone", "finetune", "head", "fold", "split", "path", "label",
                "label_name", "pred", "mc_label", "mc_confidence", "refer", "group", "entropy",
                "mutual_information", "fingerprint", "copy"}
MAX_STRATA = 20
MIN_PER_VALUE = 5   # median test images per value: fewer = an identifier, not a stratum


def metadata_columns(exp: "Experiment", rows: Optional[pd.DataFrame] = None) -> list[str]:
    """Manifest columns of predictions.parquet worth a per-value table: 2..20 distinct values
    with a median of at least 5 test images per value (so karyogram ``subtype`` is kept and
    ``karyotype``, nearly one value per patient, is not), not probabilities, not path-like.

    Args:
        rows: test rows (default: every test row); counted on one trial's rows.
    """
    rows = exp.test_predictions if rows is None else rows
    if len(rows):
        rows = rows[rows["trial_id"] == rows["trial_id"].iloc[0]]   # every trial tests the same images
    out = []
    for c in rows.columns:
        if c in NOT_METADATA or c.startswith(("prob_", "mc_", "std_")):
            continue
        values = rows[c].dropna()
        counts = values.astype(str).value_counts()
        if not 2 <= len(counts) <= MAX_STRATA or counts.median() < MIN_PER_VALUE:
            continue
        if values.astype(str).str.contains(r"[/\\]").mean() > 0.5:     # path-like
            continue
        out.append(c)
    return out


def strata_table(exp: "Experiment", selection: pd.DataFrame) -> pd.DataFrame:
    """Test metrics per value of every metadata column (e.g. karyogram ``subtype``), per
    selected configuration, as fold mean ± std (std over folds where the value occurs).

    Per (config, column, value, fold), on the test rows with that value: n, accuracy of
    ``pred``, ``recall`` (binary: share of positive cases predicted positive; multiclass:
    macro over the classes present), ``recall_<class>`` (multiclass), and the MC referral
    rate (configurations with MC dropout).

    Returns:
        strata.csv: config, trial_id, best, column, value, n (test cases over all folds),
        positives (binary), folds, accuracy_mean, accuracy_std, recall_mean, recall_std,
        [recall_<class>_mean, recall_<class>_std], referral_rate_mean, referral_rate_std.
        Empty when predictions.parquet has no such column.
    """
    test = exp.test_predictions[exp.test_predictions["trial_id"].isin(selection["trial_id"])]
    columns = metadata_columns(exp, test)
    if not columns:
        return pd.DataFrame()
    mc = selection.set_index("trial_id")["mc_dropout"].astype(bool)
    rows = []
    for col in columns:
        t = test.dropna(subset=[col]).assign(_v=lambda d: d[col].astype(str),
                                            _ok=lambda d: d["pred"] == d["label"])
        per_fold = []
        for (trial, value, fold), g in t.groupby(["trial_id", "_v", "fold"], sort=True):
            r = {"trial_id": trial, "value": value, "fold": fold, "n": len(g),
                 "accuracy": g["_ok"].mean(),
                 "referral_rate": g["refer"].mean() if mc.get(trial, True) else np.nan}
            if exp.binary:
                pos = g[g["label"] == exp.positive]
                r["positives"] = len(pos)
                r["recall"] = (pos["pred"] == exp.positive).mean() if len(pos) else np.nan
            else:
                recalls = {}
                for k, c in enumerate(exp.class_names):
                    of_k = g[g["label"] == k]
                    recalls[c] = (of_k["pred"] == k).mean() if len(of_k) else np.nan
                r.update({f"recall_{c}": v for c, v in recalls.items()})
                present = [v for v in recalls.values() if not np.isnan(v)]
                r["recall"] = float(np.mean(present)) if present else np.nan
            per_fold.append(r)
        f = pd.DataFrame(per_fold)
        metrics = ["accuracy", "recall"] + ([f"recall_{c}" for c in exp.class_names] if not exp.binary else []) \
            + ["referral_rate"]
        for (trial, value), g in f.groupby(["trial_id", "value"], sort=False):
            row = {"trial_id": trial, "column": col, "value": value, "n": int(g["n"].sum())}
            if exp.binary:
                row["positives"] = int(g["positives"].sum())
            row["folds"] = len(g)
            for m in metrics:
                row[f"{m}_mean"] = g[m].mean()
                row[f"{m}_std"] = g[m].std()
            rows.append(row)
    out = pd.DataFrame(rows)
    meta = selection.set_index("trial_id")[["config", "best"]]
    out.insert(0, "config", out["trial_id"].map(meta["config"]))
    out.insert(2, "best", out["trial_id"].map(meta["best"]).astype(bool))
    order = {t: i for i, t in enumerate(selection["trial_id"])}
    return out.sort_values(["trial_id", "column", "value"],
                           key=lambda s: s.map(order) if s.name == "trial_id" else s).reset_index(drop=True)


# ----------------------------------------------------------------------------- selective


def selective_table(exp: "Experiment", selection: pd.DataFrame,
                    mc: "MCConfig") -> tuple[pd.DataFrame, pd.DataFrame]:
    """AURC of every confidence score per selected configuration (temperature and conformal
    sets fitted per fold on validation rows, scored on test rows).

    Returns:
        (selective.csv: config, trial_id, best, score, aurc_mean, aurc_std, e_aurc_mean,
        risk_mean (error rate with nothing referred), folds; the long per-case table of
        :func:`raycyto.analysis.selective.selective_folds` for the figures).
    """
    from raycyto.analysis.selective import aurc, excess_aurc, selective_folds

    preds = exp.predictions[exp.predictions["trial_id"].isin(selection["trial_id"])]
    mc_cols = exp.mc_mean_columns if set(exp.mc_mean_columns) <= set(preds.columns) else None
    long = selective_folds(preds, exp.prob_columns, mc_cols, conformal_level=float(mc.coverage),
                           conformal_score=mc.conformal_score)
    if long.empty:
        return pd.DataFrame(), long
    no_mc = set(selection.loc[~selection["mc_dropout"].astype(bool), "trial_id"])
    # without MC dropout every pass agrees: vote confidence and MC scores rank nothing
    long = long[~(long["trial_id"].isin(no_mc) & long["score"].isin(
        ["MC vote confidence", "MC mean softmax", "MC predictive entropy"]))]
    per_fold = long.groupby(["trial_id", "fold", "score"], sort=False).apply(
        lambda g: pd.Series({"aurc": aurc(g["correct"].to_numpy(), g["confidence"].to_numpy()),
                             "e_aurc": excess_aurc(g["correct"].to_numpy(), g["confidence"].to_numpy()),
                             "risk": float(np.mean(~g["correct"].to_numpy(bool)))}),
        include_groups=False).reset_index()
    g = per_fold.groupby(["trial_id", "score"], sort=False)
    out = g.agg(aurc_mean=("aurc", "mean"), aurc_std=("aurc", "std"), e_aurc_mean=("e_aurc", "mean"),
                risk_mean=("risk", "mean"), folds=("aurc", "size")).reset_index()
    meta = selection.set_index("trial_id")[["config", "best"]]
    out.insert(0, "config", out["trial_id"].map(meta["config"]))
    out.insert(2, "best", out["trial_id"].map(meta["best"]).astype(bool))
    return out, long


def level_label(level: float) -> str:
    return f"{level:.0%}" if abs(level * 100 - round(level * 100)) < 1e-9 else f"{level:g}"


def coverage_sentence(conformal: pd.DataFrame, trial_id: str, level: float, score: str) -> str:
    """'At level 90% the APS prediction set held the true class in 91% ± 4% of test cases...'."""
    r = conformal[(conformal["trial_id"] == trial_id) & (conformal["level"] == level)
                  & (conformal["score"] == score) & (~conformal["mondrian"].astype(bool))]
    if r.empty:
        return ""
    r = r.iloc[0]
    return (f"At level {level_label(level)}, the {score.upper()} prediction set held the true class "
            f"for {r['coverage_mean']:.0%} \u00b1 {np.nan_to_num(r['coverage_std']):.0%} of test cases "
            f"(fold mean \u00b1 std; mean set size {r['set_size_mean']:.2f} classes, one class in "
            f"{r['singleton_rate']:.0%} of cases).")

