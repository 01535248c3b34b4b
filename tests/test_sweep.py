"""End-to-end sweep on local Ray (the shared ``tiny_experiment``): outputs, leakage, search, retries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raycyto.tune.search import read_search_log
from raycyto.tune.trainable import read_events
from raycyto.analysis.load import read_csv

FOLDS = 3


@pytest.fixture(scope="module")
def exp(tiny_experiment) -> dict:
    d = Path(tiny_experiment)
    return {"dir": d, "results": read_csv(d / "results.csv"),
            "preds": pd.read_parquet(d / "predictions.parquet"),
            "meta": json.loads((d / "experiment.json").read_text())}


def _trained(res: pd.DataFrame) -> pd.DataFrame:
    return res[~res["baseline"].astype(bool)]


def test_every_grid_cell_times_fold_is_present(exp):
    from raycyto.tune.probe import PROBE_CS

    res, d = exp["results"], exp["dir"]
    trained = _trained(res)
    assert sorted(trained.groupby("head").size().items()) == [("a", 2), ("k", 2)]  # cells x samples
    probe = res[res["baseline"].astype(bool)]  # the linear probe: one row per backbone, beside them
    assert probe[["trial_id", "head", "mc_dropout"]].values.tolist() == [["probe-efficientnet_lite0", "probe", False]]
    assert trained.set_index("head")["mc_dropout"].to_dict() == {"a": False, "k": True}
    assert (res["status"] == "TERMINATED").all() and (res["folds_done"] == FOLDS).all()
    for tid, head in zip(res["trial_id"], res["head"]):
        for k in range(FOLDS):
            hist = read_csv(d / "histories" / tid / f"fold{k}.csv")
            assert {"epoch", "val_loss", "val_accuracy", "val_auc"} <= set(hist.columns)
            assert len(hist) == (len(PROBE_CS) if head == "probe" else 2)  # C values tried / epochs
            model = json.loads((d / "checkpoints" / tid / f"fold{k}" / "model.json").read_text())
            assert model["head"] == head and model["class_names"] == exp["meta"]["class_names"]
            used = json.loads((d / "histories" / tid / f"fold{k}_data.json").read_text())
            assert "ood.npz" in model["files"] and model["ood"]["false_alarm_rate"] == 0.05  # the fold's guard,
            assert model["ood"]["n_calibration"] == len(used["val"])  # thresholded on its validation images
            assert model["ood"]["n_train"] == used["train_rows"]
    assert set(exp["preds"].groupby(["trial_id", "fold"]).size().index) == {
        (t, k) for t in res["trial_id"] for k in range(FOLDS)}
    assert np.isfinite(res[["val_accuracy", "test_accuracy", "val_loss"]].to_numpy()).all()
    assert exp["preds"]["subtype"].notna().all()  # manifest metadata travels with every prediction


def test_predictions_cover_every_test_image_exactly_once_per_trial(exp):
    preds, meta = exp["preds"], exp["meta"]
    all_paths = sorted(p for f in meta["data"]["folds"] for p in f["test"])
    assert len(all_paths) == meta["data"]["n_images"] == len(set(all_paths))
    test = preds[preds["split"] == "test"]
    for tid, rows in test.groupby("trial_id"):
        assert sorted(rows["path"]) == all_paths, tid
    probs = test[[c for c in test.columns if c.startswith("prob_")]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert test["mc_confidence"].between(0, 1).all() and set(test["split"]) == {"test"}


def test_no_test_image_or_group_in_its_trials_training_or_validation_data(exp, karyo_dir):
    d, res = exp["dir"], exp["results"]
    manifest = pd.read_csv(Path(karyo_dir) / "manifest.csv")
    group_of = {str((Path(karyo_dir) / p).resolve()): g for p, g in zip(manifest["path"], manifest["group"])}
    group_of.update({str(Path(karyo_dir) / p): g for p, g in zip(manifest["path"], manifest["group"])})
    for tid in res["trial_id"]:
        for k in range(FOLDS):
            used = json.loads((d / "histories" / tid / f"fold{k}_data.json").read_text())
            test, seen = set(used["test"]), set(used["train"]) | set(used["val"])
            assert test and used["train"] and used["val"] and not test & seen
            assert not {group_of[p] for p in test} & {group_of[p] for p in seen}
            assert used["train_rows"] == 2 * len(used["train"])  # every copy trains, copy 0 validates
            rows = exp["preds"][(exp["preds"]["trial_id"] == tid) & (exp["preds"]["fold"] == k)]
            assert set(rows.loc[rows["split"] == "test", "path"]) == test
            assert set(rows.loc[rows["split"] == "val", "path"]) == set(used["val"])


def test_searcher_learns_from_fold_averaged_validation_metric(exp):
    d, res = exp["dir"], exp["results"]
    log = [r for r in read_search_log(d / "search_log.jsonl") if not r["error"]]
    assert sorted(r["trial_id"] for r in log) == sorted(_trained(res)["trial_id"])
    for row in log:
        per_fold = []
        for k in range(FOLDS):
            hist = read_csv(d / "histories" / row["trial_id"] / f"fold{k}.csv")
            per_fold.append(hist["val_accuracy"].max())  # the best epoch's validation accuracy
        assert row["metric"] == "val_accuracy"
        assert row["value"] == pytest.approx(np.mean(per_fold), abs=1e-9)
    cells = {r["cell"] for r in log}
    assert cells == {0, 1}  # one sub-searcher per (backbone, finetune, head) cell


def test_trial_that_raises_once_is_retried_from_its_checkpoint_and_finishes(exp):
    d = exp["dir"]
    marker = d.parent / "fail_once.marker"
    failed = marker.read_text().strip()
    events = read_events(d, failed)
    starts = [e for e in events if e["event"] == "start"]
    assert len(starts) == 2 and starts[1]["restored_folds"] == [0]
    assert sorted(e["fold"] for e in events if e["event"] == "fold_done") == list(range(FOLDS))
    row = exp["results"].set_index("trial_id").loc[failed]
    assert row["status"] == "TERMINATED" and row["folds_done"] == FOLDS
    # the restart is on record: results.csv's restarts column and experiment.json's restarts
    assert row["restarts"] == 1 and _trained(exp["results"])["restarts"].sum() == 1
    assert json.loads((d / "experiment.json").read_text())["restarts"] == {failed: 1}
    nodes = _trained(exp["results"])["node_id"]  # which node ran each trial: the one local node
    assert nodes.nunique() == 1 and len(nodes.iloc[0]) == 56 and row["node_id"] == starts[1]["node_id"]
    for tid in set(_trained(exp["results"])["trial_id"]) - {failed}:
        assert sum(e["event"] == "start" for e in read_events(d, tid)) == 1


def test_a_sweep_whose_every_trial_failed_is_an_error(exp, tmp_path):
    from raycyto.errors import RaycytoError
    from raycyto.tune.sweep import check_finished

    check_finished(exp["dir"])  # trials finished: no error
    res = exp["results"].copy()
    trained = ~res["baseline"].astype(bool)
    res["error"] = res["error"].astype(object)
    res.loc[trained, "status"] = "ERROR"
    res.loc[trained, "error"] = "Traceback (most recent call last):\nRuntimeError: CUDA out of memory"
    res.to_csv(tmp_path / "results.csv", index=False)
    with pytest.raises(RaycytoError, match=r"none of the \d+ trials finished; trial \w+: RuntimeError: CUDA out of memory"):
        check_finished(tmp_path)
