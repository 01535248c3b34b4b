"""Write every table (CSV), figure (PNG) and report.html for one experiment.

The page (:func:`raycyto.analysis.html.render_page`) opens with a headline: the configuration
the selection rule picks (:func:`raycyto.analysis.tables.select_best`, the one ``raycyto
export`` exports), its test metrics as fold mean ± std beside the linear-probe baseline, what
it refers under the studies' vote rule and under the risk-controlled threshold, the guarantee
of the exported fold, and plain warnings when it is not better than chance. Key figures
follow, then the comparison of configurations, then the wide tables, folded.

Tables besides summary/per_class/folds/hpo/mispredictions/selection
(:mod:`raycyto.analysis.referral`; every threshold cross-fitted on the other folds' out-of-fold
test rows, never on validation rows):

- conformal.csv: LAC and APS prediction sets at ``mc.conformal_levels``, marginal and
  class-conditional (Mondrian), empirical coverage on test folds next to the level;
- thresholds.csv: binary tasks: the risk-controlled threshold per configuration and fold
  (learn-then-test, target ``mc.target_recall`` or ``--target-recall``), what it refers and
  the recall among kept test cases, beside the vote rule; multiclass with ``--target-recall``:
  the empirical smallest threshold reaching that macro recall (no guarantee);
- selective.csv: AURC of every confidence score (MC vote, MC mean, softmax,
  temperature-scaled softmax, conformal set size, MC entropy) per configuration;
- strata.csv: test metrics per value of each manifest column (e.g. karyogram ``subtype``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import yaml

from raycyto.analysis import plots
from raycyto.analysis.html import (Headline, Section, chance_warnings, config_html,
                                   data_summary_html, render_page)
from raycyto.analysis.load import Experiment, load_experiment
from raycyto.analysis.metrics import confusion, recall_of
from raycyto.analysis.tables import (folds_table, hpo_table, mispredictions_table, per_class_table,
                                     resolve_rule, select_best, selection_table, summary_table)
from raycyto.analysis.uncertainty import (expected_calibration_error, referral_curve,
                                          reliability_bins, top_label)
from raycyto.evidence.layout import config_layout

Job = tuple[str, str, Callable[[], Path]]


def _referral_job(exp: Experiment, rows: pd.DataFrame, cfg: str, path: Path, note: str = "",
                  marks: list[tuple[str, float]] | None = None) -> Job:
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
                                   f"{cfg}: referral by MC confidence, test", path, marks)

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


def comparison_metrics(exp: Experiment) -> tuple[tuple[str, ...], dict[str, float]]:
    """Metrics of the comparison dot plot (first one sorts) and their chance levels."""
    if exp.binary:
        return ("auc", "balanced_accuracy", "recall", "accuracy"), {"auc": 0.5, "balanced_accuracy": 0.5}
    chance = 1.0 / exp.num_classes
    return ("balanced_accuracy", "accuracy", "auc"), {"balanced_accuracy": chance, "auc": 0.5}


def _tables_dict(frames: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    return {k: v for k, v in frames.items() if v is not None}


class _Report:
    """Everything computed once for one report (tables, the exported fold, the headline)."""

    def __init__(self, exp: Experiment, select: str | None, target_recall: float | None) -> None:
        from raycyto.analysis.referral import (conformal_table, empirical_thresholds, risk_summary,
                                               risk_table, selective_table, strata_table)
        from raycyto.referral.fit import calibrate_trial, mc_config
        from raycyto.analysis.selection import best_fold

        self.exp = exp
        self.rule = resolve_rule(exp, select)
        self.mc = mc_config(exp, target_recall if exp.binary else None)
        self.target_recall = target_recall
        self.selection = selection_table(exp, self.rule)
        self.best = select_best(exp, self.rule)
        self.exported_fold = best_fold(exp, self.rule, self.best["trial_id"])[0]
        self.calibration = calibrate_trial(exp, self.best["trial_id"], self.mc, self.exported_fold)
        self.conformal, self.conformal_folds = conformal_table(exp, self.selection, self.mc)
        if exp.binary:
            self.thresholds = risk_table(exp, self.selection, self.mc,
                                         (self.best["trial_id"], self.exported_fold))
        elif target_recall is not None:
            self.thresholds = empirical_thresholds(exp, self.selection, target_recall)
        else:
            self.thresholds = pd.DataFrame()
        self.selective, self.selective_long = selective_table(exp, self.selection, self.mc)
        self.strata = strata_table(exp, self.selection)
        summary = summary_table(exp, self.rule)
        self.summary = self._extend_summary(summary, risk_summary(self.thresholds) if exp.binary
                                            else pd.DataFrame(columns=["trial_id"]))

    def _extend_summary(self, summary: pd.DataFrame, risk: pd.DataFrame) -> pd.DataFrame:
        """summary.csv plus the served prediction set's test coverage and the risk rule per configuration."""
        mc, c = self.mc, self.conformal
        out = summary.copy()
        if len(c):
            served = c[(c["score"] == mc.conformal_score) & (c["level"] == float(mc.coverage))
                       & (c["mondrian"].astype(bool) == bool(mc.conformal_mondrian))].set_index("trial_id")
            out["set_level"] = float(mc.coverage)
            out["set_coverage_mean"] = out["trial_id"].map(served["coverage_mean"])
            out["set_coverage_std"] = out["trial_id"].map(served["coverage_std"])
            out["set_size_mean"] = out["trial_id"].map(served["set_size_mean"])
            out["set_singleton_rate"] = out["trial_id"].map(served["singleton_rate"])
        if len(risk) and "risk_threshold_mean" in risk:
            notes = out.pop("notes")
            out = out.merge(risk, on="trial_id", how="left")
            out["notes"] = notes.to_numpy()
        return out

    # ------------------------------------------------------------------ headline

    def baseline_row(self) -> pd.Series | None:
        """The linear probe of the best configuration's backbone (else the best probe)."""
        probes = self.summary[self.summary["baseline"].astype(bool)]
        if probes.empty:
            return None
        same = probes[probes["backbone"] == self.best["backbone"]]
        return (same if len(same) else probes).iloc[0]

    def headline(self) -> Headline:
        exp, best = self.exp, self.summary[self.summary["best"]].iloc[0]
        pos = exp.class_names[exp.positive] if exp.positive is not None else None
        keys = [("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"),
                ("recall", f"{pos} recall" if pos else "macro recall"), ("auc", "AUC"),
                ("referral_rate", f"referred (vote < {exp.threshold:g})")]
        ms = lambda row, k: (float(row[f"{k}_mean"]), float(row[f"{k}_std"]))  # noqa: E731
        metrics = {label: ms(best, k) for k, label in keys}
        raw = {k: ms(best, k) for k, _ in keys}
        base = self.baseline_row()
        base_name, base_metrics, base_raw = "", {}, None
        test = exp.test_predictions[exp.test_predictions["trial_id"] == best["trial_id"]]
        shares = np.bincount(test["label"].to_numpy(), minlength=exp.num_classes) / max(len(test), 1)
        majority = int(np.argmax(shares))
        if base is not None:
            base_name = f"linear probe ({base['backbone']})"
            base_metrics = {label: ms(base, k) for k, label in keys}
            base_raw = {k: ms(base, k) for k, _ in keys}
        else:
            base_name = f"majority class ({exp.class_names[majority]})"
            base_metrics = {"accuracy": (float(shares[majority]), math.nan)}
        warnings = chance_warnings(raw, int(best["folds"]), base_raw, base_name,
                                   float(shares[majority]), exp.class_names[majority])
        if bool(best["baseline"]):
            warnings.insert(0, f"No trained head beats the linear probe beyond noise on validation ({self.rule.describe()}): "
                               "the probe is the model `raycyto export` exports.")
        return Headline(config=str(best["config"]), metrics=metrics, folds=int(best["folds"]),
                        selected_on=self.rule.describe(), baseline_name=base_name,
                        baseline=base_metrics, referral=self.referral_text(best),
                        guarantee=self.guarantee_text(), warnings=tuple(warnings))

    def referral_text(self, best: pd.Series) -> tuple[str, ...]:
        from raycyto.analysis.referral import coverage_sentence
        from raycyto.referral.fit import min_positives

        exp, mc = self.exp, self.mc
        parts = []
        if bool(best["mc_dropout"]):
            parts.append(f"The studies' rule (refer when fewer than {exp.threshold:.0%} of the "
                         f"{(exp.meta.get('mc') or {}).get('passes', '')} MC-dropout votes agree) refers "
                         f"{best['referral_rate_mean']:.0%} \u00b1 {np.nan_to_num(best['referral_rate_std']):.0%} "
                         f"of test cases; accuracy on the cases kept: {best['accuracy_kept_mean']:.2f}.")
        else:
            parts.append("This configuration has no MC dropout: its passes always agree, so the vote "
                         "rule refers nothing. Refer through its prediction set (mc.refer_rule: set).")
        t = self.thresholds
        if exp.binary and len(t):
            rows = t[t["trial_id"] == best["trial_id"]]
            pos = exp.class_names[exp.positive]
            goal = (f"{pos} recall \u2265 {mc.target_recall:.0%} among kept cases with "
                    f"{1 - mc.risk_delta:.0%} confidence")
            if not rows["certified"].any():
                most, need = int(rows["cal_positives"].max()), min_positives(mc.target_recall, mc.risk_delta)
                why = (f"{most} {pos} cases at most, and at least {need} are needed even with no miss"
                       if most < need else f"the {pos} cases the model misses on validation are too many "
                       "for that target")
                parts.append(f"Risk-controlled threshold ({goal}): no fold's calibration rows can certify "
                             f"it ({why}), so this rule refers every case.")
            else:
                tested = rows["test_met"].notna()
                parts.append(f"Risk-controlled threshold ({goal}, calibrated per fold on the other folds' "
                             "out-of-fold rows): refers "
                             f"{rows['test_referral_rate'].mean():.0%} \u00b1 "
                             f"{np.nan_to_num(rows['test_referral_rate'].std()):.0%} of test cases; "
                             f"{pos} recall among kept test cases {rows['test_recall_kept'].mean():.2f}, "
                             f"target met on {int(rows.loc[tested, 'test_met'].astype(bool).sum())} of "
                             f"{int(tested.sum())} test folds ({int(rows['certified'].sum())} of "
                             f"{len(rows)} folds certified a threshold).")
            if rows["certifiable_recall"].notna().any():
                parts.append(f"The highest {pos} recall certifiable at {1 - mc.risk_delta:.0%} confidence: "
                             f"{rows['certifiable_recall'].mean():.2f} on average over the folds "
                             f"(referring {rows['certifiable_test_referral_rate'].mean():.0%} of test cases; "
                             f"{pos} recall among kept test cases {rows['certifiable_test_recall_kept'].mean():.2f}).")
        cov = coverage_sentence(self.conformal, best["trial_id"], float(mc.coverage), mc.conformal_score)
        if cov:
            parts.append(cov)
        kept = "exactly the negative class" if mc.set_keep == "negative" else "a single class"
        rule = {"vote": f"refer when the vote confidence is below {exp.threshold:g}",
                "set": f"refer when the {mc.conformal_score.upper()} prediction set at {mc.coverage:g} is "
                       f"not {kept}", "risk": "refer below the risk-controlled threshold"}[mc.refer_rule]
        parts.append(f"The exported model's rule (mc.refer_rule: {mc.refer_rule}): {rule}.")
        guard = self.guard_meta()
        if guard:
            parts.append("Whatever the rule, an image unlike the training images is referred as "
                         "out of distribution: its backbone features are further from every class than "
                         f"{1 - float(guard.get('false_alarm_rate') or 0.05):.0%} of the calibration images "
                         f"(Mahalanobis distance; {guard.get('calibrated_by') or 'threshold set by the sweep'}).")
        return tuple(parts)

    def guard_meta(self) -> dict:
        """model.json ``ood`` of the exported fold's checkpoint ({} when it has no guard)."""
        import json

        path = self.exp.exp_dir / "checkpoints" / str(self.best["trial_id"]) / f"fold{self.exported_fold}" \
            / "model.json"
        try:
            return dict(json.loads(path.read_text()).get("ood") or {})
        except (OSError, ValueError):
            return {}

    def guarantee_text(self) -> tuple[str, ...]:
        from raycyto.analysis.referral import level_label

        exp, mc, cal = self.exp, self.mc, self.calibration
        parts = []
        if cal.risk is not None:
            pos = exp.class_names[exp.positive]
            parts.append(cal.risk.statement(pos))
            if cal.certifiable is not None:
                parts.append(f"Highest {pos} recall certifiable at {1 - mc.risk_delta:.0%} confidence: "
                             f"{cal.certifiable.target:.2f}, keeping cases with confidence \u2265 "
                             f"{cal.certifiable.threshold:g} (referring {cal.certifiable.referral_rate:.0%} of "
                             "the calibration cases).")
        per_class = "for each class separately (Mondrian)" if mc.conformal_mondrian else "on average"
        randomized = " (randomized per image)" if mc.conformal_score == "aps" else ""
        parts.append(f"The {mc.conformal_score.upper()} prediction set{randomized} at level "
                     f"{level_label(mc.coverage)} holds the true class for {level_label(mc.coverage)} of "
                     f"new cases like the calibration cases, {per_class}.")
        parts.append(f"Calibrated on: {cal.rows}; never on validation rows, which stopped training, "
                     "picked the probe's C, fitted the temperature "
                     f"({cal.temperature_on or 'not fitted'}) and ranked the configurations.")
        return tuple(parts)

    # ------------------------------------------------------------------ figures

    def figure_jobs(self, out: Path, hpo: pd.DataFrame) -> tuple[list[Job], list[Job]]:
        """(key figures, more figures): (file name, caption, draw) each, drawn later."""
        exp, best = self.exp, self.summary[self.summary["best"]].iloc[0]
        test = exp.test_predictions
        test = test[test["trial_id"] == best["trial_id"]]
        y = test["label"].to_numpy()                                   # [N]
        probs = test[exp.prob_columns].to_numpy(dtype=float)           # [N, C]
        names, c, cfg = exp.class_names, exp.num_classes, best["config"]
        key: list[Job] = []
        more: list[Job] = []
        if len(test):
            key.append(("confusion_all.png", f"confusion matrix, {cfg}, all test folds",
                        lambda: plots.confusion_plot(confusion(y, test["pred"].to_numpy(), c), names,
                                                     f"{cfg}: all test folds", out / "confusion_all.png")))
            key.append(("roc.png", f"ROC, {cfg}, test" + ("" if exp.binary else " (one-vs-rest)"),
                        lambda: plots.roc_plot(y, probs, names, exp.positive, f"{cfg}: test ROC",
                                               out / "roc.png", folds=test["fold"].to_numpy())))
            varies = test["mc_confidence"].nunique() > 1
            (key if varies else more).append(
                _referral_job(exp, test, cfg, out / "referral.png", marks=self._risk_marks(best)))
            alt = None if varies else _best_with_varying_confidence(exp, self.summary)
            if alt is not None:  # no dropout in the best: show the best one with it
                key.append(_referral_job(exp, alt[1], alt[0], out / "referral_mc.png",
                                         " (best configuration whose MC passes vary)"))
            if len(self.selective_long):
                key.append(("risk_coverage.png", f"risk\u2013coverage by confidence score, {cfg}, test "
                            "folds pooled (AURC: fold mean; temperature and sets fitted on validation)",
                            lambda: self._risk_coverage(best, out / "risk_coverage.png")))
                if alt is not None:
                    alt_row = self.summary[self.summary["config"] == alt[0]].iloc[0]
                    key.append(("risk_coverage_mc.png", f"risk\u2013coverage by confidence score, {alt[0]} "
                                "(best configuration whose MC passes vary): MC dropout against one softmax",
                                lambda: self._risk_coverage(alt_row, out / "risk_coverage_mc.png")))
            key.append(("reliability.png", f"reliability diagram with ECE, {cfg}, test "
                        "(temperature fitted per fold on validation)",
                        lambda: self._reliability(test, best, out / "reliability.png")))
            rows = self.conformal[(self.conformal["trial_id"] == best["trial_id"])
                                  & (~self.conformal["mondrian"].astype(bool))] if len(self.conformal) else []
            if len(rows):
                key.append(("conformal_coverage.png", f"prediction sets, {cfg}: test coverage against "
                            "the nominal level (cross-fitted: calibrated on the other folds' out-of-fold rows)",
                            lambda: plots.conformal_coverage_plot(rows, f"{cfg}: conformal prediction sets",
                                                                  out / "conformal_coverage.png")))
            if len(self.strata):
                s = self.strata[self.strata["trial_id"] == best["trial_id"]]
                for col, g in s.groupby("column", sort=True):
                    name = f"strata_{col}.png"
                    metric = "accuracy" if exp.binary else "recall"
                    what = (f"accuracy per {col} (abnormal values: recall; normal: specificity)"
                            if exp.binary else f"macro recall per {col}")
                    key.append((name, f"{what}, {cfg}, test folds",
                                lambda g=g, name=name, metric=metric, col=col: plots.strata_plot(
                                    g, metric, f"{cfg}: {metric} per {col} (test)", out / name)))
            for fold, g in test.groupby("fold"):
                name = f"confusion_fold{fold}.png"
                more.append((name, f"confusion matrix, {cfg}, test fold {fold}",
                             lambda g=g, fold=fold, name=name: plots.confusion_plot(
                                 confusion(g["label"].to_numpy(), g["pred"].to_numpy(), c), names,
                                 f"{cfg}: test fold {fold}", out / name)))
        metrics, chance = comparison_metrics(exp)
        key.append(("comparison.png", "configurations compared on test folds (mean \u00b1 std; red: "
                    "selected on validation; grey diamonds: linear probe; dashed: chance)",
                    lambda: plots.comparison_dot_plot(self.summary, metrics, out / "comparison.png",
                                                      chance=chance)))
        histories = exp.history(best["trial_id"])
        if histories:
            more.append(("training_curves.png", f"training curves per epoch, {cfg}",
                         lambda: plots.training_curves_plot(histories, cfg, out / "training_curves.png")))
        more.append(("hpo_scatter.png", "search samples: validation loss vs learning rate and batch size",
                     lambda: plots.hpo_scatter_plot(hpo, out / "hpo_scatter.png")))
        return key, more

    def _risk_marks(self, best: pd.Series) -> list[tuple[str, float]]:
        t = self.thresholds
        if not self.exp.binary or t.empty:
            return []
        rows = t[t["trial_id"] == best["trial_id"]]
        if rows.empty:
            return []
        return [(f"risk-controlled (recall \u2265 {self.mc.target_recall:.0%}, per fold)",
                 1.0 - float(np.average(rows["test_referral_rate"], weights=rows["test_n"])))]

    def _risk_coverage(self, best: pd.Series, path: Path) -> Path:
        from raycyto.analysis.selective import selective_curves

        long = self.selective_long[self.selective_long["trial_id"] == best["trial_id"]]
        scores = {name: (g["correct"].to_numpy(bool), g["confidence"].to_numpy(float))
                  for name, g in long.groupby("score", sort=False)}
        summary = self.selective[self.selective["trial_id"] == best["trial_id"]][["score", "aurc_mean"]] \
            .rename(columns={"aurc_mean": "aurc"})
        return plots.risk_coverage_plot(selective_curves(scores), summary,
                                        f"{best['config']}: risk\u2013coverage, test", path)

    def _reliability(self, test: pd.DataFrame, best: pd.Series, path: Path) -> Path:
        from raycyto.referral.temperature import fit_temperature

        exp = self.exp
        y = test["label"].to_numpy()
        sources = {"softmax": test[exp.prob_columns].to_numpy(dtype=float)}
        if set(exp.mc_mean_columns) <= set(test.columns):
            sources["MC mean"] = test[exp.mc_mean_columns].to_numpy(dtype=float)
        scaled = np.zeros_like(sources["softmax"])
        val = exp.val_predictions[exp.val_predictions["trial_id"] == best["trial_id"]]
        for fold, idx in test.groupby("fold").indices.items():
            v = val[val["fold"] == fold]
            fit = fit_temperature(v["label"].to_numpy(), probs=v[exp.prob_columns].to_numpy(dtype=float)) \
                if len(v) else None
            p = sources["softmax"][idx]
            scaled[idx] = fit.apply_probs(p) if fit is not None else p
        sources["temperature-scaled softmax"] = scaled
        curves = {}
        for label, p in sources.items():
            correct, conf = top_label(p, y)
            curves[label] = (reliability_bins(correct, conf), expected_calibration_error(correct, conf))
        return plots.reliability_plot(curves, f"{best['config']}: reliability, test", path)


KEY_COLUMNS = {
    "summary": ("config", "best", "baseline", "accuracy_mean", "balanced_accuracy_mean", "recall_mean",
                "auc_mean", "referral_rate_mean", "aurc_mean", "ece_mean", "ece_temp_mean",
                "set_coverage_mean", "set_size_mean", "risk_referral_rate_mean", "risk_recall_kept_mean"),
    "conformal": ("config", "level", "score", "mondrian", "coverage_mean", "coverage_std",
                  "set_size_mean", "singleton_rate", "n_calibration_mean", "on_target"),
    "thresholds": ("config", "fold", "exported", "cal_n", "threshold", "certified", "certifiable_recall",
                   "test_referral_rate",
                   "test_recall_kept", "test_met", "vote_test_referral_rate", "vote_test_recall_kept"),
    "selective": ("config", "score", "aurc_mean", "aurc_std", "e_aurc_mean", "risk_mean"),
    "strata": ("config", "column", "value", "n", "accuracy_mean", "accuracy_std", "recall_mean",
               "recall_std"),
}


EVIDENCE_NOTE = (
    "the selected configuration's test images, each explained by its fold's checkpoint ({method}). "
    "pointing_top1/top3: share of abnormal images whose abnormal chromosome (karyotype; translocations: "
    "either partner; 45,X: X or Y) is the top chromosome / among the top 3 by evidence share in its slot. "
    "peak_on_white_cell: share whose map peak lies in a white cell the generator drew. Deletion test: "
    "drop_top / drop_random = mean fall of the explained class's probability when the top evidence "
    "region / a random region of the same size (mean of {k}) is filled with the image's median colour; "
    "deletion_ratio = drop_top / drop_random. Per image: evidence_cases.csv.")


def _evidence(exp: Experiment, r: "_Report", out: Path, tables: dict,
              layout_file: str | Path | None = None) -> tuple[str, str]:
    """evidence.csv, evidence_cases.csv and the gallery HTML, or ("", why not)."""
    from raycyto.analysis.evidence import evidence_section
    from raycyto.evidence.evaluation import RANDOM_REGIONS

    trial = str(r.best["trial_id"])
    test = exp.predictions[(exp.predictions["trial_id"] == trial) & (exp.predictions["split"] == "test")]
    ckpt = Path(exp.exp_dir) / "checkpoints" / trial
    missing = [int(k) for k in sorted(test["fold"].unique()) if not (ckpt / f"fold{int(k)}" / "model.json").is_file()]
    if test.empty or missing or not Path(str(test["path"].iloc[0])).is_file():
        why = f"checkpoints of folds {missing} missing" if missing else "test images not found"
        return "", f"no evidence section: {why} ({ckpt})"
    summary, per, gallery = evidence_section(exp, trial, out, r.mc.coverage, r.mc.conformal_score, seed=0,
                                             layout_file=layout_file)
    for name, df in (("evidence", summary), ("evidence_cases", per)):
        if len(df):
            tables[name] = df
            df.to_csv(out / f"{name}.csv", index=False)
    method = summary["method"].iloc[0] if len(summary) else "-"
    return gallery, EVIDENCE_NOTE.format(method=method, k=RANDOM_REGIONS)


def write_report(exp_dir: str | Path, out_dir: str | Path | None = None, select: str | None = None,
                 target_recall: float | None = None, progress: bool = False, evidence: bool = True,
                 layout: str | Path | None = None) -> Path:
    """Write the CSV tables, PNG figures and report.html.

    Args:
        exp_dir: experiment directory written by ``raycyto sweep``, or a main-job folder
            (``runs/demo``) holding one in ``experiment/``.
        out_dir: where to write (default ``exp_dir/report``; ``runs/demo/report`` for a main-job folder).
        select: the selection rule (:mod:`raycyto.analysis.selection`; default: the sweep's
            search metric), the same one ``raycyto export`` uses.
        target_recall: binary tasks: the recall target of the risk-controlled threshold
            (overrides ``mc.target_recall``; thresholds.csv); multiclass: also write
            thresholds.csv with the smallest MC threshold reaching this macro recall on
            validation (no guarantee) and what it gives on test.
        progress: rich progress bars.
        evidence: explain the selected configuration's test images with its per-fold
            checkpoints (evidence.csv, evidence_cases.csv, the case gallery after the headline);
            skipped, with a note, when the checkpoints or images are not there.
        layout: a karyogram layout file (JSON or CSV) that names chromosomes in the evidence
            (default: the config's ``data.layout``, else the built-in one for raycyto.synth
            karyograms, else maps only; :func:`raycyto.evidence.layout.config_layout`).

    Returns:
        Path of report.html.
    """
    from raycyto.analysis.load import default_report_dir, resolve_experiment_dir

    exp_dir = resolve_experiment_dir(exp_dir)
    exp = load_experiment(exp_dir, progress=progress)
    if target_recall is not None and not 0 < target_recall < 1:
        from raycyto.analysis.load import ExperimentError

        raise ExperimentError(f"--target-recall {target_recall}: must be in (0, 1), e.g. 0.95")
    if evidence and exp.binary:  # a bad layout file (--layout, data.layout) fails before any work
        config_layout(yaml.safe_load(exp.config_text) or {}, layout)
    out = Path(out_dir) if out_dir is not None else default_report_dir(exp_dir)
    out.mkdir(parents=True, exist_ok=True)
    r = _Report(exp, select, target_recall)
    metric = r.rule

    tables = _tables_dict({
        "summary": r.summary, "per_class": per_class_table(exp, metric),
        "folds": folds_table(exp, metric), "hpo": hpo_table(exp, metric),
        "mispredictions": mispredictions_table(exp, metric), "selection": r.selection,
        "conformal": r.conformal, "selective": r.selective,
    })
    if len(r.thresholds):
        tables["thresholds"] = r.thresholds
    if len(r.strata):
        tables["strata"] = r.strata
    for stale in ("thresholds", "strata"):   # a rerun must not leave an older run's file behind
        if stale not in tables:
            (out / f"{stale}.csv").unlink(missing_ok=True)
    for name, df in tables.items():
        df.to_csv(out / f"{name}.csv", index=False)

    gallery, evidence_note = "", ""
    if evidence:
        gallery, evidence_note = _evidence(exp, r, out, tables, layout)
    for stale in ("evidence", "evidence_cases"):
        if stale not in tables:
            (out / f"{stale}.csv").unlink(missing_ok=True)

    key, more = r.figure_jobs(out, tables["hpo"])
    for _, _, draw in exp.track(key + more, len(key) + len(more), "drawing figures"):
        draw()

    best_cfg = r.best["config"]
    is_best = lambda df: (df["config"] == best_cfg).to_numpy() if len(df) else None  # noqa: E731
    sections = [
        Section("summary: test folds of the trial selected per configuration", r.summary,
                r.summary["best"].to_numpy(),
                f"selected by {metric.describe()}, on validation folds only; highlighted: the "
                "selected configuration (the one `raycyto export` exports); baseline rows: the linear "
                "probe. Binary: positive-class precision/recall/F1; multiclass: macro averages. "
                "std = sample std over folds. ece_temp: ECE after temperature scaling fitted on "
                "validation; aurc: area under the risk-coverage curve of the MC vote confidence; "
                f"set_*: the {r.mc.conformal_score.upper()} prediction set at level {r.mc.coverage:g}.",
                key_columns=KEY_COLUMNS["summary"]),
        Section("prediction sets (conformal.csv): coverage on test folds vs the nominal level",
                r.conformal, is_best(r.conformal),
                "cross-fitted: for each fold, calibrated on the other folds' out-of-fold test rows "
                "(n_calibration_mean) and measured on its own test rows; validation rows calibrate "
                "nothing; mondrian: one threshold per class; coverage_<class>: coverage among that "
                "class's cases; on_target: coverage within \u00b10.05 of the level",
                key_columns=KEY_COLUMNS["conformal"]),
    ]
    if "thresholds" in tables:
        t = tables["thresholds"]
        note = ("learn-then-test per fold on the other folds' out-of-fold rows, applied unchanged to "
                "the fold's test rows; certifiable_recall: the highest target those rows certify; "
                "exported: the fold `raycyto export` stores" if exp.binary else
                "empirical: the smallest threshold reaching the target on the other folds' out-of-fold "
                "rows (no guarantee)")
        sections.append(Section("referral thresholds (thresholds.csv)", t, is_best(t), note,
                                key_columns=KEY_COLUMNS["thresholds"]))
    sections.append(Section("confidence scores compared (selective.csv): AURC, lower is better",
                            r.selective, is_best(r.selective), key_columns=KEY_COLUMNS["selective"]))
    if "evidence" in tables:
        sections.append(Section("evidence (evidence.csv): where the answer comes from, against the truth",
                                tables["evidence"], None, evidence_note, open=True))
    if "strata" in tables:
        sections.append(Section("per stratum (strata.csv): test metrics per manifest value", r.strata,
                                is_best(r.strata), "recall: of the positive class (binary) or macro "
                                "(multiclass), of the single-pass prediction; fold mean \u00b1 std",
                                key_columns=KEY_COLUMNS["strata"]))
    sections += [
        Section("per class", tables["per_class"], is_best(tables["per_class"])),
        Section("folds", tables["folds"], is_best(tables["folds"])),
        Section("search samples (validation only)", tables["hpo"],
                tables["hpo"]["selected"].to_numpy(), "highlighted: the sample selected per cell"),
        Section("mispredictions (MC vote wrong), selected configurations", tables["mispredictions"],
                is_best(tables["mispredictions"])),
    ]
    notes = [f"experiment: {exp.exp_dir}",
             f"best configuration by {metric.describe()}: {best_cfg} "
             f"(trial {r.best['trial_id']}, validation {metric} {r.best['val_score']:.4g}; "
             f"exported fold {r.exported_fold})"]
    title = f"raycyto report: {exp.meta.get('task', '')} ({', '.join(exp.class_names)})"
    appendix = "<h2>Data</h2>" + data_summary_html(exp) + config_html(exp.config_text)
    if evidence_note and "evidence" not in tables:
        notes.append(evidence_note)
    page = render_page(title, r.headline(), [(n, cap) for n, cap, _ in key], sections, notes,
                       more_figures=[(n, cap) for n, cap, _ in more], appendix=appendix, gallery=gallery)
    path = out / "report.html"
    path.write_text(page)
    return path
