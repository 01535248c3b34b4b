"""The one selection rule: which configuration a sweep calls best, which one is exported.

The sweep's summary table, the report's highlight and ``raycyto export`` all rank trials
with :func:`rank_trials` under one :class:`SelectionRule`, on validation predictions only
(test folds never choose anything). ``--select`` on ``report`` and ``export`` takes the same
text.

Rules (``SelectionRule.parse``):

- ``"accuracy"`` / ``"val_accuracy"`` (any metric of :data:`raycyto.analysis.metrics.SELECT_METRICS`):
  the fold mean of that validation metric; highest wins (lowest for ``loss``).
- ``"recall@specificity>=0.9"`` (binary tasks; also ``@precision>=``): the highest validation
  recall among configurations whose fold-mean validation specificity (or precision) reaches
  the floor. Raw recall alone would reward calling every case positive; such a classifier
  has specificity 0 and is refused.

- ``"brier+1se"`` (any metric, ``+1se``): the one-standard-error rule on fold-paired
  differences. Every configuration, the linear probe included, is compared with the best one
  fold by fold; those whose mean fold difference is within one standard error of it (the std
  of the K differences / sqrt(K)) cannot be told apart from it, and the simplest of them wins:
  the probe, then frozen heads, then deeper fine-tuning (:func:`complexity`); the better score
  among equals. With ~19 validation images a fold, accuracy moves in steps of 0.05 and ranks
  30 configurations mostly by noise; the Brier score and the log loss are proper scoring rules
  that every image moves a little, and the rule exports the probe when no trained head beats
  it beyond noise.

Default (:data:`DEFAULT_RULE`): ``brier+1se``. On the study-sized blood-smear demo (266 images,
seeds 0-2, ``benchmarks/selection_rules.py``) the exported configuration's test accuracy,
against the best probe / the median trained configuration, averaged over the seeds:
accuracy -0.004 / -0.001, loss -0.015 / -0.012, loss+1se -0.011 / -0.009, brier +0.001 / +0.004,
brier+1se +0.003 / +0.005. The log loss punishes a confident miss without bound, so with ~43
validation images one such image decides the ranking; the Brier score is bounded.
``--select val_accuracy`` gives the sweep's search metric as before.

Ties, in order: higher score; a configuration with MC dropout (its confidence can refer
cases) before one without; lower validation loss; trial id. Under a plain metric, baselines
(the linear probe) are ranked but never chosen: they are what the trained heads are compared
with; under ``+1se`` the probe is a candidate like any other.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np
import pandas as pd

from raycyto.analysis.metrics import SELECT_METRICS
from raycyto.errors import RaycytoError

if TYPE_CHECKING:  # pragma: no cover
    from raycyto.analysis.load import Experiment

#: The rule the report highlights and ``raycyto export`` exports when none is given.
DEFAULT_RULE = "brier+1se"
#: Simplicity tiers of the one-SE rule: the probe, then each fine-tuning mode in this order.
COMPLEXITY = ("probe", "frozen", "last1", "last2", "full")
_CONSTRAINED = re.compile(r"^(?P<m>[a-z0-9_]+)@(?P<c>[a-z0-9_]+)>=(?P<f>[0-9.]+)$")
FLOOR_METRICS = ("specificity", "precision")


class SelectionError(RaycytoError):
    """A bad ``--select`` rule, or no configuration satisfies it."""


@dataclass(frozen=True)
class SelectionRule:
    """Score a trial from its validation predictions.

    Attributes:
        metric: a key of ``SELECT_METRICS`` (``accuracy``, ``recall``, ``auc``, ``loss``...).
        floor_metric: constrained rule only: ``specificity`` or ``precision``.
        floor: the value ``floor_metric`` must reach (fold mean).
        one_se: the one-standard-error rule toward simpler configurations (the probe included).
    """

    metric: str
    floor_metric: Optional[str] = None
    floor: Optional[float] = None
    one_se: bool = False

    @classmethod
    def parse(cls, text: str) -> "SelectionRule":
        """``"val_accuracy"``, ``"auc"`` or ``"recall@specificity>=0.9"`` -> rule.

        Raises:
            SelectionError: unknown metric or malformed constraint (the message lists the choices).
        """
        t = str(text).strip().lower().replace(" ", "")
        if t.endswith("+1se"):
            inner = cls.parse(t.removesuffix("+1se"))
            if inner.floor_metric or inner.one_se:
                raise SelectionError(f"--select {text!r}: +1se takes a plain metric, e.g. 'brier+1se'")
            return cls(inner.metric, one_se=True)
        m = _CONSTRAINED.match(t)
        if m:
            metric, floor_metric, floor = m["m"].removeprefix("val_"), m["c"], m["f"]
            if floor_metric not in FLOOR_METRICS:
                raise SelectionError(f"--select {text!r}: the floor must be on one of {list(FLOOR_METRICS)}")
            try:
                value = float(floor)
            except ValueError:
                raise SelectionError(f"--select {text!r}: floor {floor!r} is not a number") from None
            if not 0 < value <= 1:
                raise SelectionError(f"--select {text!r}: floor must be in (0, 1]")
            rule = cls(metric, floor_metric, value)
        else:
            rule = cls(t.removeprefix("val_"))
        if rule.metric not in SELECT_METRICS:
            raise SelectionError(f"--select {text!r}: unknown metric {rule.metric!r}; choose one of "
                                 f"{sorted(SELECT_METRICS)}, or e.g. 'recall@specificity>=0.9'")
        return rule

    @classmethod
    def default(cls, exp: "Experiment") -> "SelectionRule":
        """:data:`DEFAULT_RULE` (the search metric only drives Tune's sampler)."""
        return cls.parse(DEFAULT_RULE)

    @property
    def higher_is_better(self) -> bool:
        return SELECT_METRICS[self.metric][1]

    def __str__(self) -> str:
        if self.floor_metric:
            return f"{self.metric}@{self.floor_metric}>={self.floor:g}"
        return f"{self.metric}+1se" if self.one_se else self.metric

    def describe(self) -> str:
        """One line for reports: what the rule does."""
        if self.floor_metric:
            return (f"highest validation {self.metric} among configurations whose validation "
                    f"{self.floor_metric} is at least {self.floor:g} (fold means)")
        best = "highest" if self.higher_is_better else "lowest"
        if self.one_se:
            return (f"the simplest configuration (linear probe, then frozen heads, then fine-tuning) whose "
                    f"validation {self.metric} is within one standard error of the {best} (fold-paired "
                    "differences)")
        return f"{best} validation {self.metric} (fold mean)"

    def check(self, exp: "Experiment") -> None:
        """Refuse rules that do not apply to ``exp`` (specificity floors on multiclass tasks)."""
        if self.floor_metric == "specificity" and not exp.binary:
            raise SelectionError(f"--select {self}: specificity needs a binary task; "
                                 f"use e.g. '{self.metric}@precision>={self.floor:g}'")

    def fold_values(self, y: np.ndarray, pred: np.ndarray, probs: np.ndarray,
                    positive: Optional[int]) -> tuple[float, float]:
        """(metric, floor metric or NaN) of one fold's validation predictions."""
        value = SELECT_METRICS[self.metric][0](y, pred, probs, positive)
        floor = SELECT_METRICS[self.floor_metric][0](y, pred, probs, positive) if self.floor_metric else math.nan
        return value, floor

    def qualifies(self, floor_value: float) -> bool:
        """Whether a (fold-mean) floor value meets the constraint (always true without one)."""
        return self.floor_metric is None or (not math.isnan(floor_value) and floor_value >= self.floor - 1e-12)


def fold_scores(exp: "Experiment", rule: SelectionRule) -> pd.DataFrame:
    """Validation values of the rule per (trial, fold), from split == 'val' predictions.

    Returns:
        columns trial_id, fold, value, floor, loss (validation log loss).
    """
    key = ("fold_scores", str(rule))
    if key in exp.cache:
        return exp.cache[key]
    from raycyto.analysis.metrics import log_loss_of

    rows = []
    val = exp.val_predictions
    groups = val.groupby(["trial_id", "fold"], sort=True)
    for (trial, fold), g in exp.track(groups, groups.ngroups, f"validation {rule} per fold"):
        y, pred = g["label"].to_numpy(), g["pred"].to_numpy()
        probs = g[exp.prob_columns].to_numpy(dtype=float)
        value, floor = rule.fold_values(y, pred, probs, exp.positive)
        rows.append({"trial_id": trial, "fold": int(fold), "value": value, "floor": floor,
                     "loss": log_loss_of(y, probs)})
    exp.cache[key] = pd.DataFrame(rows, columns=["trial_id", "fold", "value", "floor", "loss"])
    return exp.cache[key]


def trial_scores(exp: "Experiment", rule: SelectionRule) -> pd.DataFrame:
    """One row per trial of results.csv: the rule's fold-mean validation score.

    Returns:
        indexed by trial_id: value (fold mean), floor (fold mean), val_loss, score (value,
        NaN when the floor is not met or the trial failed), baseline, mc_dropout.
    """
    from raycyto.analysis.load import FAILED_STATUSES

    res = exp.results.set_index("trial_id")
    folds = fold_scores(exp, rule)
    means = folds.groupby("trial_id")[["value", "floor", "loss"]].mean()
    out = pd.DataFrame(index=res.index)
    out["value"] = means["value"].reindex(res.index)
    out["floor"] = means["floor"].reindex(res.index)
    out["val_loss"] = means["loss"].reindex(res.index)
    fallback = f"val_{rule.metric}"  # a trial without validation predictions: results.csv's fold mean
    if fallback in res:
        out["value"] = out["value"].fillna(pd.to_numeric(res[fallback], errors="coerce"))
    if "val_loss" in res:
        out["val_loss"] = out["val_loss"].fillna(pd.to_numeric(res["val_loss"], errors="coerce"))
    ok = out["floor"].map(rule.qualifies).astype(bool)
    failed = res["status"].astype(str).str.lower().isin(FAILED_STATUSES)
    out["score"] = out["value"].where(ok & ~failed)
    out["baseline"] = exp.baseline_mask.reindex(res.index).fillna(False).astype(bool)
    out["mc_dropout"] = exp.mc_dropout_mask.reindex(res.index).fillna(True).astype(bool)
    return out


def rank_trials(table: pd.DataFrame, rule: SelectionRule) -> pd.DataFrame:
    """Best first: score (NaN last), MC dropout first, lower val_loss, trial_id.

    Args:
        table: needs columns trial_id, score, mc_dropout, val_loss.
    """
    sign = -1.0 if rule.higher_is_better else 1.0
    order = table.assign(_s=pd.to_numeric(table["score"], errors="coerce") * sign,
                         _m=~table["mc_dropout"].astype(bool),
                         _l=pd.to_numeric(table["val_loss"], errors="coerce"))
    return order.sort_values(["_s", "_m", "_l", "trial_id"], na_position="last").drop(columns=["_s", "_m", "_l"])


def complexity(row: pd.Series) -> int:
    """Simplicity tier of a configuration (:data:`COMPLEXITY`): 0 for a baseline (the probe)."""
    if bool(row.get("baseline", False)):
        return 0
    ft = str(row.get("finetune", "frozen"))
    return COMPLEXITY.index(ft) if ft in COMPLEXITY else len(COMPLEXITY)


def one_se_choice(exp: "Experiment", rule: SelectionRule, candidates: pd.DataFrame) -> str:
    """The trial the one-SE rule picks among ``candidates`` (rows with trial_id, score,
    baseline, finetune, mc_dropout, val_loss; best first by :func:`rank_trials`).

    The best-scoring candidate is the reference; a candidate qualifies when its mean fold-paired
    difference from it (worse = positive) is at most the standard error of those differences.
    The simplest qualifying one wins, the better score among equals.
    """
    folds = fold_scores(exp, rule).pivot_table(index="fold", columns="trial_id", values="value")
    usable = candidates[candidates["score"].notna()]
    if usable.empty:
        return str(candidates["trial_id"].iloc[0])
    ref = str(usable["trial_id"].iloc[0])
    sign = -1.0 if rule.higher_is_better else 1.0
    qualifying = []
    for i, (_, row) in enumerate(usable.iterrows()):
        t = str(row["trial_id"])
        if t not in folds or ref not in folds:
            continue
        d = (sign * (folds[t] - folds[ref])).dropna()          # [K] worse = positive
        se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
        if t == ref or (len(d) and float(d.mean()) <= se + 1e-12):
            qualifying.append((complexity(row), i, t))
    return min(qualifying)[2] if qualifying else ref


def best_trial(exp: "Experiment", rule: SelectionRule) -> pd.Series:
    """The trial the rule selects (never a baseline).

    Raises:
        SelectionError: no trained configuration has a usable score (e.g. none meets the floor).
    """
    scores = trial_scores(exp, rule).reset_index()
    ranked = rank_trials(scores[~scores["baseline"]], rule)
    if ranked.empty or pd.isna(ranked["score"].iloc[0]):
        why = (f"no trained configuration reaches validation {rule.floor_metric} >= {rule.floor:g}"
               if rule.floor_metric else f"no trained configuration has a validation {rule.metric}")
        raise SelectionError(f"{exp.exp_dir}: {why} (rule {rule}); choose another --select")
    return ranked.iloc[0]


def best_fold(exp: "Experiment", rule: SelectionRule, trial_id: str) -> tuple[int, dict[str, float]]:
    """The fold of ``trial_id`` to export: best validation value under ``rule`` (floor met
    first), then lower validation loss, then the lowest fold.

    Returns:
        (fold, {"value", "floor", "loss"} of that fold).
    """
    folds = fold_scores(exp, rule)
    f = folds[folds["trial_id"] == str(trial_id)]
    if f.empty:
        raise SelectionError(f"trial {trial_id!r} has no validation predictions to choose a fold from")
    sign = -1.0 if rule.higher_is_better else 1.0
    f = f.assign(_q=~f["floor"].map(rule.qualifies).astype(bool), _s=f["value"] * sign)
    row = f.sort_values(["_q", "_s", "loss", "fold"], na_position="last").iloc[0]
    return int(row["fold"]), {k: float(row[k]) for k in ("value", "floor", "loss")}
