"""The karyogram layout travels with the model (issue 22): ``raycyto export`` stores it in the
bundle (the built-in one for raycyto.synth karyograms, a lab's own with ``--layout``, none
otherwise), ``LoadedModel`` reads it back, and ``raycyto predict`` names the chromosome: a real
sweep of the spatial head on 47,+21 and 46 karyograms, exported with a layout file, names
chromosome 21 first for a new 47,+21 karyogram; without a layout the answer carries the map only."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from raycyto.cli import app
from raycyto.config import load_config
from raycyto.errors import ConfigError, WeightsError
from raycyto.evidence.layout import (LAYOUT_FILE, builtin_layout, bundle_layout, config_layout, karyogram_layout,
                                     synthetic_task, write_to_bundle)

SIZE = 416
EPOCHS = 60
LR = [5e-3, 1e-2]


def _layout_csv(path: Path) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["name", "x0", "y0", "x1", "y1"])
        w.writerows([name, *box] for name, box in karyogram_layout().boxes.items())
    return path


def test_builtin_layout_only_for_raycyto_synth_karyograms(karyo_dir, leuk_dir, tmp_path):
    assert synthetic_task({"data": {"source": str(karyo_dir)}}) == "karyogram"  # its synth.json
    assert builtin_layout({"data": {"source": str(karyo_dir)}}).source == "builtin:karyogram"
    assert builtin_layout({"data": {"source": "synthetic", "synthetic": {"task": "karyogram"}}}) is not None
    for cfg in ({"data": {"source": str(leuk_dir)}},  # synthetic smears
                {"data": {"source": "synthetic", "synthetic": {"task": "leukemia"}}},
                {"data": {"source": str(tmp_path), "synthetic": {"task": "karyogram"}}},  # a lab's folder
                {"data": {"source": "s3://bucket/karyo"}}, {}):
        assert builtin_layout(cfg) is None
    user = config_layout({"data": {"source": str(leuk_dir)}}, _layout_csv(tmp_path / "mine.csv"))
    assert user.names == karyogram_layout().names and user.source.endswith("mine.csv")
    for name, box in karyogram_layout().boxes.items():
        assert user.boxes[name] == pytest.approx(box)
    (tmp_path / "bad.json").write_text('{"boxes": {"21": [0.5, 0.5, 0.4, 0.6]}}')
    with pytest.raises(ConfigError, match="x0 < x1") as e:
        config_layout({}, tmp_path / "bad.json")
    assert e.value.field == "--layout"


def test_data_layout_names_chromosomes_unless_a_layout_file_is_given(karyo_dir, tmp_path):
    """data.layout (set once in the sweep config) beats the built-in layout; a file given to
    report/export beats data.layout; a bad one is refused naming the field that gave it."""
    lab = _layout_csv(tmp_path / "lab.csv")
    (tmp_path / "one.json").write_text('{"boxes": {"21": [0.1, 0.1, 0.2, 0.2]}}')
    cfg = {"data": {"source": str(karyo_dir), "layout": str(lab)}}
    assert config_layout(cfg).source == str(lab)  # not builtin:karyogram
    assert config_layout(cfg, tmp_path / "one.json").names == ["21"]
    cfg["data"]["layout"] = str(tmp_path / "missing.csv")
    with pytest.raises(ConfigError, match="cannot read layout file") as e:
        config_layout(cfg)
    assert e.value.field == "data.layout"
    assert load_config({"data": {"layout": str(lab)}}).data.layout == str(lab)
    with pytest.raises(ConfigError) as e:
        load_config({"data": {"layout": " "}})
    assert e.value.field == "data.layout"


def test_bundle_layout_is_read_back_checksummed_and_served(serve_bundle, tmp_path):
    from raycyto.serve.predict import LocalPredictor
    from raycyto.synth import karyogram
    from raycyto.synth.base import image_rng, patient_rng

    bare, with_layout = tmp_path / "bare", tmp_path / "with"
    shutil.copytree(serve_bundle, bare)
    shutil.copytree(serve_bundle, with_layout)
    write_to_bundle(with_layout, karyogram_layout())
    meta = json.loads((with_layout / "model.json").read_text())
    assert LAYOUT_FILE in meta["files"] and bundle_layout(with_layout, meta).names == karyogram_layout().names
    patient = karyogram.make_karyotype("trisomy21", patient_rng(0, 0))
    image = karyogram.render(patient, image_rng(0, 0, 0), 128)
    named = LocalPredictor(with_layout).predict_image(image, passes=3, explain=True)  # head d: Grad-CAM
    assert [set(e) for e in named["evidence"]] == [{"chromosome", "score"}] * 3
    assert named["overlay_png"] and named["evidence_map"]["method"] == "gradcam"
    plain = LocalPredictor(bare).predict_image(image, passes=3, explain=True)
    assert "evidence" not in plain and plain["evidence_map"]["share"]  # no layout: the map only
    (with_layout / LAYOUT_FILE).write_text((with_layout / LAYOUT_FILE).read_text().replace("0.", "0.0", 1))
    with pytest.raises(WeightsError, match="SHA-256 mismatch"):
        LocalPredictor(with_layout)


def test_export_stores_the_builtin_layout_or_the_given_one(tmp_path, karyo_dir, leuk_dir):
    from test_analysis_fabricate import fabricate_experiment

    from raycyto.analysis.load import read_csv
    from raycyto.export.core import export_model
    from raycyto.models.bundle import save_bundle
    from raycyto.models.classifier import build_classifier

    model = build_classifier("efficientnet_lite0", head="d", num_classes=2, pretrained=True)
    exp = fabricate_experiment(tmp_path / "exp", folds=2, per_fold=6)
    for trial in read_csv(exp / "results.csv")["trial_id"]:
        for k in range(2):
            save_bundle(exp / "checkpoints" / str(trial) / f"fold{k}", model,
                        {"class_names": ["normal", "abnormal"], "positive_class": "abnormal"})

    def data_source(source: Path) -> None:
        cfg = yaml.safe_load((exp / "config.yaml").read_text())
        cfg["data"]["source"] = str(source)
        (exp / "config.yaml").write_text(yaml.safe_dump(cfg))

    def stored(bundle: Path):
        return json.loads((bundle / LAYOUT_FILE).read_text()) if (bundle / LAYOUT_FILE).is_file() else None

    data_source(karyo_dir)  # raycyto.synth karyograms: the built-in layout, automatically
    assert stored(export_model(exp, tmp_path / "m1"))["source"] == "builtin:karyogram"
    data_source(leuk_dir)  # smears: none
    assert stored(export_model(exp, tmp_path / "m2")) is None
    runner = CliRunner()
    res = runner.invoke(app, ["export", str(exp), "--out", str(tmp_path / "m3"),
                              "--layout", str(_layout_csv(tmp_path / "lab.csv"))])
    assert res.exit_code == 0, res.output
    assert "layout: " in res.output and stored(tmp_path / "m3")["source"].endswith("lab.csv")
    (tmp_path / "broken.csv").write_text("name,x0,y0,x1,y1\n23,0,0,1,1\n")
    res = runner.invoke(app, ["export", str(exp), "--out", str(tmp_path / "m4"), "--layout",
                              str(tmp_path / "broken.csv")])
    assert res.exit_code == 2 and "--layout" in res.output and "not a chromosome" in res.output
    assert not (tmp_path / "m4").exists()
    res = runner.invoke(app, ["report", str(exp), "--out", str(tmp_path / "r"), "--layout", str(tmp_path / "broken.csv")])
    assert res.exit_code == 2 and "--layout" in res.output and "not a chromosome" in res.output, res.output
    assert not (tmp_path / "r").exists()  # refused before any work
    cfg = yaml.safe_load((exp / "config.yaml").read_text())
    cfg["data"]["layout"] = str(tmp_path / "lab.csv")  # set once in the sweep config
    (exp / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert stored(export_model(exp, tmp_path / "m5"))["source"].endswith("lab.csv")


def _trisomy21_set(out: Path, patients: int, seed: int = 0) -> Path:
    """``patients`` 47,+21 and as many 46 karyograms (one image each, the default generator),
    written as a lab's folder would be (manifest, no synth.json)."""
    from raycyto.synth import karyogram
    from raycyto.synth.base import encode_png, image_rng, patient_rng, resize_to

    rows = []
    for p in range(2 * patients):
        kind, label = ("trisomy21", "abnormal") if p % 2 == 0 else ("normal", "normal")
        k = karyogram.make_karyotype(kind, patient_rng(seed, p))
        image = resize_to(karyogram.render(k, image_rng(seed, p, 0), karyogram.BASE_SIZE), SIZE)
        (out / label).mkdir(parents=True, exist_ok=True)
        (out / label / f"p{p:03d}.png").write_bytes(encode_png(image))
        rows.append([f"{label}/p{p:03d}.png", label, f"p{p:03d}", k["karyotype"]])
    with (out / "manifest.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([["path", "label", "group", "karyotype"], *rows])
    return out


NEW = 8  # new 47,+21 karyograms predicted
PATIENTS = 30  # per class (60 karyograms; 2 folds: 24 train, 6 validation images per fold)


@pytest.mark.slow
def test_predict_names_chromosome_21_first_and_the_report_shows_the_gallery_after_the_headline(ray_local, tmp_path):
    """Done when (issue 22): ``raycyto predict MODEL trisomy21.png`` names chromosome 21 first."""
    import re

    from conftest import tiny_sweep_config

    from raycyto.analysis import write_report
    from raycyto.analysis.load import read_csv
    from raycyto.synth import karyogram
    from raycyto.synth.base import encode_png, image_rng, patient_rng, resize_to
    from raycyto.tune.sweep import run_sweep

    data = _trisomy21_set(tmp_path / "data", PATIENTS)
    raw = tiny_sweep_config(data, "t21", size=SIZE, grid={"backbones": ["efficientnet_lite0"], "heads": ["s"]},
                            train={"epochs": EPOCHS}, search={"algorithm": "random", "samples": 1,
                                                              "batch_size": [8], "lr": LR})
    raw["data"]["layout"] = str(_layout_csv(tmp_path / "lab_layout.csv"))  # the lab's layout, set once
    cfg = load_config(raw)
    exp = run_sweep(cfg, out=tmp_path / "exp", progress=False)
    results = read_csv(exp / "results.csv")
    trial = str(results.loc[results["head"] == "s", "trial_id"].iloc[0])

    runner = CliRunner()
    res = runner.invoke(app, ["export", str(exp), "--trial", trial, "--out", str(tmp_path / "model")])
    assert res.exit_code == 0, res.output
    assert "lab_layout.csv (answers name chromosomes)" in res.output  # data.layout, no --layout needed
    images = []
    for s in range(NEW):  # new patients: 47,+21 karyograms the sweep never saw
        k = karyogram.make_karyotype("trisomy21", patient_rng(99, s))
        images.append(tmp_path / f"trisomy21_{s}.png")
        images[-1].write_bytes(encode_png(resize_to(karyogram.render(k, image_rng(99, s, 0), karyogram.BASE_SIZE), SIZE)))
    res = runner.invoke(app, ["predict", str(tmp_path / "model"), *map(str, images), "--passes", "5"])
    assert res.exit_code == 0, res.output
    answers = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(answers) == NEW
    # a model trained on 24 karyograms a fold: 21 first in most answers (a broken map would name
    # it first about 1 time in 24), and among the top 3 in every one
    firsts = [a["evidence"][0]["chromosome"] for a in answers]
    assert firsts.count("21") >= 0.75 * len(answers), [a["evidence"] for a in answers]
    for a in answers:
        assert "21" in [e["chromosome"] for e in a["evidence"]], a["evidence"]
        assert a["evidence_map"]["method"] == "additive"

    page = write_report(exp).read_text()
    assert "chromosomes: 21 " in page  # the gallery names chromosomes with data.layout
    assert re.search(r'<section class="headline">.*?</section>\s*<section class="gallery"><h2>Case gallery</h2>',
                     page, re.S), "the case gallery must follow the headline"
    assert page.index('<section class="gallery">') < page.index("How to read this page")
