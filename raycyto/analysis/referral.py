"""Referral with a guarantee, per trial and fold, from validation predictions only.

One fold of one trial is one trained model. For each, this module calibrates on that fold's
``split == "val"`` rows of predictions.parquet and measures on its ``split == "test"`` rows:

- conformal prediction sets (:mod:`raycyto.referral.conformal`: LAC and APS at the configured
  levels, optionally class-conditional) on the MC mean probabilities (``mc_mean_*``, what Serve
  returns; ``prob_*`` for older files);
- the risk-controlled referral threshold (:mod:`raycyto.referral.risk`, binary tasks): the
  loosest MC vote-confidence threshold certified by learn-then-test to keep positive-class
  recall among the cases not referred >= ``mc.target_recall`` with probability
  ``1 - mc.risk_delta``;
- temperature scaling (:mod:`raycyto.referral.temperature`) with ECE before and after.

The report writes the measurements (conformal.csv, thresholds.csv) and ``raycyto export``
stores :func:`calibrate_fold` of the exported fold in model.json (``referral``), so the
threshold a report shows for a fold is the one Serve applies for it. Nothing here reads a
test row before every threshold is fixed: :func:`calibrate_fold` receives validation rows
only (tests corrupt the test rows and compare).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import pandas as pd

from raycyto.referral.conformal import (SCORES, ConformalCalibration, calibrate_conformal,
                                        conformal_folds, conformal_summary)
from raycyto.analysis.load import ExperimentError

if TYPE_CHECKING:  # pragma: no cover
    from raycyto.analysis.load import Experiment
    from raycyto.config import MCConfig

TOLERANCE = 0.05   # coverage within ± this of the nominal level counts as "on target"


def mc_config(exp: "Experiment", target_recall: Optional[float] = None) -> "MCConfig":
    """The sweep's ``mc`` section (config.yaml), with ``--target-recall`` applied.

    Experiments written before a field existed get its default; ``mc.threshold`` comes from
    experiment.json (what the sweep applied).

    Raises:
        ExperimentError: config.yaml's ``mc`` section is invalid (the field named).
    """
    import yaml

    from raycyto.config import ConfigError, MCConfig, load_config

    try:
        raw = (yaml.safe_load(exp.config_text) or {}).get("mc") or {}
    except yaml.YAMLError as exc:
        raise ExperimentError(f"{exp.exp_dir}/config.yaml: not valid YAML ({exc})") from None
    import dataclasses

    known = {f.name for f in dataclasses.fields(MCConfig)}
    raw = {k: v for k, v in dict(raw).items() if k in known}
    raw["threshold"] = float(exp.threshold)
    if target_recall is not None:
        raw["target_recall"] = float(target_recall)
    try:
        return load_config({"mc": raw}).mc
    except ConfigError as exc:
        field = "--target-recall" if target_recall is not None and "target_recall" in str(exc) else "config.yaml"
        raise ExperimentError(f"{exp.exp_dir}: {field}: {exc}") from None


def levels_of(mc: "MCConfig") -> tuple[float, ...]:
    """Conformal levels to calibrate: ``mc.conformal_levels`` plus the served ``mc.coverage``."""
    return tuple(sorted({*map(float, mc.conformal_levels), float(mc.coverage)}))


def probability_columns(exp: "Experiment") -> tuple[list[str], str]:
    """(columns, name) of the probabilities conformal sets use: the MC mean when the file has it."""
    if set(exp.mc_mean_columns) <= set(exp.predictions.columns):
        return exp.mc_mean_columns, "mc_mean"
    return exp.prob_columns, "softmax"


def min_positives(target: float, delta: float) -> int:
    """Fewest positive validation cases that can certify ``target`` at all (no miss among them):
    the smallest n with ``target ** n <= delta``."""
    return int(math.ceil(math.log(delta) / math.log(target) - 1e-12))


# ----------------------------------------------------------------------------- one fold


@dataclass(frozen=True)
class FoldCalibration:
    """What one fold's validation rows fix (stored by export as model.json ``referral``).

    Attributes:
        trial_id, fold: the model.
        n: validation cases used.
        probabilities: ``mc_mean`` or ``softmax`` (what the sets and the temperature use).
        conformal: split-conformal thresholds (both scores, every level).
        temperature: fitted temperature with NLL/ECE before and after (on the same rows).
        risk: binary tasks with a target: the learn-then-test recall guarantee, else None.
    """

    trial_id: str
    fold: int
    n: int
    probabilities: str
    conformal: ConformalCalibration
    temperature: Any
    risk: Any = None

    def to_json(self, mc: "MCConfig", positive_name: str = "positive") -> dict[str, Any]:
        """model.json ``referral``: the rule, the served set, the temperature and the guarantee."""
        doc: dict[str, Any] = {
            "rule": mc.refer_rule,
            "calibrated_on": {"trial_id": self.trial_id, "fold": self.fold, "split": "val",
                              "n": self.n, "probabilities": self.probabilities,
                              "confidence": "mc_vote"},
            "conformal": {"score": mc.conformal_score, "level": float(mc.coverage),
                          "calibration": self.conformal.to_json()},
            "temperature": self.temperature.to_json(),
        }
        if self.risk is not None:
            doc["risk"] = {"threshold": None if not self.risk.certified else float(self.risk.threshold),
                           "statement": self.risk.statement(positive_name),
                           "guarantee": self.risk.to_json()}
        return doc


def fold_rows(exp: "Experiment", trial_id: str, fold: int, split: str) -> pd.DataFrame:
    """The ``split`` rows of one trial's fold."""
    p = exp.predictions
    return p[(p["trial_id"] == str(trial_id)) & (p["fold"] == int(fold)) & (p["split"] == split)]


def calibrate_rows(exp: "Experiment", val: pd.DataFrame, mc: "MCConfig", trial_id: str = "",
                   fold: int = -1) -> FoldCalibration:
    """Calibrate sets, temperature and (binary) the risk threshold on validation rows ``val``.

    Raises:
        ExperimentError: no validation rows, or a row that is not validation.
    """
    from raycyto.referral.temperature import fit_temperature
    from raycyto.referral.risk import risk_controlled_threshold

    if val.empty:
        raise ExperimentError(f"{exp.exp_dir}: trial {trial_id} fold {fold} has no validation "
                              "predictions to calibrate on")
    if (val["split"] != "val").any():
        raise ExperimentError("calibration was handed non-validation rows")   # a bug, never data
    cols, source = probability_columns(exp)
    probs = val[cols].to_numpy(dtype=float)                     # [N, C]
    y = val["label"].to_numpy()
    cal = calibrate_conformal(probs, y, levels_of(mc), SCORES, mondrian=mc.conformal_mondrian,
                              source=f"{source} of trial {trial_id} fold {fold} (validation)")
    temp = fit_temperature(y, probs=probs)
    risk = None
    if exp.binary and mc.target_recall is not None:
        risk = risk_controlled_threshold(y, val["mc_label"].to_numpy(), val["mc_confidence"].to_numpy(),
                                         exp.positive, mc.target_recall, mc.risk_delta)
    return FoldCalibration(str(trial_id), int(fold), len(val), source, cal, temp, risk)


def calibrate_fold(exp: "Experiment", trial_id: str, fold: int, mc: "MCConfig") -> FoldCalibration:
    """:func:`calibrate_rows` on the validation rows of one trial's fold (the only rows read)."""
    return calibrate_rows(exp, fold_rows(exp, trial_id, fold, "val"), mc, trial_id, fold)


# ----------------------------------------------------------------------------- tables


def conformal_table(exp: "Experiment", selection: pd.DataFrame, mc: "MCConfig",
                    ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Conformal sets of every selected configuration: calibrated per fold on validation,
    coverage measured on that fold's test rows.

    Args:
        selection: :func:`raycyto.analysis.tables.selection_table`.

    Returns:
        (summary, folds). summary is conformal.csv: config, trial_id, best, level, score,
        mondrian (binary tasks also get class-conditional rows), probabilities, coverage_mean, coverage_std, set_size_mean, singleton_rate,
        empty_rate, coverage_<class>_mean, folds, n_calibration_mean, on_target (coverage
        within ±0.05 of the level); folds: one row per (config, fold, score, level, mondrian).
    """
    cols, source = probability_columns(exp)
    preds = exp.predictions[exp.predictions["trial_id"].isin(selection["trial_id"])]
    # marginal, and (binary tasks) class-conditional (Mondrian): coverage of the positive class
    # on its own; with 5 classes a validation fold holds ~4 cases per class, too few for any level
    modes = [False, True] if exp.binary else [False]
    parts = []
    for mondrian in modes:
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
    """(selection row, fold, validation rows, test rows) of every selected trial's folds that
    have validation rows."""
    for s in selection.itertuples(index=False):
        trial = exp.predictions[exp.predictions["trial_id"] == s.trial_id]
        for fold in sorted(trial["fold"].unique()):
            val = trial[(trial["fold"] == fold) & (trial["split"] == "val")]
            if not val.empty:
                yield s, fold, val, trial[(trial["fold"] == fold) & (trial["split"] == "test")]


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

    The threshold is chosen on the fold's validation rows (learn-then-test on the MC vote
    confidence), then applied unchanged to its test rows, next to the configured vote
    threshold (``mc.threshold``, the studies' rule).

    Args:
        exported: (trial_id, fold) that ``raycyto export`` picks, flagged ``exported``.

    Returns:
        thresholds.csv: config, trial_id, best, fold, exported, target, delta, threshold
        (NaN: none certified, every case referred), certified, val_n, val_positives,
        min_positives, val_referral_rate, val_recall_kept, p_value, test_n, test_referral_rate,
        test_recall_kept, test_accuracy_kept, test_positives_kept, test_met (recall among kept
        test cases >= target; NaN when no positive is kept), vote_threshold,
        vote_test_referral_rate, vote_test_recall_kept, statement.
    """
    if not exp.binary or mc.target_recall is None:
        return pd.DataFrame()
    from raycyto.referral.risk import risk_controlled_threshold

    rows = []
    pos_name = exp.class_names[exp.positive]
    for s, fold, val, test in _fold_splits(exp, selection):
        g = risk_controlled_threshold(val["label"].to_numpy(), val["mc_label"].to_numpy(),
                                      val["mc_confidence"].to_numpy(), exp.positive,
                                      mc.target_recall, mc.risk_delta)
        y, pred = test["label"].to_numpy(), test["mc_label"].to_numpy()
        conf = test["mc_confidence"].to_numpy(dtype=float)
        at = _kept_metrics(y, pred, conf, g.threshold, exp.positive)
        vote = _kept_metrics(y, pred, conf, exp.threshold, exp.positive)
        met = at["recall_kept"] >= mc.target_recall - 1e-12 if not math.isnan(at["recall_kept"]) \
            else math.nan
        rows.append({
            "config": s.config, "trial_id": s.trial_id, "best": bool(s.best), "fold": int(fold),
            "exported": exported == (s.trial_id, int(fold)),
            "target": mc.target_recall, "delta": mc.risk_delta, "threshold": g.threshold,
            "certified": g.certified, "val_n": g.n, "val_positives": g.n_positive,
            "min_positives": min_positives(mc.target_recall, mc.risk_delta),
            "val_referral_rate": g.referral_rate, "val_recall_kept": g.recall_kept,
            "p_value": g.p_value, "test_n": len(test),
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
    }).reset_index()


def empirical_thresholds(exp: "Experiment", selection: pd.DataFrame, target: float) -> pd.DataFrame:
    """Multiclass ``--target-recall``: the smallest MC threshold whose kept validation cases
    reach ``target`` macro recall (no guarantee: the empirical choice), per configuration and
    fold, applied to that fold's test rows."""
    from raycyto.analysis.uncertainty import apply_threshold, smallest_threshold_for_recall

    rows = []
    for s, fold, val, test in _fold_splits(exp, selection):
        ch = smallest_threshold_for_recall(val["label"].to_numpy(), val["mc_label"].to_numpy(),
                                           val["mc_confidence"].to_numpy(), target,
                                           exp.num_classes, exp.positive)
        applied = apply_threshold(test["label"].to_numpy(), test["mc_label"].to_numpy(),
                                  test["mc_confidence"].to_numpy(), ch.threshold,
                                  exp.num_classes, exp.positive) if ch.reached else {}
        rows.append({"config": s.config, "trial_id": s.trial_id, "best": bool(s.best),
                     "fold": int(fold), "target": target, "threshold": ch.threshold,
                     "certified": False, "method": "empirical (no guarantee): macro recall",
                     "val_referral_rate": ch.referral_rate, "val_recall_kept": ch.recall_kept,
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


def with_rule(mc: "MCConfig", **changes: Any) -> "MCConfig":
    """``mc`` with fields replaced and checked (``refer_rule``, ``threshold``...)."""
    from raycyto.config import load_config, to_dict

    return load_config({"mc": {**to_dict(mc), **changes}}).mc if changes else replace(mc)


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

