"""`raycyto data inspect`: lists every bad file, prints the fold table, exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from raycyto.cli import app
from raycyto.data.fixtures import plant_bad_files, write_image_folder

runner = CliRunner()


def _inspect(*args: str):
    return runner.invoke(app, ["data", "inspect", *args], env={"COLUMNS": "250"})


@pytest.fixture()
def planted(tmp_path):
    """A manifest folder whose manifest also lists planted bad files and a missing one."""
    root = tmp_path / "d"
    manifest = write_image_folder(root, classes=("normal", "abnormal"), groups_per_class=3, per_group=2, size=16)
    bad, good = plant_bad_files(root / "normal", size=16)
    rows = [f"{Path(p).relative_to(root)},normal,{Path(p).stem}" for p in [*bad, *good]]
    rows.append("abnormal/lost.png,abnormal,lost")
    with manifest.open("a") as f:
        f.write("\n".join(rows) + "\n")
    bad[str(root / "abnormal" / "lost.png")] = "missing"
    return root, bad, good


def test_inspect_lists_every_bad_file_and_the_fold_table_and_exits_zero(ray_local, planted):
    root, bad, good = planted
    res = _inspect(str(root), "--folds", "3", "--image-size", "16", "--policy", "karyogram", "--copies", "2")
    assert res.exit_code == 0, res.output
    out = res.output
    assert f"bad files ({len(bad)}" in out
    for path, reason in bad.items():
        line = next((ln for ln in out.splitlines() if path in ln), None)
        assert line is not None, f"{path} not reported"
        assert reason in line
    n_good = 12 + len(good)
    assert f"decoded {n_good}/{n_good + len(bad)} images -> {2 * n_good} rows" in out
    assert "readable images per fold" in out
    cells = [[c.strip() for c in ln.split("│")[1:-1]] for ln in out.splitlines() if "│" in ln]
    pairs = {tuple(c[:2]) for c in cells if len(c) >= 2}
    assert {(str(f), s) for f in range(3) for s in ("train", "val", "test")} <= pairs


def test_inspect_exits_one_when_nothing_is_readable(ray_local, tmp_path):
    plant_bad_files(tmp_path / "x")
    for p in (tmp_path / "x").glob("good_*"):
        p.unlink()
    res = _inspect(str(tmp_path), "--folds", "2", "--image-size", "8")
    assert res.exit_code == 1
    assert "no readable image" in res.output


def test_inspect_exits_two_on_an_invalid_source_or_fold_setting(ray_local, tmp_path):
    res = _inspect(str(tmp_path / "nope"))
    assert res.exit_code == 2 and "does not exist" in res.output
    (tmp_path / "m.csv").write_text("path\na.png\n")
    res = _inspect(str(tmp_path / "m.csv"))
    assert res.exit_code == 2 and "lacks the column 'label'" in res.output
    write_image_folder(tmp_path / "few", groups_per_class=2, per_group=2, size=8)
    res = _inspect(str(tmp_path / "few"), "--folds", "5", "--image-size", "8")
    assert res.exit_code == 2 and "Traceback" not in res.output
    flat = " ".join(res.output.split())
    assert "--folds / cv.folds=5: class 'a' has only 2 group(s)" in flat
    res = _inspect(str(tmp_path / "few"), "--set", "cv.fold=2")  # a bad override names the field
    assert res.exit_code == 2 and "cv.fold" in res.output and "unknown field" in res.output


def test_inspect_takes_config_and_set_overrides(ray_local, tmp_path):
    write_image_folder(tmp_path / "d", groups_per_class=4, per_group=1, size=8)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {image_size: 8, policy: karyogram, copies: 3}\ncv: {folds: 5}\n")
    res = _inspect(str(tmp_path / "d"), "--config", str(cfg), "--set", "cv.folds=2")
    assert res.exit_code == 0, res.output
    assert "-> 24 rows (policy karyogram, 3 copies, 8px)" in res.output  # from the config
    cells = [[c.strip() for c in ln.split("│")[1:-1]] for ln in res.output.splitlines() if "│" in ln]
    assert {c[0] for c in cells if len(c) > 1 and c[1] == "test"} == {"0", "1"}  # --set: 2 folds


def test_inspect_warns_about_missing_groups_and_near_duplicates_across_folds(ray_local, tmp_path):
    import shutil

    import cv2
    import numpy as np

    root = tmp_path / "photos"
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i in range(6):
            rng = np.random.default_rng(100 * (label == "dog") + i)
            img = cv2.resize(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), (64, 64), interpolation=cv2.INTER_CUBIC)
            cv2.imwrite(str(root / label / f"{i}.png"), img)
    # the same photograph saved again as JPEG under another name: two "patients" in a plain folder
    shutil.copy(root / "cat" / "0.png", root / "cat" / "copy.png")
    cv2.imwrite(str(root / "cat" / "copy.jpg"), cv2.imread(str(root / "cat" / "0.png")), [cv2.IMWRITE_JPEG_QUALITY, 80])
    res = _inspect(str(root), "--folds", "2", "--image-size", "64")
    assert res.exit_code == 0, res.output
    flat = " ".join(res.output.split())
    assert "no group given: each image counts as its own patient" in flat
    listed = [ln for ln in res.output.splitlines() if "copy." in ln and "0.png" in ln]
    assert "near-duplicate image pair(s) in different groups straddle folds" in flat and listed
