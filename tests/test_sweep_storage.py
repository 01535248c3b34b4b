"""Object storage (``storage: <URI>``): Tune state and every trial's fold files go to the URI.

A ``file://`` URI goes through the same pyarrow filesystem code as s3:// or gs://: trials
publish their fold files there (as trials on other cluster nodes must), the driver fetches
them into EXP_DIR, and EXP_DIR's own files are uploaded at the end.
"""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import tiny_sweep_config

from raycyto.analysis.load import read_csv


def test_sweep_with_uri_storage_publishes_fold_files_there_and_collects_them(ray_local, karyo_dir, tmp_path):
    from raycyto.config import load_config
    from raycyto.errors import RaycytoError
    from raycyto.tune.sweep import resume_sweep, run_sweep

    bucket = tmp_path / "bucket"
    cfg = load_config(tiny_sweep_config(karyo_dir, "bucket", size=32, storage=bucket.as_uri()))
    exp = run_sweep(cfg, out=tmp_path / "exp", progress=False)

    remote = bucket / "exp"
    tids = read_csv(exp / "results.csv")["trial_id"].tolist()
    assert len(tids) == 2 and "probe-efficientnet_lite0" in tids  # the trial and the baseline
    for tid in tids:
        for k in (0, 1):  # published where they ran (the final upload skips these folders)
            assert (remote / "predictions" / tid / f"fold{k}.parquet").is_file()
            assert (remote / "histories" / tid / f"fold{k}.csv").is_file()
            assert (remote / "checkpoints" / tid / f"fold{k}" / "model.json").is_file()
    assert not (exp / "tune").exists() and any((remote / "tune").iterdir())
    for name in ("results.csv", "predictions.parquet", "experiment.json", "config.yaml"):
        assert (remote / name).is_file(), name

    test = pd.read_parquet(exp / "predictions.parquet").query("split == 'test' and head == 'a'")
    manifest = pd.read_csv(karyo_dir / "manifest.csv")
    assert sorted(test["path"]) == sorted(str((karyo_dir / p).resolve()) for p in manifest["path"])

    with pytest.raises(RaycytoError, match="already holds a sweep"):  # Tune state found at the URI
        run_sweep(cfg, out=exp, progress=False)
    assert resume_sweep(exp, progress=False) == exp  # restores from the URI; nothing left to run
    assert len(pd.read_parquet(exp / "predictions.parquet")) == len(pd.read_parquet(remote / "predictions.parquet"))
