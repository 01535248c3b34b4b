"""Sources: image folder, folder with manifest, CSV manifest (relative paths, groups, URIs)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from raycyto.data.fixtures import write_image_folder
from raycyto.data.sources import read_source
from raycyto.errors import DataError


@pytest.fixture()
def folder(tmp_path) -> Path:
    root = tmp_path / "imgs"
    manifest = write_image_folder(root, classes=("b", "a", "c"), groups_per_class=2, per_group=2, size=16)
    manifest.unlink()  # a plain image folder
    (root / "a" / "nested").mkdir()
    (root / "a" / "g10_i0.png").rename(root / "a" / "nested" / "deep.png")
    (root / "a" / ".DS_Store").write_bytes(b"junk")
    (root / "README.txt").write_text("ignored: not inside a class folder")
    return root


def test_folder_source_lists_images_recursively_with_sorted_classes(folder):
    t = read_source(folder)
    assert t.class_names == ["a", "b", "c"]
    assert len(t.df) == 12
    assert set(t.df.columns) >= {"path", "label", "label_name", "group"}
    deep = t.df[t.df["path"].str.endswith("nested/deep.png")]
    assert len(deep) == 1 and deep["label_name"].item() == "a" and deep["label"].item() == 0
    assert all(Path(p).is_absolute() for p in t.df["path"])
    assert (t.df["group"] == t.df["path"]).all()  # no group info: each file its own group
    assert not t.df["path"].str.contains(".DS_Store").any()


def test_classes_selects_and_orders_a_subset(folder):
    t = read_source(folder, classes=["c", "a"])
    assert t.class_names == ["c", "a"]
    assert set(t.df["label_name"]) == {"c", "a"}
    assert (t.df.loc[t.df["label_name"] == "c", "label"] == 0).all()
    assert (t.df.loc[t.df["label_name"] == "a", "label"] == 1).all()
    with pytest.raises(DataError, match=r"\['zzz'\] not found"):
        read_source(folder, classes=["a", "zzz"])


def test_manifest_with_relative_paths_groups_and_metadata(tmp_path):
    root = tmp_path / "ds"
    write_image_folder(root, classes=("x", "y"), groups_per_class=3, per_group=2, size=16)
    df = pd.read_csv(root / "manifest.csv")
    df["scanner"] = "s1"
    sub = tmp_path / "lists"
    sub.mkdir()
    df["path"] = "../ds/" + df["path"]
    df.to_csv(sub / "train.csv", index=False)
    t = read_source(sub / "train.csv")
    assert len(t.df) == 12 and t.class_names == ["x", "y"]
    assert all(Path(p).is_file() for p in t.df["path"])  # resolved against the CSV's folder
    assert t.df["group"].nunique() == 6 and (t.df["scanner"] == "s1").all()
    # a folder holding manifest.csv uses the manifest (its groups), not the folder listing
    assert read_source(root).df["group"].nunique() == 6


def test_manifest_via_file_uri_and_absolute_paths(tmp_path):
    root = tmp_path / "ds"
    manifest = write_image_folder(root, classes=("x", "y"), groups_per_class=2, per_group=1, size=16)
    t = read_source(manifest.as_uri())
    assert len(t.df) == 4
    assert all(p.startswith("file://") for p in t.df["path"])
    df = pd.read_csv(manifest)
    df["path"] = [str(root / p) for p in df["path"]]
    df.drop(columns=["group"]).to_csv(tmp_path / "abs.csv", index=False)
    t2 = read_source(tmp_path / "abs.csv")
    assert list(t2.df["path"]) == list(df["path"]) and (t2.df["group"] == t2.df["path"]).all()


def test_manifest_missing_column_is_named(tmp_path):
    (tmp_path / "m.csv").write_text("file,label\na.png,x\n")
    with pytest.raises(DataError, match=r"m\.csv lacks the column 'path'"):
        read_source(tmp_path / "m.csv")
    (tmp_path / "n.csv").write_text("path,group\na.png,p1\n")
    with pytest.raises(DataError, match="lacks the column 'label'"):
        read_source(tmp_path / "n.csv")


def test_invalid_sources_raise_data_error_naming_the_source(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_source(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no images"):
        read_source(tmp_path / "empty")
    (tmp_path / "h.csv").write_text("path,label\n")
    with pytest.raises(DataError, match=r"h\.csv has no images"):
        read_source(tmp_path / "h.csv")
    (tmp_path / "d.csv").write_text("path,label\na.png,x\na.png,y\n")
    with pytest.raises(DataError, match="more than once"):
        read_source(tmp_path / "d.csv")


def test_files_next_to_a_manifest_but_not_in_it_are_reported_as_unlisted(tmp_path):
    from raycyto.data.sources import unlisted_files

    write_image_folder(tmp_path, classes=("x",), groups_per_class=2, per_group=1, size=8)
    (tmp_path / "x" / "stray.png").write_bytes(b"junk")
    t = read_source(tmp_path)
    assert len(t.df) == 2
    assert unlisted_files(tmp_path, t) == [str((tmp_path / "x" / "stray.png").resolve())]
    assert unlisted_files(tmp_path / "manifest.csv", t) == []
