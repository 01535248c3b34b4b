"""Synthetic sets drawn to per-class image counts (``class_counts``): study B's blood-smear demo."""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest
from test_synth import _hashes, _rows

from raycyto.config import load_config
from raycyto.errors import ConfigError
from raycyto.run import demo_config_path
from raycyto.synth import generate
from raycyto.synth.core import _render_range, patients_from_counts, plan_counts

COUNTS = {"HLT": 5, "ALL": 2, "CML": 3}  # odd counts: HLT and CML each end on a 1-image patient
STUDY_B = {"HLT": 59, "ALL": 49, "AML": 58, "CLL": 46, "CML": 54}


def test_counts_per_class_and_patients_of_one_class(tmp_path):
    generate("leukemia", tmp_path, patients=None, per_patient=2, seed=0, size=32, progress=False,
             class_counts=COUNTS)
    rows = _rows(tmp_path)
    assert Counter(r["label"] for r in rows) == COUNTS
    by_group = defaultdict(list)
    for r in rows:
        by_group[r["group"]].append(r["label"])
    assert len(by_group) == 3 + 1 + 2  # ceil(count / per_patient) per class
    assert all(len(set(labels)) == 1 and len(labels) <= 2 for labels in by_group.values())
    short = Counter(labels[0] for labels in by_group.values() if len(labels) < 2)
    assert short == {"HLT": 1, "CML": 1}  # only a class's last patient holds fewer
    assert {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.png")} == {r["path"] for r in rows}


def test_study_b_counts_make_134_patients_and_the_demo_draws_them():
    pairs = patients_from_counts("leukemia", STUDY_B, per_patient=2)
    assert len(pairs) == 30 + 25 + 29 + 23 + 27 and sum(n for _, n in pairs) == 266
    syn = load_config(demo_config_path("leukemia")).data.synthetic
    assert (syn.task, syn.class_counts, syn.per_patient, syn.patients) == ("leukemia", STUDY_B, 2, None)


def test_rerun_is_byte_identical_and_count_order_does_not_matter(tmp_path):
    kw = dict(patients=None, per_patient=2, seed=3, size=32, progress=False)
    generate("leukemia", tmp_path / "a", class_counts=COUNTS, **kw)
    generate("leukemia", tmp_path / "b", class_counts=dict(reversed(COUNTS.items())), **kw)
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")


def test_any_split_of_the_patients_writes_the_same_bytes(tmp_path):
    """What Ray workers do with chunks of patients (``_render_range``), without starting Ray."""
    cohort = plan_counts("leukemia", 1, COUNTS, per_patient=2)
    args = (2, 1, 32, 3)  # per_patient, seed, size, digits
    whole, split = tmp_path / "whole", tmp_path / "split"
    whole.mkdir(), split.mkdir()
    rows = _render_range("leukemia", cohort, 0, str(whole), *args)
    parts = [_render_range("leukemia", cohort[a:b], a, str(split), *args) for a, b in ((0, 1), (1, 4), (4, 6))]
    assert rows == [r for part in parts for r in part] and len(rows) == 10
    assert _hashes(whole) == _hashes(split)


@pytest.mark.parametrize("kw,match", [
    (dict(class_counts={"HLT": 2, "XYZ": 1}), "unknown class"),
    (dict(class_counts={"HLT": 0}), "positive"),
    (dict(class_counts={"HLT": -3}), "positive"),
    (dict(class_counts={}), "mapping"),
    (dict(class_counts={"HLT": 3}, patients=5), "make 2 patients"),
    (dict(class_counts={"normal": 2}, task="karyogram"), "does not take class counts"),
])
def test_bad_counts_raise_config_error_naming_the_field(kw, match, tmp_path):
    args = {"task": "leukemia", "out": tmp_path / "o", "patients": None, "per_patient": 2, "seed": 0,
            "size": 32, "progress": False, **kw}
    with pytest.raises(ConfigError, match=match) as err:
        generate(**args)
    assert err.value.field == "class_counts"
    assert not (tmp_path / "o").exists()  # checked before anything is written


@pytest.mark.parametrize("synthetic,match", [
    ({"class_counts": {"HLT": 59, "BLAST": 3}}, "unknown class"),
    ({"class_counts": {"HLT": 0}}, "positive"),
    ({"class_counts": {"HLT": 59}, "patients": 60}, "make 30 patients"),
])
def test_bad_counts_in_a_config_name_data_synthetic_class_counts(synthetic, match):
    raw = {"data": {"synthetic": {"task": "leukemia", "per_patient": 2, **synthetic}}}
    with pytest.raises(ConfigError, match=match) as err:
        load_config(raw)
    assert err.value.field == "data.synthetic.class_counts"


def test_config_patients_default_and_generate_kwargs():
    plain = load_config({}).data.synthetic
    assert plain.patients is None and "class_counts" not in plain.generate_kwargs()
    syn = load_config({"data": {"synthetic": {"task": "leukemia", "class_counts": COUNTS, "patients": 6}}})
    assert syn.data.synthetic.generate_kwargs()["class_counts"] == COUNTS


def test_cli_class_counts(tmp_path):
    from typer.testing import CliRunner

    from raycyto.cli import app

    runner = CliRunner()
    out = tmp_path / "l"
    res = runner.invoke(app, ["synth", "leukemia", "--out", str(out), "--class-counts", "HLT=3,AML=2",
                              "--per-patient", "2", "--size", "32"])
    assert res.exit_code == 0, res.output
    assert Counter(r["label"] for r in _rows(out)) == {"HLT": 3, "AML": 2}
    assert "5 images" in res.output and "from 3 patients" in res.output
    res = runner.invoke(app, ["synth", "leukemia", "--out", str(tmp_path / "x"), "--class-counts", "HLT:3"])
    assert res.exit_code != 0 and "class-counts" in res.output
