"""Typed sweep config: shipped configs load, bad fields are named, dump/load round-trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raycyto.config import SweepConfig, dump_config, load_config
from raycyto.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "jobs" / "configs").glob("*.yaml"))


def test_shipped_configs_exist():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "karyogram_study.yaml", "leukemia_study.yaml",
                                         "leukemia_study_binary.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg, SweepConfig) and cfg.grid.cells()
    assert load_config(dump_config(cfg, tmp_path / "config.yaml")) == cfg  # resolved config round-trips


def test_study_configs_match_the_studies():
    a = load_config(CONFIGS[[p.name for p in CONFIGS].index("karyogram_study.yaml")])
    assert a.grid.backbones == ("vgg16", "inception_v3") and a.grid.heads == ("k", "s")
    assert a.grid.finetune == ("frozen", "last1", "last2", "full") and a.data.policy == "karyogram"
    assert a.search.lr == (7e-4, 3e-2) and a.search.batch_size == (16, 32) and a.data.image_size == 416
    b = load_config(CONFIGS[[p.name for p in CONFIGS].index("leukemia_study.yaml")])
    assert b.data.copies == 33 and b.data.equalize and b.train.epochs == 25 and b.grid.heads == ("a", "b", "c", "d")
    bb = load_config(CONFIGS[[p.name for p in CONFIGS].index("leukemia_study_binary.yaml")])
    assert bb.data.classes == ("ALL", "HLT") and bb.data.positive_class == "ALL" and bb.train.epochs == 10


@pytest.mark.parametrize("raw, field", [
    ({"serach": {}}, "serach"),
    ({"search": {"samples": 2, "lr_range": [1, 2]}}, "search.lr_range"),
    ({"data": {"synthetic": {"patiens": 3}}}, "data.synthetic.patiens"),
    ({"search": {"lr": [1e-2, 1e-3]}}, "search.lr"),
    ({"search": {"lr": [0, 1e-3]}}, "search.lr"),
    ({"search": {"algorithm": "grid"}}, "search.algorithm"),
    ({"search": {"batch_size": []}}, "search.batch_size"),
    ({"train": {"select_metric": "accuracy"}}, "train.select_metric"),
    ({"train": {"optimizer": "rmsprop"}}, "train.optimizer"),
    ({"train": {"schedule": "step"}}, "train.schedule"),
    ({"train": {"epochs": "ten"}}, "train.epochs"),
    ({"cv": {"folds": 1}}, "cv.folds"),
    ({"grid": {"finetune": ["half"]}}, "grid.finetune"),
    ({"grid": {"backbones": ["alexnet"]}}, "grid.backbones"),
    ({"grid": {"heads": ["z"]}}, "grid.heads"),
    ({"data": {"policy": "mixup"}}, "data.policy"),
    ({"data": {"classes": ["A", "B"], "positive_class": "C"}}, "data.positive_class"),
    ({"resources": {"gpus_per_trial": 1.5}}, "resources.gpus_per_trial"),
    ({"mc": {"threshold": 1.5}}, "mc.threshold"),
    ({"train": {"precision": "fp16"}}, "train.precision"),
    ({"storage": "s3://"}, "storage"),
    ({"storage": "ftp://host/runs"}, "storage"),
    ({"storage": ""}, "storage"),
])
def test_unknown_or_invalid_field_is_named(raw, field):
    with pytest.raises(ConfigError) as info:
        load_config(raw)
    assert info.value.field == field and str(info.value).startswith(f"{field}: ")


def test_storage_accepts_folders_and_object_store_uris():
    for storage in ("./experiments", "/abs/runs", "s3://bucket/raycyto", "gs://b/p", "file:///tmp/x"):
        assert load_config({"storage": storage}).storage == storage


def test_fractional_gpus_and_yaml_scientific_notation_are_accepted(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("search: {lr: [1e-4, 1e-2]}\nresources: {gpus_per_trial: 0.25}\n")  # YAML 1.1: strings
    cfg = load_config(path)
    assert cfg.search.lr == (1e-4, 1e-2) and cfg.resources.gpus_per_trial == 0.25


def test_missing_or_broken_file_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("search: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_replace_overrides_a_dotted_field_and_revalidates():
    cfg = load_config({})
    assert cfg.replace(**{"data.source": "/x"}).data.source == "/x"
    with pytest.raises(ConfigError, match="cv.folds"):
        cfg.replace(**{"cv.folds": 0})


def test_cluster_yaml_validates_against_the_ray_launcher_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "cluster.yaml").read_text())
    validate_config(prepare_config(raw))
    assert raw["head_node_type"] in raw["available_node_types"]
    gpu = [n for n, t in raw["available_node_types"].items() if t.get("max_workers", 0) > 0]
    assert gpu and all(raw["available_node_types"][n]["min_workers"] == 0 for n in gpu)  # autoscaling
    assert any("RAY_AUTH_MODE=token" in c for c in raw["head_start_ray_commands"])
    raw["not_a_launcher_key"] = 1
    with pytest.raises(Exception, match="not_a_launcher_key"):
        validate_config(prepare_config(raw))


def test_sweep_cli_names_the_bad_field_and_exits_2(tmp_path):
    from typer.testing import CliRunner

    from raycyto.cli import app

    bad = tmp_path / "bad.yaml"
    bad.write_text("grid: {heads: [a]}\ntrain: {epochz: 3}\n")
    result = CliRunner().invoke(app, ["sweep", "--config", str(bad)])
    assert result.exit_code == 2 and "train.epochz" in result.output


def test_set_overrides_go_through_the_typed_checks_and_name_the_field():
    from raycyto.config import SweepConfig

    cfg = SweepConfig().override(["train.epochs=30", "data.classes=[cat, dog]", "search.lr=[1e-4, 1e-3]"])
    assert cfg.train.epochs == 30 and cfg.data.classes == ("cat", "dog") and cfg.search.lr == (1e-4, 1e-3)
    for bad, field in ((["train.epoch=3"], "train.epoch"), (["trian.epochs=3"], "trian"),
                       (["train.epochs=many"], "train.epochs"), (["epochs"], "--set"),
                       (["data.positive_class=x"], "data.positive_class")):
        if field == "data.positive_class":  # valid alone; invalid against the classes
            bad = ["data.classes=[a, b]", *bad]
        with pytest.raises(ConfigError) as e:
            SweepConfig().override(bad)
        assert e.value.field == field, (bad, str(e.value))


def test_the_probe_is_not_a_grid_head():
    with pytest.raises(ConfigError, match="grid.heads.*baseline"):
        load_config({"grid": {"heads": ["a", "probe"]}})


def test_spatial_heads_pair_with_frozen_cells_only():
    """Head s reads a frozen backbone's feature map: no (s, lastN) cells, and a grid without
    frozen names grid.heads; label smoothing is range-checked."""
    cfg = load_config({"name": "x", "grid": {"heads": ["s", "a"], "finetune": ["frozen", "last1"]}})
    assert cfg.grid.cells() == [("efficientnet_lite0", "frozen", "s"), ("efficientnet_lite0", "frozen", "a"),
                                ("efficientnet_lite0", "last1", "a")]
    with pytest.raises(ConfigError, match="grid.heads"):
        load_config({"name": "x", "grid": {"heads": ["s"], "finetune": ["last1"]}})
    with pytest.raises(ConfigError, match="train.label_smoothing"):
        load_config({"name": "x", "train": {"label_smoothing": 1.5}})


def test_narrowing_the_grid_is_one_override():
    """demo.yaml sets head s; ``--set 'grid.heads=[a,d]'`` drops those settings with a warning
    naming the field (the resolved config, and so EXP_DIR/config.yaml, no longer carries them)."""
    demo = load_config(CONFIGS[0].with_name("demo.yaml"))
    assert "s" in demo.grid.head_kwargs
    with pytest.warns(UserWarning, match=r"grid\.head_kwargs\.s: head 's' is not in grid\.heads"):
        cfg = demo.override(["grid.heads=[a,d]"])
    assert cfg.grid.heads == ("a", "d") and cfg.grid.head_kwargs == {}
    assert cfg.grid.cells() == [("efficientnet_lite0", "frozen", "a"), ("efficientnet_lite0", "frozen", "d")]
    with pytest.warns(UserWarning, match=r"grid\.head_kwargs\.d:"):
        kept = load_config({"grid": {"heads": ["a", "s"], "head_kwargs": {"s": {"width": 8}, "d": {}}}})
    assert kept.grid.head_kwargs == {"s": {"width": 8}}


def test_settings_of_an_unknown_head_are_an_error_naming_the_field():
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS[0].with_name("demo.yaml")).override(["grid.head_kwargs.zzz={width: 3}"])
    assert e.value.field == "grid.head_kwargs.zzz" and "unknown head 'zzz'" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config({"grid": {"heads": ["a"], "head_kwargs": {"zzz": {}}}})
    assert e.value.field == "grid.head_kwargs.zzz"
