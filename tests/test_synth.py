"""Synthetic datasets: manifest contract, reproducibility, karyotypes, no trivial cues, CLI."""

from __future__ import annotations

import csv
import hashlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from raycyto.errors import ConfigError, DataError
from raycyto.synth import DEFAULTS, TASKS, generate
from raycyto.synth import karyogram as kg

LABELS = {"karyogram": {"normal", "abnormal"}, "leukemia": {"ALL", "AML", "CLL", "CML", "HLT"}}


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "manifest.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _hashes(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def _read_rgb(path: Path) -> np.ndarray:
    import cv2

    return cv2.imread(str(path), cv2.IMREAD_COLOR)[:, :, ::-1]


def test_registry_and_defaults_cover_both_tasks():
    assert set(TASKS) == {"karyogram", "leukemia"} == set(DEFAULTS)
    for name, task in TASKS.items():
        assert set(task.labels) == LABELS[name]
        assert set(DEFAULTS[name]) - {"patients", "per_patient", "size"} <= set(task.options)


@pytest.mark.parametrize("task,fixture,size", [("karyogram", "karyo_dir", 96),
                                               ("leukemia", "leuk_dir", 64)])
def test_manifest_columns_paths_and_labels(task, fixture, size, request):
    out = request.getfixturevalue(fixture)
    rows = _rows(out)
    expected_cols = ["path", "label", "group"] + list(TASKS[task].extra_columns)
    assert list(rows[0]) == expected_cols
    assert len(rows) == 10 * 2
    assert {r["label"] for r in rows} <= LABELS[task]
    for r in rows:
        path = out / r["path"]
        assert Path(r["path"]).parts[0] == r["label"]  # out/<label>/<file>.png
        assert r["label"] not in path.name  # filename carries no label
        assert _read_rgb(path).shape == (size, size, 3)
    pngs = {str(p.relative_to(out)) for p in out.rglob("*.png")}
    assert pngs == {r["path"] for r in rows}


@pytest.mark.parametrize("fixture", ["karyo_dir", "leuk_dir"])
def test_group_is_patient_and_patient_images_share_label(fixture, request):
    rows = _rows(request.getfixturevalue(fixture))
    by_group = defaultdict(list)
    for r in rows:
        by_group[r["group"]].append(r)
    assert len(by_group) == 10
    for group, members in by_group.items():
        assert len(members) == 2
        assert len({m["label"] for m in members}) == 1
        assert len({m.get("subtype") for m in members}) == 1
        assert all(Path(m["path"]).name.startswith(group + "_") for m in members)


@pytest.mark.parametrize("task", ["karyogram", "leukemia"])
def test_rerun_is_byte_identical_and_seeds_differ(task, tmp_path):
    kw = dict(patients=5, per_patient=2, size=64, progress=False)
    generate(task, tmp_path / "a", seed=3, **kw)
    generate(task, tmp_path / "b", seed=3, **kw)
    generate(task, tmp_path / "c", seed=4, **kw)
    a, b, c = (_hashes(tmp_path / d) for d in "abc")
    assert a == b
    shared = set(a) & set(c)
    assert all(a[k] != c[k] for k in shared if k.endswith(".png"))


def test_parallel_generation_on_ray_writes_the_same_bytes(ray_local, tmp_path):
    kw = dict(patients=9, per_patient=2, seed=2, size=48, progress=False)
    generate("karyogram", tmp_path / "serial", parallel=False, **kw)
    generate("karyogram", tmp_path / "ray", parallel=True, **kw)  # chunks of patients as Ray tasks
    serial, ray = _hashes(tmp_path / "serial"), _hashes(tmp_path / "ray")
    assert serial == ray and sum(k.endswith(".png") for k in serial) == 18  # manifest included


def test_image_depends_only_on_seed_patient_and_index(tmp_path):
    """Image i of patient p is the same whatever else is generated (order independence)."""
    generate("leukemia", tmp_path / "two", patients=5, per_patient=2, seed=1, size=48,
             progress=False)
    generate("leukemia", tmp_path / "one", patients=5, per_patient=1, seed=1, size=48,
             progress=False)
    one, two = _hashes(tmp_path / "one"), _hashes(tmp_path / "two")
    pngs = [k for k in one if k.endswith(".png")]
    assert len(pngs) == 5 and all(one[k] == two[k] for k in pngs)
    assert all(two[k.replace("_i0", "_i1")] != one[k] for k in pngs)  # a new realisation


def test_rerun_into_same_folder_replaces_previous_set(tmp_path):
    generate("leukemia", tmp_path, patients=6, per_patient=1, seed=0, size=32, progress=False)
    generate("leukemia", tmp_path, patients=3, per_patient=1, seed=0, size=32, progress=False)
    assert len(list(tmp_path.rglob("*.png"))) == len(_rows(tmp_path)) == 3


def test_karyogram_plan_deals_every_abnormality_with_the_right_content():
    cohort = kg.plan(seed=0, patients=30, abnormal_fraction=0.5)
    assert sum(p["label"] == "abnormal" for p in cohort) == 15
    assert {p["subtype"] for p in cohort} == set(kg.KARYOTYPES)
    length = lambda ch: sum((t1 - t0) * kg.LENGTH_MB[c] for c, t0, t1 in ch)  # noqa: E731
    for p in cohort:
        slots, kind = p["slots"], p["subtype"]
        n = sum(len(v) for v in slots.values())
        assert p["karyotype"].startswith(str(n))
        assert (p["label"] == "normal") == (kind == "normal")
        if kind.startswith("trisomy"):
            assert n == 47 and len(slots[kind[len("trisomy"):]]) == 3
        elif kind == "monosomyX":
            assert n == 45 and len(slots["X"]) == 1 and not slots["Y"]
        elif kind == "deletion":
            short = [ch for t in kg.TYPES for ch in slots[t] if length(ch) < kg.LENGTH_MB[t] - 1]
            assert len(short) == 1
            ctype = short[0][0][0]
            assert length(short[0]) <= 0.7 * kg.LENGTH_MB[ctype]  # >= 30 % removed
        elif kind == "translocation":
            der = [ch for t in kg.TYPES for ch in slots[t] if len(ch) == 2]
            assert len(der) == 2 and n == 46
            total_before = sum(kg.LENGTH_MB[ch[0][0]] for ch in der)
            assert abs(sum(length(ch) for ch in der) - total_before) < 1e-6  # balanced
            for ch in der:  # visibly different length from the normal homologue
                assert abs(length(ch) - kg.LENGTH_MB[ch[0][0]]) >= 10
        else:
            assert n == 46


def test_karyogram_abnormal_fraction_and_all_subtypes_in_images(tmp_path):
    manifest = generate("karyogram", tmp_path, patients=12, per_patient=1, seed=2, size=64,
                        progress=False, abnormal_fraction=0.5)
    rows = _rows(manifest.parent)
    assert {r["subtype"] for r in rows if r["label"] == "abnormal"} == set(kg.ABNORMALITIES)
    assert all(r["subtype"] == "normal" for r in rows if r["label"] == "normal")


@pytest.mark.parametrize("task,patients", [("leukemia", 75), ("karyogram", 20)])
def test_no_trivial_colour_cue(task, patients, tmp_path):
    """Class means of the global mean colour and of the background colour differ by less
    than the within-class spread, so colour statistics alone do not give the label."""
    generate(task, tmp_path, patients=patients, per_patient=1, seed=0, size=40, progress=False)
    feats = defaultdict(list)
    for r in _rows(tmp_path):
        img = _read_rgb(tmp_path / r["path"]).reshape(-1, 3).astype(np.float64)  # [P, 3]
        lum = img.mean(axis=1)
        background = np.median(img[lum >= np.percentile(lum, 90)], axis=0)  # free background
        feats[r["label"]].append(np.concatenate([img.mean(axis=0), background]))
    means = {c: np.mean(v, axis=0) for c, v in feats.items()}  # [6] per class
    within = np.mean([np.std(v, axis=0) for v in feats.values()], axis=0)  # [6]
    classes = sorted(means)
    for i, a in enumerate(classes):
        for b in classes[i + 1:]:
            gap = np.abs(means[a] - means[b])
            assert np.all(gap < within), (a, b, gap.round(1), within.round(1))


@pytest.mark.parametrize("kw,field", [
    (dict(task="nope"), "task"),
    (dict(patients=0), "patients"),
    (dict(per_patient=-1), "per_patient"),
    (dict(seed=-5), "seed"),
    (dict(size=4), "size"),
    (dict(abnormal_fraction=1.5), "abnormal_fraction"),
    (dict(task="leukemia", abnormal_fraction=0.5), "abnormal_fraction"),
])
def test_bad_arguments_raise_config_error_naming_the_field(kw, field, tmp_path):
    args = dict(task="karyogram", out=tmp_path / "o", patients=2, per_patient=1, seed=0,
                size=32, progress=False)
    args.update(kw)
    with pytest.raises(ConfigError) as err:
        generate(**args)
    assert err.value.field == field


def test_refuses_to_write_into_unrelated_non_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        generate("leukemia", tmp_path, patients=1, per_patient=1, seed=0, size=32,
                 progress=False)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_cli_writes_set_and_prints_counts(tmp_path):
    from typer.testing import CliRunner

    from raycyto.cli import app

    runner = CliRunner()
    out = tmp_path / "k"
    res = runner.invoke(app, ["synth", "karyogram", "--out", str(out), "--patients", "4",
                              "--per-patient", "1", "--seed", "0", "--size", "48",
                              "--abnormal-fraction", "0.5"])
    assert res.exit_code == 0, res.output
    rows = _rows(out)
    assert len(rows) == 4 and sum(r["label"] == "abnormal" for r in rows) == 2
    assert "abnormal" in res.output and "normal" in res.output
    res = runner.invoke(app, ["synth", "leukemia", "--out", str(tmp_path / "l"),
                              "--patients", "5", "--per-patient", "1", "--seed", "0",
                              "--size", "32"])
    assert res.exit_code == 0, res.output
    assert {r["label"] for r in _rows(tmp_path / "l")} == LABELS["leukemia"]
    res = runner.invoke(app, ["synth", "leukemia", "--out", str(tmp_path / "x"),
                              "--patients", "0", "--per-patient", "1", "--seed", "0"])
    assert res.exit_code != 0 and "patients" in res.output
    for cmd in ("karyogram", "leukemia"):
        assert "Example" in runner.invoke(app, ["synth", cmd, "--help"]).output
