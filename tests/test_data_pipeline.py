"""Ray Data pipeline: bad files become a report, bytes independent of workers and batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raycyto.data.augment import augment, image_key
from raycyto.data.decode import load_image
from raycyto.data.fixtures import plant_bad_files, write_image_folder
from raycyto.data.pipeline import image_dataset, load_arrays, split_errors
from raycyto.data.sources import read_source


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    """A manifest of 8 good images, planted bad files, unusual good files and a missing path."""
    root = tmp_path_factory.mktemp("dirty")
    manifest = write_image_folder(root, classes=("a", "b"), groups_per_class=2, per_group=2, size=20)
    bad, good = plant_bad_files(root / "a", size=20)
    df = pd.read_csv(manifest)
    extra = [{"path": str(Path(p).relative_to(root)), "label": "a", "group": Path(p).stem}
             for p in [*bad, *good]]
    extra.append({"path": "b/missing.png", "label": "b", "group": "lost"})
    pd.concat([df, pd.DataFrame(extra)]).to_csv(manifest, index=False)
    bad[str(root / "b" / "missing.png")] = "missing"
    good_paths = {str((root / p).resolve()) for p in df["path"]} | set(good)
    return read_source(root), bad, good_paths


def test_every_bad_kind_is_reported_with_path_and_reason_and_good_files_come_through(ray_local, dirty):
    table, bad, good = dirty
    ok, report = split_errors(image_dataset(table, 16, policy="karyogram", copies=2, seed=0))
    assert set(report["path"]) == set(bad)
    for path, reason in zip(report["path"], report["reason"]):
        assert reason.startswith(bad[path]), (path, reason)
    arrays = load_arrays(ok)
    assert set(arrays["path"]) == good  # 16-bit, gray, RGBA, TIFF, BMP included
    assert arrays["image"].shape == (2 * len(good), 16, 16, 3) and arrays["image"].dtype == np.uint8
    assert arrays["copy"].tolist() == [0, 1] * len(good)  # sorted by (path, copy)
    assert list(arrays["path"]) == sorted(arrays["path"])


def test_augmented_bytes_do_not_depend_on_batch_size_blocks_or_workers(ray_local, dirty):
    table, _, _ = dirty
    runs = [load_arrays(image_dataset(table, 16, policy="leukemia", copies=4, seed=5,
                                      batch_size=bs, num_blocks=nb, concurrency=cc))
            for bs, nb, cc in [(1, 1, 1), (7, 5, 2), (64, 3, 2)]]
    for other in runs[1:]:
        np.testing.assert_array_equal(runs[0]["path"], other["path"])
        np.testing.assert_array_equal(runs[0]["copy"], other["copy"])
        np.testing.assert_array_equal(runs[0]["image"], other["image"])
    # and equal to a plain in-process loop over the same functions
    i = 5
    path, copy = runs[0]["path"][i], int(runs[0]["copy"][i])
    image = load_image(path, 16)
    expected = augment(image, "leukemia", 5, image_key(image), copy)
    np.testing.assert_array_equal(runs[0]["image"][i], expected)


def test_rows_carry_labels_groups_and_copies(ray_local, tmp_path):
    write_image_folder(tmp_path, classes=("x", "y"), groups_per_class=2, per_group=2, size=12)
    table = read_source(tmp_path, classes=["y", "x"])
    arrays = load_arrays(image_dataset(table, 8, policy="none", copies=3))
    assert len(arrays["path"]) == 3 * len(table.df)
    by_path = table.df.set_index("path")
    assert (by_path.loc[arrays["path"], "label"].to_numpy() == arrays["label"]).all()
    assert (by_path.loc[arrays["path"], "group"].to_numpy() == arrays["group"]).all()
    assert set(arrays["label_name"][arrays["label"] == 0]) == {"y"}
    first = arrays["image"][arrays["copy"] == 0]
    np.testing.assert_array_equal(first, arrays["image"][arrays["copy"] == 2])  # policy none


def test_load_arrays_warns_and_leaves_out_error_rows(ray_local, dirty, caplog):
    table, bad, good = dirty
    with caplog.at_level("WARNING", logger="raycyto.data"):
        arrays = load_arrays(image_dataset(table, 8))
    assert set(arrays["path"]) == good
    assert f"{len(bad)} bad file(s)" in caplog.text


def test_split_errors_on_a_clean_source_gives_an_empty_report_with_its_columns(ray_local, tmp_path):
    write_image_folder(tmp_path, classes=("x", "y"), groups_per_class=2, per_group=1, size=12)
    ok, bad = split_errors(image_dataset(read_source(tmp_path), 8))
    assert list(bad.columns) == ["path", "reason"] and bad.empty
    assert ok.count() == 4


def test_augmented_copies_depend_on_image_content_not_on_where_the_dataset_lies(ray_local, tmp_path):
    """The same dataset in two folders gives the same copies (results must not depend on location)."""
    import shutil

    write_image_folder(tmp_path / "here", classes=("x", "y"), groups_per_class=2, per_group=1, size=16)
    shutil.copytree(tmp_path / "here", tmp_path / "there")
    here, there = (load_arrays(image_dataset(read_source(tmp_path / d), 16, policy="leukemia", copies=3, seed=1))
                   for d in ("here", "there"))
    np.testing.assert_array_equal(here["image"], there["image"])
    assert not np.array_equal(here["image"][here["copy"] == 1], here["image"][here["copy"] == 0])
