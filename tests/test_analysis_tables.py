"""Tables on constructed experiments: every number equals scikit-learn's on predictions.parquet,
selection reads validation data only, and bad experiment directories fail with the file named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (accuracy_score, f1_score, precision_score, recall_score,
                             roc_auc_score)
from test_analysis_fabricate import FIVE, fabricate_experiment, rewrite_predictions

from raycyto.analysis import (ExperimentError, folds_table, hpo_table, load_experiment,
                              mispredictions_table, per_class_table, select_best,
                              selection_table, summary_table, threshold_for_recall)
from raycyto.analysis.load import read_csv

TOL = 1e-9


@pytest.fixture(scope="module")
def binary_exp(tmp_path_factory) -> Path:
    return fabricate_experiment(tmp_path_factory.mktemp("bin") / "exp", seed=1)


@pytest.fixture(scope="module")
def five_exp(tmp_path_factory) -> Path:
    return fabricate_experiment(tmp_path_factory.mktemp("five") / "exp", classes=FIVE,
                                positive=None, per_fold=15, seed=2)


def _sklearn_fold(g: pd.DataFrame, classes: list[str], pos: int | None) -> dict[str, float]:
    """The fold's metrics recomputed straight from predictions.parquet rows."""
    y, yp = g["label"].to_numpy(), g["pred"].to_numpy()
    probs = g[[f"prob_{c}" for c in classes]].to_numpy()
    if len(classes) == 2:
        yb, pb = y == pos, yp == pos
        out = {"precision": precision_score(yb, pb, zero_division=0),
               "recall": recall_score(yb, pb, zero_division=0),
               "f1": f1_score(yb, pb, zero_division=0),
               "auc": roc_auc_score(yb, probs[:, pos]) if 0 < yb.sum() < len(yb) else np.nan}
    else:
        labels = list(range(len(classes)))
        kw = dict(labels=labels, average="macro", zero_division=0)
        out = {"precision": precision_score(y, yp, **kw), "recall": recall_score(y, yp, **kw),
               "f1": f1_score(y, yp, **kw)}
        try:
            out["auc"] = roc_auc_score(y, probs, multi_class="ovr", labels=labels)
        except ValueError:
            out["auc"] = np.nan
    out["accuracy"] = accuracy_score(y, yp)
    per = {f"{m}_{c}": v for m, fn in (("precision", precision_score), ("recall", recall_score),
                                        ("f1", f1_score))
           for c, v in zip(classes, fn(y, yp, labels=list(range(len(classes))), average=None,
                                       zero_division=0))}
    out["referral_rate"] = g["refer"].mean()
    kept = ~g["refer"].to_numpy(bool)
    out["accuracy_kept"] = accuracy_score(y[kept], g["mc_label"].to_numpy()[kept]) if kept.any() else np.nan
    return {**out, **per}


def check_tables_against_sklearn(exp_dir: Path) -> None:
    """Every number in folds / summary / per_class equals scikit-learn's on predictions.parquet
    (1e-9), and summary / per_class mean ± std are those of the per-fold values."""
    meta = json.loads((exp_dir / "experiment.json").read_text())
    classes = meta["class_names"]
    pos = meta.get("positive_class")
    pos = classes.index(pos) if isinstance(pos, str) else pos
    preds = pd.read_parquet(exp_dir / "predictions.parquet")
    for col in ("label", "pred", "mc_label"):
        if preds[col].dtype == object:
            preds[col] = preds[col].map(classes.index)
    exp = load_experiment(exp_dir)
    folds = folds_table(exp)
    summary = summary_table(exp)
    per_class = per_class_table(exp)
    assert len(folds) and set(folds["trial_id"]) == set(summary["trial_id"])
    mc_dropout = exp.mc_dropout_mask
    for r in folds.itertuples(index=False):
        g = preds[(preds["trial_id"].astype(str) == r.trial_id) & (preds["fold"] == r.fold)
                  & (preds["split"] == "test")]
        assert r.n == len(g)
        expected = _sklearn_fold(g, classes, pos)
        if not mc_dropout[r.trial_id]:   # every pass agrees: referral figures are left empty
            expected.update(referral_rate=np.nan, accuracy_kept=np.nan)
        for m, v in expected.items():
            got = getattr(r, m) if hasattr(r, m) else folds.loc[
                (folds["config"] == r.config) & (folds["fold"] == r.fold), m].iloc[0]
            assert (np.isnan(v) and np.isnan(got)) or abs(got - v) <= TOL, (r.config, r.fold, m, got, v)
    for s in summary.itertuples(index=False):
        f = folds[folds["config"] == s.config]
        assert s.folds == len(f)
        for m in ("accuracy", "precision", "recall", "f1", "auc", "referral_rate", "accuracy_kept", "ece"):
            vals = f[m].dropna().to_numpy()
            if not len(vals):
                assert np.isnan(getattr(s, f"{m}_mean")), (s.config, m)
                continue
            assert abs(getattr(s, f"{m}_mean") - vals.mean()) <= TOL, (s.config, m)
            if len(vals) > 1:
                assert abs(getattr(s, f"{m}_std") - np.std(vals, ddof=1)) <= TOL, (s.config, m)
    for r in per_class.itertuples(index=False):
        f = folds[folds["config"] == r.config]
        for m in ("precision", "recall", "f1"):
            vals = f[f"{m}_{r[1]}"].to_numpy()
            assert abs(getattr(r, f"{m}_mean") - vals.mean()) <= TOL
            if len(vals) > 1:
                assert abs(getattr(r, f"{m}_std") - np.std(vals, ddof=1)) <= TOL


def test_binary_tables_equal_sklearn_on_the_predictions(binary_exp):
    check_tables_against_sklearn(binary_exp)


def test_five_class_tables_equal_sklearn_on_the_predictions(five_exp):
    check_tables_against_sklearn(five_exp)
    exp = load_experiment(five_exp)
    assert len(per_class_table(exp)) == 2 * 5      # two configurations x five classes
    assert select_best(exp)["select_metric"] == "brier+1se"   # DEFAULT_RULE, whatever the search metric
    assert select_best(exp, "val_accuracy")["select_metric"] == "accuracy"


def test_summary_has_one_row_per_configuration_using_its_best_validation_sample(binary_exp):
    exp = load_experiment(binary_exp)
    summary = summary_table(exp, "accuracy")
    assert len(summary) == len(exp.results.groupby(["backbone", "finetune", "head"]))
    hpo = hpo_table(exp, "accuracy")
    for s in summary.itertuples(index=False):
        cell = hpo[hpo["config"] == s.config]
        assert s.trial_id == cell.loc[cell["selection_score"].idxmax(), "trial_id"]
    assert not any(c.startswith("test_") for c in hpo.columns)   # hpo.csv is validation only
    assert summary["best"].sum() == 1
    assert summary.loc[summary["best"], "val_score"].iloc[0] == summary["val_score"].max()


def test_accuracy_selection_is_the_fold_mean_of_val_predictions(binary_exp):
    exp = load_experiment(binary_exp)
    scores = hpo_table(exp, "accuracy").set_index("trial_id")["selection_score"]
    val = exp.val_predictions
    for trial, g in val.groupby("trial_id"):
        per_fold = [accuracy_score(f["label"], f["pred"]) for _, f in g.groupby("fold")]
        assert scores[trial] == pytest.approx(np.mean(per_fold), abs=TOL)
    # results.csv val_accuracy was computed the same way by the fabricator
    assert np.allclose(scores.sort_index(), exp.results.set_index("trial_id")["val_accuracy"].sort_index())
    recall = hpo_table(exp, "recall").set_index("trial_id")["selection_score"]
    assert np.allclose(recall.sort_index(), exp.results.set_index("trial_id")["val_recall"].sort_index())


def test_selection_never_reads_test_metrics_or_predictions(tmp_path):
    exp_dir = fabricate_experiment(tmp_path / "e", seed=3)
    before = load_experiment(exp_dir)
    chosen = selection_table(before)
    loss_chosen = selection_table(before, "loss")
    summary_before = summary_table(before)
    selected = set(chosen["trial_id"])

    # Make every selected trial hopeless on test and every other trial perfect on test,
    # in predictions.parquet and in results.csv's test_ columns: a selector that peeks at
    # test data would now pick differently.
    def corrupt(p: pd.DataFrame) -> pd.DataFrame:
        test = p["split"] == "test"
        bad = test & p["trial_id"].isin(selected)
        good = test & ~p["trial_id"].isin(selected)
        wrong = 1 - p["label"]
        p.loc[bad, "pred"] = wrong[bad]
        p.loc[bad, "mc_label"] = wrong[bad]
        p.loc[bad, "prob_abnormal"] = np.where(wrong[bad] == 1, 0.99, 0.01)
        p.loc[good, "pred"] = p["label"][good]
        p.loc[good, "mc_label"] = p["label"][good]
        p.loc[good, "prob_abnormal"] = np.where(p["label"][good] == 1, 0.99, 0.01)
        p["prob_normal"] = 1 - p["prob_abnormal"]
        return p

    rewrite_predictions(exp_dir, corrupt)
    res = read_csv(exp_dir / "results.csv")
    for m in ("loss", "accuracy", "precision", "recall", "f1", "auc"):
        res[f"test_{m}"] = np.where(res["trial_id"].isin(selected), 0.0 if m != "loss" else 9.0,
                                    1.0 if m != "loss" else 0.0)
    res.to_csv(exp_dir / "results.csv", index=False)

    after = load_experiment(exp_dir)
    pd.testing.assert_frame_equal(selection_table(after), chosen)
    pd.testing.assert_frame_equal(selection_table(after, "loss"), loss_chosen)
    # ...while the test numbers did change (the corruption took effect)
    assert (summary_table(after)["recall_mean"] == 0).all()
    assert not np.allclose(summary_table(after)["recall_mean"], summary_before["recall_mean"])


def test_selection_follows_validation_predictions(tmp_path):
    """Make one non-selected trial perfect on validation: it must become its cell's choice."""
    exp_dir = fabricate_experiment(tmp_path / "e", seed=4)
    exp = load_experiment(exp_dir)
    target = hpo_table(exp, "accuracy").query("not selected")["trial_id"].iloc[0]

    def perfect_val(p: pd.DataFrame) -> pd.DataFrame:
        m = (p["split"] == "val") & (p["trial_id"] == target)
        p.loc[m, "pred"] = p.loc[m, "label"]
        return p

    rewrite_predictions(exp_dir, perfect_val)
    after = load_experiment(exp_dir)
    assert target in set(selection_table(after, "accuracy")["trial_id"])
    assert select_best(after, "accuracy")["trial_id"] == target


def test_perfect_classifier_experiment_gives_ones_and_zero_ece(tmp_path):
    exp = load_experiment(fabricate_experiment(tmp_path / "e", perfect=True))
    s = summary_table(exp)
    for m in ("accuracy", "precision", "recall", "f1", "auc", "accuracy_kept"):
        assert (s[f"{m}_mean"] == 1.0).all() and (s[f"{m}_std"] == 0.0).all(), m
    assert (s["ece_mean"] == 0.0).all() and (s["referral_rate_mean"] == 0.0).all()
    assert mispredictions_table(exp).empty


def test_single_class_test_fold_gives_nan_auc_with_a_note(tmp_path):
    exp_dir = fabricate_experiment(tmp_path / "e", seed=5)

    def one_class_fold(p: pd.DataFrame) -> pd.DataFrame:
        m = (p["split"] == "test") & (p["fold"] == 0)
        p.loc[m, "label"] = 1
        return p

    rewrite_predictions(exp_dir, one_class_fold)
    exp = load_experiment(exp_dir)
    folds = folds_table(exp)
    f0 = folds[folds["fold"] == 0]
    assert f0["auc"].isna().all() and f0["notes"].str.contains("AUC undefined").all()
    s = summary_table(exp)
    assert s["auc_mean"].notna().all()              # mean over the folds where AUC exists
    assert s["notes"].str.contains("fold 0: AUC undefined").all()


def test_mispredictions_list_wrong_mc_votes_with_mean_probability_and_confidence(binary_exp):
    exp = load_experiment(binary_exp)
    mis = mispredictions_table(exp)
    test = exp.test_predictions
    sel = selection_table(exp)
    expected = test[test["trial_id"].isin(sel["trial_id"]) & (test["mc_label"] != test["label"])]
    assert len(mis) == len(expected) > 0
    assert (mis["predicted_label"] != mis["actual_label"]).all()
    row = mis.iloc[0]
    src = test[(test["path"] == row["path"]) & (test["trial_id"] == row["trial_id"])].iloc[0]
    assert row["mean_probability"] == pytest.approx(src[f"mc_mean_{row['predicted_label']}"])
    assert row["mc_confidence"] == src["mc_confidence"]
    assert mis["mc_confidence"].iloc[0] == mis[mis["config"] == mis["config"].iloc[0]]["mc_confidence"].max()


def test_threshold_for_recall_is_chosen_on_validation_and_applied_to_test(binary_exp):
    exp = load_experiment(binary_exp)
    t = threshold_for_recall(exp, 0.8)
    assert len(t) == 2 and t["best"].sum() == 1
    for r in t.itertuples(index=False):
        val = exp.val_predictions[exp.val_predictions["trial_id"] == r.trial_id]
        if np.isnan(r.threshold):
            continue
        kept = val["mc_confidence"] >= r.threshold
        pos = val["label"] == 1
        recall = ((val["mc_label"] == 1) & pos & kept).sum() / (pos & kept).sum()
        assert recall >= 0.8 and r.val_recall_kept == pytest.approx(recall)
        assert r.val_referral_rate == pytest.approx(1 - kept.mean())
        lower = val["mc_confidence"][val["mc_confidence"] < r.threshold]
        for t_lower in lower.unique():               # no smaller operating point reaches 0.8
            k = val["mc_confidence"] >= t_lower
            assert ((val["mc_label"] == 1) & pos & k).sum() / (pos & k).sum() < 0.8
        test = exp.test_predictions[exp.test_predictions["trial_id"] == r.trial_id]
        assert r.test_referral_rate == pytest.approx((test["mc_confidence"] < r.threshold).mean())
    with pytest.raises(ExperimentError, match="target-recall"):
        threshold_for_recall(exp, 1.5)


@pytest.mark.parametrize("missing", ["experiment.json", "results.csv", "predictions.parquet",
                                     "config.yaml"])
def test_missing_file_error_names_the_file(tmp_path, missing):
    exp_dir = fabricate_experiment(tmp_path / "e", folds=2, per_fold=4, samples=1)
    (exp_dir / missing).unlink()
    with pytest.raises(ExperimentError, match=missing):
        load_experiment(exp_dir)


def test_missing_column_and_field_errors_name_them(tmp_path):
    exp_dir = fabricate_experiment(tmp_path / "e", folds=2, per_fold=4, samples=1)
    rewrite_predictions(exp_dir, lambda p: p.drop(columns=["prob_abnormal"]))
    with pytest.raises(ExperimentError, match=r"predictions\.parquet.*prob_abnormal"):
        load_experiment(exp_dir)
    exp_dir = fabricate_experiment(tmp_path / "f", folds=2, per_fold=4, samples=1)
    meta = json.loads((exp_dir / "experiment.json").read_text())
    del meta["positive_class"]
    (exp_dir / "experiment.json").write_text(json.dumps(meta))
    with pytest.raises(ExperimentError, match=r"experiment\.json.*positive_class"):
        load_experiment(exp_dir)
    res = read_csv(exp_dir / "results.csv").drop(columns=["batch_size"])
    meta["positive_class"] = "abnormal"
    (exp_dir / "experiment.json").write_text(json.dumps(meta))
    res.to_csv(exp_dir / "results.csv", index=False)
    with pytest.raises(ExperimentError, match=r"results\.csv.*batch_size"):
        load_experiment(exp_dir)


def test_labels_given_as_class_names_and_multi_row_group_files_load(tmp_path, capsys):
    exp_dir = fabricate_experiment(tmp_path / "e", folds=2, per_fold=6, row_group_size=7)
    classes = ["normal", "abnormal"]
    rewrite_predictions(exp_dir, lambda p: p.assign(mc_label=p["mc_label"].map(lambda i: classes[i])))
    exp = load_experiment(exp_dir, progress=True)
    assert exp.predictions["mc_label"].isin([0, 1]).all()
    assert len(summary_table(exp)) == 2


def test_failed_trials_are_never_selected(tmp_path):
    exp_dir = fabricate_experiment(tmp_path / "e", seed=6)
    exp = load_experiment(exp_dir)
    first = selection_table(exp)["trial_id"].iloc[0]
    res = read_csv(exp_dir / "results.csv")
    res.loc[res["trial_id"] == first, "status"] = "ERROR"
    res.to_csv(exp_dir / "results.csv", index=False)
    after = load_experiment(exp_dir)
    assert first not in set(selection_table(after)["trial_id"])
    assert np.isnan(hpo_table(after).set_index("trial_id").loc[first, "selection_score"])
