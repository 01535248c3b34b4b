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
    write_image_folder(tmp_path / "few", groups_per_class=1, per_group=1, size=8)
    res = _inspect(str(tmp_path / "few"), "--folds", "5", "--image-size", "8")
    assert res.exit_code == 2 and "only 2 groups for 5 folds" in res.output
