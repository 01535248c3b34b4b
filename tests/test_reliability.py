"""Reliability: a stream with corrupt files of every kind loses nothing and reports exactly them.

The 10,000-image version is benchmarks/corrupt_stream.py; this is its CI-sized twin.
"""

from __future__ import annotations

from pathlib import Path

from raycyto.analysis.load import read_csv


def test_mixed_stream_reports_exactly_the_planted_bad_files_and_processes_the_rest(ray_local, tmp_path):
    from raycyto.data.fixtures import planted_stream
    from raycyto.data.pipeline import image_dataset, split_errors
    from raycyto.data.sources import read_source

    n = 400
    manifest, planted = planted_stream(tmp_path, n, corrupt_fraction=0.04, size=24, seed=3)
    kinds = {Path(p).name.split("_", 1)[1] for p in planted}  # "00012_bad_truncated.jpg" -> kind
    assert len(kinds) == 8, f"every bad kind (7 byte kinds + missing) must be planted, got {kinds}"
    ok, bad = split_errors(image_dataset(read_source(manifest), image_size=24, policy="karyogram",
                                         copies=2, seed=0))
    assert set(bad["path"]) == set(planted)
    for path, reason in zip(bad["path"], bad["reason"]):
        assert reason.startswith(planted[path]), (path, reason, planted[path])
    good_rows = ok.to_pandas()
    assert len(good_rows) == 2 * (n - len(planted))
    assert not set(good_rows["path"]) & set(planted)


def _keyed_predictions(exp_dir: Path, data_dir: Path):
    """predictions.parquet keyed by what is stable across runs: trial ids (random per run)
    become the trial's (lr, batch size) and image paths become relative to the data folder."""
    import pandas as pd

    results = read_csv(exp_dir / "results.csv")[["trial_id", "lr", "batch_size"]]
    preds = pd.read_parquet(exp_dir / "predictions.parquet").merge(results, on="trial_id")
    preds["path"] = [str(Path(p).relative_to(data_dir.resolve())) for p in preds["path"]]
    keys = ["backbone", "finetune", "head", "lr", "batch_size", "fold", "split", "path"]
    return preds.drop(columns="trial_id").sort_values(keys).reset_index(drop=True)


def test_same_config_and_seed_give_identical_predictions_from_a_moved_copy_and_a_retried_trial(
        ray_local, tiny_experiment, karyo_dir, tmp_path):
    """tiny_experiment had one trial fail and resume from its checkpoint; a clean rerun on a copy
    of its data in another folder must give the same numbers (nothing may key on location)."""
    import shutil

    import pandas as pd

    from raycyto.config import load_config
    from raycyto.tune.sweep import run_sweep

    moved = tmp_path / "moved_data"
    shutil.copytree(karyo_dir, moved)
    cfg = load_config(tiny_experiment / "config.yaml").replace(**{"data.source": str(moved)})
    again = run_sweep(cfg, out=tmp_path / "again", progress=False)
    first, second = _keyed_predictions(tiny_experiment, karyo_dir), _keyed_predictions(again, moved)
    assert len(first) > 0 and len(first) == len(second)
    pd.testing.assert_frame_equal(first, second, check_exact=True)


def test_sweep_data_step_reports_unreadable_images_and_goes_on_without_them(ray_local, karyo_dir, tmp_path):
    import shutil

    import pandas as pd

    from raycyto.config import load_config
    from raycyto.tune.sweep import prepare_data

    data = tmp_path / "data"
    shutil.copytree(karyo_dir, data)
    listed = pd.read_csv(data / "manifest.csv")["path"].tolist()
    (data / listed[0]).write_bytes(b"")                                     # empty
    (data / listed[1]).write_bytes((data / listed[1]).read_bytes()[:200])   # truncated
    cfg = load_config({"data": {"source": str(data), "positive_class": "abnormal", "image_size": 32}})
    table, bad = prepare_data(cfg, tmp_path / "exp", progress=False)
    expected = {str((data / p).resolve()) for p in listed[:2]}
    assert set(bad["path"]) == expected
    assert {r.split(" ")[0] for r in bad["reason"]} == {"empty", "truncated"}
    assert len(table.df) == len(listed) - 2 and not set(table.df["path"]) & expected
