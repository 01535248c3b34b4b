"""One selection rule: the report's highlight is what `raycyto export` exports, recall-first
selection is constrained, and configurations without dropout report no referral figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_analysis_fabricate import fabricate_experiment, rewrite_predictions

from raycyto.analysis import load_experiment, select_best, summary_table
from raycyto.analysis.selection import SelectionError, SelectionRule, best_trial
from raycyto.analysis.tables import NO_MC


def _disagreeing_experiment(root: Path) -> tuple[Path, str, str]:
    """A fabricated experiment where accuracy-first and recall-first pick different trials:
    trial A is accurate; trial B calls nearly everything abnormal (recall 1, specificity ~0)."""
    exp_dir = fabricate_experiment(root / "exp", seed=7)
    trials = sorted(pd.read_csv(exp_dir / "results.csv", dtype={"trial_id": str})["trial_id"])
    accurate, all_positive = trials[0], trials[1]

    def shape(p: pd.DataFrame) -> pd.DataFrame:
        a = p["trial_id"] == accurate
        p.loc[a, "pred"] = p.loc[a, "label"]  # right everywhere
        p.loc[a & (np.arange(len(p)) % 5 == 0) & (p["label"] == 1), "pred"] = 0  # misses some abnormal
        b = p["trial_id"] == all_positive
        p.loc[b, "pred"] = 1  # abnormal for every case
        for m, pred in ((a, p["pred"]), (b, p["pred"])):
            p.loc[m, "prob_abnormal"] = np.where(pred[m] == 1, 0.9, 0.1)
            p.loc[m, "prob_normal"] = 1 - p.loc[m, "prob_abnormal"]
        return p

    rewrite_predictions(exp_dir, shape)
    return exp_dir, accurate, all_positive


def test_rules_parse_and_fail_with_the_choices():
    assert SelectionRule.parse("val_accuracy") == SelectionRule("accuracy")
    assert SelectionRule.parse("recall@specificity>=0.9") == SelectionRule("recall", "specificity", 0.9)
    assert str(SelectionRule.parse("Recall @ precision >= 0.8")) == "recall@precision>=0.8"
    with pytest.raises(SelectionError, match="unknown metric 'acc'.*balanced_accuracy"):
        SelectionRule.parse("acc")
    with pytest.raises(SelectionError, match="floor must be on one of"):
        SelectionRule.parse("recall@f1>=0.5")


def test_recall_first_is_constrained_and_refuses_an_all_positive_classifier(tmp_path):
    exp_dir, accurate, all_positive = _disagreeing_experiment(tmp_path)
    exp = load_experiment(exp_dir)
    assert best_trial(exp, SelectionRule.parse("recall"))["trial_id"] == all_positive  # raw recall: the trap
    constrained = best_trial(exp, SelectionRule.parse("recall@specificity>=0.8"))
    assert constrained["trial_id"] != all_positive
    lazy = fabricate_experiment(tmp_path / "lazy", seed=8)

    def all_positive_everywhere(p: pd.DataFrame) -> pd.DataFrame:
        p["pred"] = 1
        return p

    rewrite_predictions(lazy, all_positive_everywhere)
    with pytest.raises(SelectionError, match="no trained configuration reaches validation specificity >= 0.8"):
        best_trial(load_experiment(lazy), SelectionRule.parse("recall@specificity>=0.8"))
    five = load_experiment(fabricate_experiment(tmp_path / "five", classes=("a", "b", "c"), positive=None))
    with pytest.raises(SelectionError, match="binary"):
        summary_table(five, "recall@specificity>=0.5")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The disagreeing experiment with real (tiny) bundles in checkpoints/, exported twice."""
    import torch

    from raycyto.models import build_classifier, save_bundle
    from raycyto.export.core import export_model

    root = tmp_path_factory.mktemp("sel")
    exp_dir, accurate, all_positive = _disagreeing_experiment(root)
    model = build_classifier("efficientnet_lite0", "a", 2, pretrained=True)
    results = pd.read_csv(exp_dir / "results.csv", dtype={"trial_id": str})
    for trial in results["trial_id"]:
        for fold in range(3):
            torch.manual_seed(fold)
            model.head = type(model.head)(1280, 2)
            save_bundle(exp_dir / "checkpoints" / trial / f"fold{fold}", model,
                        {"class_names": ["normal", "abnormal"], "positive_class": "abnormal",
                         "preprocess": {"image_size": 64, "input_size": 64, "mean": [0.5] * 3,
                                        "std": [0.5] * 3, "interpolation": "bicubic"}})
    default = export_model(exp_dir, root / "m_default")
    recall_first = export_model(exp_dir, root / "m_recall", select="recall@specificity>=0.8")
    return exp_dir, accurate, all_positive, default, recall_first


def test_the_reports_highlight_is_the_exported_model(exported):
    exp_dir, accurate, all_positive, default, recall_first = exported
    exp = load_experiment(exp_dir)
    meta = json.loads((default / "model.json").read_text())
    assert meta["selection"]["trial_id"] == select_best(exp)["trial_id"] == accurate
    summary = summary_table(exp)
    assert summary.loc[summary["best"], "trial_id"].item() == meta["selection"]["trial_id"]
    rmeta = json.loads((recall_first / "model.json").read_text())
    assert rmeta["selection"]["trial_id"] == select_best(exp, "recall@specificity>=0.8")["trial_id"]
    assert rmeta["selection"]["rule"] == "recall@specificity>=0.8"


def test_model_json_carries_the_exported_folds_own_metrics(exported):
    from sklearn.metrics import accuracy_score

    exp_dir, *_, default, _ = exported
    meta = json.loads((default / "model.json").read_text())
    trial, fold = meta["selection"]["trial_id"], meta["selection"]["fold"]
    p = pd.read_parquet(exp_dir / "predictions.parquet")
    g = p[(p["trial_id"].astype(str) == trial) & (p["fold"] == fold) & (p["split"] == "test")]
    labels = g["label"].map({"normal": 0, "abnormal": 1}) if g["label"].dtype == object else g["label"]
    assert meta["metrics"]["test"]["accuracy"] == pytest.approx(accuracy_score(labels, g["pred"]))
    assert meta["metrics"]["test"]["n"] == len(g)
    assert "trial_mean_test" in meta["metrics"] and "own predictions" in meta["metrics"]["note"]


def test_configurations_without_dropout_report_no_referral(tmp_path):
    exp_dir = fabricate_experiment(tmp_path / "e", seed=3)
    res = pd.read_csv(exp_dir / "results.csv", dtype={"trial_id": str})
    res["mc_dropout"] = res["head"] == "d"  # head a has no dropout
    res.to_csv(exp_dir / "results.csv", index=False)
    s = summary_table(load_experiment(exp_dir)).set_index("head")
    assert s.loc["a", ["referral_rate_mean", "accuracy_kept_mean"]].isna().all()
    assert NO_MC in s.loc["a", "notes"]
    assert s.loc["d", ["referral_rate_mean", "accuracy_kept_mean"]].notna().all()


def test_ties_prefer_a_configuration_that_can_refer(tmp_path):
    exp_dir = fabricate_experiment(tmp_path / "e", seed=3)

    def everything_right(p: pd.DataFrame) -> pd.DataFrame:
        p["pred"] = p["label"]
        return p

    rewrite_predictions(exp_dir, everything_right)
    res = pd.read_csv(exp_dir / "results.csv", dtype={"trial_id": str})
    res["mc_dropout"] = res["head"] == "d"
    res.to_csv(exp_dir / "results.csv", index=False)
    assert select_best(load_experiment(exp_dir), "accuracy")["head"] == "d"  # every accuracy is 1.0


def test_one_se_rule_prefers_the_simplest_configuration_within_one_standard_error(tmp_path):
    """Fold-paired differences: a probe within one SE of the best is chosen; a head better on
    every fold by more than one SE is chosen over the probe; among equals the lower score."""
    from raycyto.analysis.selection import one_se_choice

    exp = load_experiment(fabricate_experiment(tmp_path / "e", seed=3))
    rule = SelectionRule.parse("brier+1se")
    cand = pd.DataFrame({"trial_id": ["head", "probe", "deep"], "score": [0.30, 0.31, 0.305],
                         "baseline": [False, True, False], "finetune": ["frozen", "frozen", "full"],
                         "mc_dropout": [True, False, True], "val_loss": [0.5, 0.5, 0.5]})

    def folds(values: dict[str, list[float]]) -> pd.DataFrame:
        return pd.DataFrame([{"trial_id": t, "fold": k, "value": v, "floor": float("nan"), "loss": 0.0}
                             for t, vs in values.items() for k, v in enumerate(vs)])

    # the probe is worse on average by 0.01, but the fold differences scatter by ~0.03: noise
    exp.cache[("fold_scores", str(rule))] = folds({"head": [0.30, 0.28, 0.32, 0.29, 0.31],
                                                    "probe": [0.34, 0.27, 0.30, 0.33, 0.31],
                                                    "deep": [0.31, 0.29, 0.32, 0.30, 0.30]})
    assert one_se_choice(exp, rule, cand) == "probe"
    # the head beats the probe by 0.04 on every fold: beyond noise
    exp.cache[("fold_scores", str(rule))] = folds({"head": [0.30, 0.28, 0.32, 0.29, 0.31],
                                                    "probe": [0.34, 0.32, 0.36, 0.33, 0.35],
                                                    "deep": [0.50, 0.50, 0.50, 0.50, 0.50]})
    assert one_se_choice(exp, rule, cand) == "head"
    # a plain rule never picks the probe, the +1se one may
    assert not SelectionRule.parse("brier").one_se and SelectionRule.parse("brier+1se").one_se
