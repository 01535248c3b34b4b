"""Referral with a guarantee in the report and the export (raycyto.analysis.referral): conformal.csv,
thresholds.csv (learn-then-test per fold), strata.csv, the summary's AURC / temperature columns,
the headline, and the thresholds export stores; calibration never reads a test row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_analysis_fabricate import FIVE, fabricate_experiment, rewrite_predictions

from raycyto.analysis import load_experiment, write_report
from raycyto.analysis.load import ExperimentError, read_csv

SUBTYPES = ("trisomy21", "deletion", "translocation")


def _add_metadata(exp_dir: Path) -> None:
    """Manifest-like columns: subtype (abnormal cases: 3 kinds, normal: "normal"), a
    per-image karyotype string (high cardinality: skipped), a path-like column (skipped)."""
    def add(p: pd.DataFrame) -> pd.DataFrame:
        kinds = np.array(SUBTYPES)[p.groupby(["trial_id", "fold", "split"]).cumcount() % len(SUBTYPES)]
        subtype = np.where(p["label"] == 1, kinds, "normal")
        return p.assign(subtype=subtype, karyotype=[f"46,XY,k{i}" for i in range(len(p))],
                        source_file=[f"/scans/{i % 5}/x.tif" for i in range(len(p))])
    rewrite_predictions(exp_dir, add)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    exp = fabricate_experiment(tmp_path_factory.mktemp("ref") / "exp", seed=3, per_fold=30)
    _add_metadata(exp)
    return write_report(exp, target_recall=0.8)


def test_report_writes_the_new_tables_and_summary_columns(report):
    out = report.parent
    conformal = read_csv(out / "conformal.csv")
    for col in ("config", "level", "score", "coverage_mean", "coverage_std", "set_size_mean",
                "singleton_rate", "mondrian", "coverage_abnormal_mean", "on_target"):
        assert col in conformal, col
    assert set(conformal["level"]) == {0.9, 0.95} and set(conformal["score"]) == {"lac", "aps"}
    assert set(conformal["mondrian"]) == {True, False}
    summary = read_csv(out / "summary.csv")
    for col in ("aurc_mean", "aurc_std", "ece_mean", "ece_temp_mean", "temperature_mean",
                "set_coverage_mean", "set_size_mean", "risk_referral_rate_mean", "risk_met_folds"):
        assert col in summary, col
    assert summary["aurc_mean"].between(0, 1).all()
    thresholds = read_csv(out / "thresholds.csv")
    assert (thresholds["target"] == 0.8).all() and thresholds["exported"].sum() == 1
    assert len(thresholds) == len(summary) * 3            # one row per configuration and fold
    selective = read_csv(out / "selective.csv")
    assert {"MC vote confidence", "softmax", "temperature-scaled softmax",
            "conformal set size"} <= set(selective["score"])
    page = report.read_text()
    assert '<section class="headline">' in page and "Guarantee:" in page and "prediction set" in page
    assert page.index("Key figures") < page.index("comparison.png") < page.index("<h2>Tables</h2>")
    for png in ("risk_coverage.png", "conformal_coverage.png", "strata_subtype.png", "reliability.png"):
        assert (out / png).is_file() and png in page


def test_summary_aurc_and_temperature_are_recomputable_per_fold(report):
    from raycyto.referral.temperature import fit_temperature
    from raycyto.analysis.selective import aurc
    from raycyto.analysis.uncertainty import expected_calibration_error, top_label

    out = report.parent
    exp = load_experiment(out.parent)
    folds = read_csv(out / "folds.csv")
    row = folds.iloc[0]
    p = exp.predictions
    g = p[(p["trial_id"] == row["trial_id"]) & (p["fold"] == row["fold"])]
    val, test = g[g["split"] == "val"], g[g["split"] == "test"]
    fit = fit_temperature(val["label"].to_numpy(), probs=val[exp.prob_columns].to_numpy())
    assert row["temperature"] == pytest.approx(fit.temperature)
    scaled = fit.apply_probs(test[exp.prob_columns].to_numpy())
    assert row["ece_temp"] == pytest.approx(expected_calibration_error(*top_label(scaled, test["label"].to_numpy())))
    assert row["aurc"] == pytest.approx(aurc(test["mc_label"].to_numpy() == test["label"].to_numpy(),
                                             test["mc_confidence"].to_numpy()))
    summary = read_csv(out / "summary.csv").set_index("config")
    f = folds[folds["config"] == row["config"]]
    assert summary.loc[row["config"], "aurc_mean"] == pytest.approx(f["aurc"].mean())
    assert summary.loc[row["config"], "ece_temp_std"] == pytest.approx(f["ece_temp"].std())


def test_strata_csv_equals_a_pandas_groupby_recomputation(report):
    out = report.parent
    strata = read_csv(out / "strata.csv")
    assert set(strata["column"]) == {"subtype"}, "karyotype (per image) and path-like columns are skipped"
    exp = load_experiment(out.parent)
    sel = read_csv(out / "selection.csv")
    test = exp.test_predictions[exp.test_predictions["trial_id"].isin(sel["trial_id"])]
    per_fold = test.groupby(["trial_id", "subtype", "fold"]).apply(lambda g: pd.Series({
        "n": len(g), "accuracy": (g["pred"] == g["label"]).mean(),
        "recall": (g.loc[g["label"] == 1, "pred"] == 1).mean() if (g["label"] == 1).any() else np.nan,
        "referral_rate": g["refer"].mean()}), include_groups=False)
    expected = per_fold.groupby(["trial_id", "subtype"]).agg(
        n=("n", "sum"), accuracy_mean=("accuracy", "mean"), accuracy_std=("accuracy", "std"),
        recall_mean=("recall", "mean"), recall_std=("recall", "std"),
        referral_rate_mean=("referral_rate", "mean")).reset_index()
    got = strata.rename(columns={"value": "subtype"}).merge(expected, on=["trial_id", "subtype"],
                                                            suffixes=("", "_pd"))
    assert len(got) == len(expected) == len(strata) == len(sel) * (len(SUBTYPES) + 1)
    for col in ("n", "accuracy_mean", "accuracy_std", "recall_mean", "recall_std", "referral_rate_mean"):
        np.testing.assert_allclose(got[col].astype(float), got[f"{col}_pd"].astype(float), equal_nan=True,
                                   err_msg=col)
    normal = strata[strata["value"] == "normal"]
    assert normal["recall_mean"].isna().all()              # no positive case: no recall to speak of


def test_multiclass_report_has_sets_and_no_risk_rows_unless_a_target_is_given(tmp_path):
    exp = fabricate_experiment(tmp_path / "exp", classes=FIVE, positive=None, per_fold=20, samples=1, seed=8)
    html = write_report(exp, tmp_path / "out")
    assert not (tmp_path / "out" / "thresholds.csv").exists() and not (tmp_path / "out" / "strata.csv").exists()
    conformal = read_csv(tmp_path / "out" / "conformal.csv")
    assert {f"coverage_{c}_mean" for c in FIVE} <= set(conformal.columns)
    assert set(conformal["mondrian"]) == {True, False}   # marginal and per-class rows, 5 classes too
    write_report(exp, tmp_path / "out", target_recall=0.7)
    t = read_csv(tmp_path / "out" / "thresholds.csv")
    assert (t["certified"] == False).all() and t["method"].str.contains("no guarantee").all()  # noqa: E712
    assert "Guarantee:" in html.read_text()


def _fold_thresholds(exp_dir: Path, out: Path) -> pd.DataFrame:
    write_report(exp_dir, out, target_recall=0.7)
    t = read_csv(out / "thresholds.csv")[["trial_id", "fold", "threshold", "cal_referral_rate", "p_value",
                                          "certifiable_recall"]]
    c = read_csv(out / "conformal.csv")
    return t, c.sort_values(["trial_id", "mondrian", "score", "level"])["n_calibration_mean"].to_numpy()


def test_no_guarantee_is_calibrated_on_rows_that_chose_something(tmp_path):
    """Corrupt every validation row (the rows that stopped training, fitted the temperature and
    ranked the configurations): the sets and risk thresholds of thresholds.csv, conformal.csv
    and model.json stay exactly the same, and so do their test measurements."""
    from raycyto.referral.fit import calibrate_trial, mc_config

    exp_dir = fabricate_experiment(tmp_path / "exp", seed=5, per_fold=40)
    before = calibrate_trial(load_experiment(exp_dir), "1e000000", mc_config(load_experiment(exp_dir)), 1)
    t0, n0 = _fold_thresholds(exp_dir, tmp_path / "r0")
    cov0 = read_csv(tmp_path / "r0" / "conformal.csv")["coverage_mean"].to_numpy()
    rng = np.random.default_rng(0)

    def corrupt(p: pd.DataFrame) -> pd.DataFrame:
        test = p["split"] == "val"
        p = p.copy()
        p.loc[test, "label"] = rng.integers(0, 2, int(test.sum()))
        noise = rng.random((int(test.sum()), 2))
        noise /= noise.sum(1, keepdims=True)
        for cols in (["prob_normal", "prob_abnormal"], ["mc_mean_normal", "mc_mean_abnormal"]):
            p.loc[test, cols] = noise
        p.loc[test, "mc_confidence"] = rng.uniform(0.5, 1, int(test.sum()))
        return p

    rewrite_predictions(exp_dir, corrupt)
    after = calibrate_trial(load_experiment(exp_dir), "1e000000", mc_config(load_experiment(exp_dir)), 1)
    assert after.conformal.to_json() == before.conformal.to_json()
    assert after.risk.to_json() == before.risk.to_json() and after.n == before.n > 0
    assert after.temperature != before.temperature        # the temperature is fitted there, and only it
    t1, n1 = _fold_thresholds(exp_dir, tmp_path / "r1")
    pd.testing.assert_frame_equal(t0, t1)
    np.testing.assert_array_equal(n0, n1)
    np.testing.assert_allclose(cov0, read_csv(tmp_path / "r1" / "conformal.csv")["coverage_mean"].to_numpy())


def test_a_folds_measured_thresholds_never_read_its_own_test_rows(tmp_path):
    """Cross-fitting: corrupting fold 1's test rows changes fold 1's test measurements, not
    the thresholds it is measured with (the other folds' thresholds do change)."""
    exp_dir = fabricate_experiment(tmp_path / "exp", seed=5, per_fold=40)
    t0, _ = _fold_thresholds(exp_dir, tmp_path / "r0")
    rng = np.random.default_rng(0)

    def corrupt(p: pd.DataFrame) -> pd.DataFrame:
        own = (p["split"] == "test") & (p["fold"] == 1)
        p = p.copy()
        p.loc[own, "label"] = 1 - p.loc[own, "label"]
        p.loc[own, "mc_confidence"] = rng.uniform(0.5, 1, int(own.sum()))
        return p

    rewrite_predictions(exp_dir, corrupt)
    t1, _ = _fold_thresholds(exp_dir, tmp_path / "r1")
    f1 = (t0["fold"] == 1).to_numpy()
    pd.testing.assert_frame_equal(t0[f1], t1[f1])
    assert not np.allclose(t0[~f1]["p_value"], t1[~f1]["p_value"])


def test_a_large_easy_binary_task_certifies_a_threshold_that_holds_on_test(tmp_path):
    exp_dir = fabricate_experiment(tmp_path / "exp", seed=2, per_fold=400, samples=1, folds=2)

    def confident(p: pd.DataFrame) -> pd.DataFrame:   # right and unanimous cases are common
        rng = np.random.default_rng(1)
        right = p["mc_label"] == p["label"]
        conf = np.where(right & (rng.random(len(p)) < 0.7), 1.0, rng.choice([0.6, 0.7, 0.8, 0.9], len(p)))
        return p.assign(mc_confidence=conf, refer=conf < 0.8)

    rewrite_predictions(exp_dir, confident)
    write_report(exp_dir, tmp_path / "r", target_recall=0.85)
    t = read_csv(tmp_path / "r" / "thresholds.csv")
    assert t["certified"].all() and (t["cal_recall_kept"] >= 0.85).all()
    assert (t["certifiable_recall"] >= 0.85).all()
    assert (t["test_recall_kept"] >= 0.8).all()
    assert t["statement"].str.contains("with 90% confidence").all()


def test_bad_target_recall_is_a_named_error(tmp_path):
    exp = fabricate_experiment(tmp_path / "exp", folds=2, per_fold=6, samples=1)
    with pytest.raises(ExperimentError, match="target-recall"):
        write_report(exp, tmp_path / "r", target_recall=1.5)


# ------------------------------------------------------------------------ export


@pytest.fixture()
def fake_experiment(tmp_path):
    from raycyto.models.bundle import save_bundle
    from raycyto.models.classifier import build_classifier

    exp = fabricate_experiment(tmp_path / "exp", seed=11, per_fold=30)
    model = build_classifier("efficientnet_lite0", head="d", num_classes=2, pretrained=True)
    for trial in read_csv(exp / "results.csv")["trial_id"]:
        for k in range(3):
            save_bundle(exp / "checkpoints" / trial / f"fold{k}", model,
                        {"class_names": ["normal", "abnormal"], "positive_class": "abnormal"})
    return exp


def test_export_stores_the_reports_threshold_for_its_fold_and_overrides(fake_experiment, tmp_path):
    from raycyto.errors import ConfigError
    from raycyto.export.core import export_model

    write_report(fake_experiment, tmp_path / "r", target_recall=0.7)
    t = read_csv(tmp_path / "r" / "thresholds.csv")
    row = t[t["exported"]].iloc[0]
    doc = json.loads((export_model(fake_experiment, tmp_path / "m", target_recall=0.7, threshold=0.65,
                                   refer_rule="set") / "model.json").read_text())
    ref = doc["referral"]
    assert ref["calibrated_on"]["trial_id"] == row["trial_id"] and doc["selection"]["fold"] == row["fold"]
    assert ref["calibrated_on"]["split"] == "test" and ref["calibrated_on"]["folds"] == [0, 1, 2]
    preds = load_experiment(fake_experiment).test_predictions
    n_oof = int((preds["trial_id"] == row["trial_id"]).sum())
    # export calibrates on every fold's out-of-fold rows: the report's per-fold thresholds use one fold fewer
    assert ref["risk"]["guarantee"]["n"] == n_oof and row["cal_n"] < n_oof
    assert ref["risk"]["guarantee"]["target"] == 0.7 and "certifiable" in ref["risk"]
    assert ref["rule"] == "set" and doc["mc"]["threshold"] == 0.65
    assert ref["conformal"]["calibration"]["n_calibration"] == ref["calibrated_on"]["n"] == n_oof
    assert ref["conformal"]["calibration"]["mondrian"] and ref["conformal"]["calibration"]["randomized"]
    assert ref["conformal"]["calibration"]["source"].startswith("mc_mean")
    assert set(ref["temperature"]) >= {"temperature", "ece_before", "ece_after"}
    with pytest.raises(ConfigError, match="--refer-rule"):
        export_model(fake_experiment, tmp_path / "m2", refer_rule="bogus")
    with pytest.raises(ConfigError, match="--threshold"):
        export_model(fake_experiment, tmp_path / "m3", threshold=1.5)


def test_export_of_a_multiclass_task_refuses_the_risk_rule(tmp_path):
    from raycyto.errors import ConfigError
    from raycyto.models.bundle import save_bundle
    from raycyto.models.classifier import build_classifier
    from raycyto.export.core import export_model

    exp = fabricate_experiment(tmp_path / "exp", classes=FIVE, positive=None, per_fold=10, samples=1,
                               folds=2, seed=4)
    model = build_classifier("efficientnet_lite0", head="d", num_classes=5, pretrained=True)
    for trial in read_csv(exp / "results.csv")["trial_id"]:
        for k in range(2):
            save_bundle(exp / "checkpoints" / trial / f"fold{k}", model, {"class_names": list(FIVE)})
    with pytest.raises(ConfigError, match="binary"):
        export_model(exp, tmp_path / "m", refer_rule="risk")
    doc = json.loads((export_model(exp, tmp_path / "m") / "model.json").read_text())
    assert "risk" not in doc["referral"] and doc["referral"]["rule"] == "vote"
