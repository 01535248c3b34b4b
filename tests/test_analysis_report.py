"""write_report / `raycyto report` on constructed experiments: every file, every image valid,
best rows highlighted, clean CLI errors."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from test_analysis_fabricate import FIVE, fabricate_experiment
from typer.testing import CliRunner

from raycyto.analysis import write_report
from raycyto.cli import app
from raycyto.analysis.load import read_csv

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TABLES = ("summary", "per_class", "folds", "hpo", "mispredictions", "selection")
FIGURES = ("confusion_all", "confusion_fold0", "roc", "training_curves", "hpo_scatter",
           "reliability", "referral", "comparison")


def check_report_images(html_path: Path) -> list[str]:
    """Every <img src> in report.html exists beside it and is a decodable PNG; returns the srcs."""
    srcs = re.findall(r'<img src="([^"]+)"', html_path.read_text())
    assert srcs, "report.html references no image"
    for src in srcs:
        png = html_path.parent / src
        assert png.is_file(), f"{src} referenced but missing"
        assert png.read_bytes()[:8] == PNG_SIGNATURE, f"{src} is not a PNG"
        with Image.open(png) as im:
            im.load()
            assert im.width > 50 and im.height > 50
    return srcs


@pytest.fixture(scope="module")
def binary_report(tmp_path_factory) -> Path:
    exp = fabricate_experiment(tmp_path_factory.mktemp("rb") / "exp", seed=7)
    return write_report(exp, target_recall=0.8)


def test_binary_report_writes_every_table_figure_and_page(binary_report):
    out = binary_report.parent
    assert binary_report.name == "report.html" and out.name == "report"
    for name in (*TABLES, "thresholds"):
        assert not pd.read_csv(out / f"{name}.csv").empty, name
    srcs = check_report_images(binary_report)
    assert {f"{f}.png" for f in FIGURES} <= set(srcs)
    assert {"confusion_fold1.png", "confusion_fold2.png"} <= set(srcs)


def test_report_html_highlights_the_validation_selected_row_and_shows_config_and_data(binary_report):
    page = binary_report.read_text()
    summary = read_csv(binary_report.parent / "summary.csv")
    best = summary.loc[summary["best"], "config"].iloc[0]
    # tables are folded <details>, titled by their <summary>
    sections = {s.split("</summary>")[0]: s.split("</details>")[0]
                for s in page.split("<details><summary>")[1:]}
    summary_html = next(v for k, v in sections.items() if k.startswith("summary"))
    highlighted = re.findall(r'<tr class="best">(.*?)</tr>', summary_html)
    assert len(highlighted) == 1 and best in highlighted[0]
    assert page.index('<section class="headline">') < page.index("Key figures") < page.index(summary_html)
    hpo_html = next(v for k, v in sections.items() if k.startswith("search samples"))
    assert len(re.findall(r'<tr class="best">', hpo_html)) == len(summary)   # one per cell
    assert "name: fabricated" in page                     # config.yaml
    assert "/data/normal/broken.png" in page              # bad files from experiment.json
    assert "class counts" in page and "folds (images per split)" in page


def test_five_class_report_has_one_vs_rest_roc_and_per_class_rows(tmp_path):
    exp = fabricate_experiment(tmp_path / "exp", classes=FIVE, positive=None, per_fold=10,
                               samples=1, seed=8)
    html = write_report(exp, tmp_path / "out", select="accuracy")
    check_report_images(html)
    per_class = pd.read_csv(tmp_path / "out" / "per_class.csv")
    assert sorted(per_class["class"].unique()) == sorted(FIVE)
    assert "one-vs-rest" in html.read_text()
    assert (read_csv(tmp_path / "out" / "summary.csv")["select_metric"] == "accuracy").all()


def test_cli_report_writes_the_page(tmp_path):
    exp = fabricate_experiment(tmp_path / "exp", folds=2, per_fold=6, samples=1, seed=9)
    result = CliRunner().invoke(app, ["report", str(exp), "--out", str(tmp_path / "r"),
                                      "--select", "f1", "--target-recall", "0.9", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "report.html").is_file() and (tmp_path / "r" / "thresholds.csv").is_file()


def test_cli_on_a_folder_that_is_not_an_experiment_exits_2_naming_the_missing_file(tmp_path):
    (tmp_path / "config.yaml").write_text("name: x\n")
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "experiment.json" in result.output and "predictions.parquet" in result.output
    assert "Traceback" not in result.output


def test_cli_unknown_select_metric_exits_2_listing_the_choices(tmp_path):
    exp = fabricate_experiment(tmp_path / "exp", folds=2, per_fold=4, samples=1)
    result = CliRunner().invoke(app, ["report", str(exp), "--select", "bogus", "--quiet"])
    assert result.exit_code == 2 and "bogus" in result.output and "recall" in result.output


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed (check tool)")
def test_report_loads_every_image_in_headless_chromium(binary_report, tmp_path):
    shot = tmp_path / "report.png"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "check_report_html.sh"),
                           str(binary_report), str(shot)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "broken=0" in proc.stdout and shot.read_bytes()[:8] == PNG_SIGNATURE


def test_referral_of_a_dropout_free_best_is_joined_by_the_best_configuration_whose_passes_vary(tmp_path):
    """A best configuration without dropout has confidence 1 everywhere (a one-point referral
    curve); the report then also draws the best configuration whose MC passes vary."""
    from test_analysis_fabricate import rewrite_predictions

    from raycyto.analysis import load_experiment, select_best

    exp_dir = fabricate_experiment(tmp_path / "exp")
    html = write_report(exp_dir, tmp_path / "varying")
    assert not (html.parent / "referral_mc.png").exists(), "best already varies: no second curve"

    best = select_best(load_experiment(exp_dir), None)["trial_id"]
    rewrite_predictions(exp_dir, lambda p: p.assign(
        mc_confidence=p["mc_confidence"].where(p["trial_id"] != best, 1.0),
        refer=p["refer"].where(p["trial_id"] != best, False)))
    html = write_report(exp_dir, tmp_path / "constant")
    assert (html.parent / "referral_mc.png").is_file()
    assert "referral_mc.png" in check_report_images(html)
