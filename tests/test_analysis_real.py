"""The report on a small real sweep (the ``tiny_experiment`` session fixture): numbers equal
scikit-learn's on its predictions.parquet, every image is a valid PNG, selection ignores test."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from test_analysis_report import check_report_images
from test_analysis_tables import check_tables_against_sklearn

from raycyto.analysis import (hpo_table, load_experiment, selection_table, summary_table,
                              write_report)
from raycyto.analysis.load import read_csv


def test_real_sweep_tables_equal_sklearn_on_its_predictions(tiny_experiment):
    check_tables_against_sklearn(Path(tiny_experiment))


def test_real_sweep_report_writes_valid_pngs_and_one_row_per_configuration(tiny_experiment, tmp_path):
    html = write_report(tiny_experiment, tmp_path / "report", target_recall=0.9)
    srcs = check_report_images(html)
    assert {"roc.png", "reliability.png", "referral.png", "training_curves.png"} <= set(srcs)
    exp = load_experiment(tiny_experiment)
    summary = summary_table(exp)
    assert len(summary) == exp.results.groupby(["backbone", "finetune", "head"]).ngroups
    assert len(hpo_table(exp)) == len(exp.results)
    assert summary["accuracy_mean"].between(0, 1).all()


def test_real_sweep_selection_ignores_corrupted_test_data(tiny_experiment, tmp_path):
    exp_dir = Path(shutil.copytree(tiny_experiment, tmp_path / "exp",
                                   ignore=shutil.ignore_patterns("checkpoints", "report")))
    chosen = selection_table(load_experiment(exp_dir))
    preds = pd.read_parquet(exp_dir / "predictions.parquet")
    test = preds["split"] == "test"
    rng = np.random.default_rng(0)
    preds.loc[test, "pred"] = rng.integers(0, 2, int(test.sum()))
    preds.to_parquet(exp_dir / "predictions.parquet", index=False)
    res = read_csv(exp_dir / "results.csv")
    for col in [c for c in res.columns if c.startswith("test_")]:
        res[col] = rng.random(len(res))
    res.to_csv(exp_dir / "results.csv", index=False)
    pd.testing.assert_frame_equal(selection_table(load_experiment(exp_dir)), chosen)
