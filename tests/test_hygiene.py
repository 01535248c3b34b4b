"""Repository-wide rules that a code review would otherwise have to catch by eye."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ["raycyto", "jobs", "benchmarks", "tests", "scripts"]


def _python_files() -> list[Path]:
    files = [p for d in SCANNED for p in (ROOT / d).rglob("*.py")]
    assert files, "no Python files found: the scan would pass vacuously"
    return files


def _torch_load_calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = getattr(getattr(f, "value", None), "id", "")
            if name == "load" and owner == "torch":
                yield node


def _weights_only_true(call: ast.Call) -> bool:
    return any(kw.arg == "weights_only" and isinstance(kw.value, ast.Constant)
               and kw.value.value is True for kw in call.keywords)


def test_every_torch_load_passes_weights_only_true():
    offenders = []
    for path in _python_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        for call in _torch_load_calls(tree):
            if not _weights_only_true(call):
                offenders.append(f"{path.relative_to(ROOT)}:{call.lineno}")
    assert not offenders, f"torch.load without weights_only=True at: {offenders}"


def test_the_torch_load_scan_catches_an_unsafe_call():
    bad = ast.parse("import torch\nx = torch.load('w.pt')\ny = torch.load('w.pt', weights_only=False)\n")
    good = ast.parse("import torch\nx = torch.load('w.pt', weights_only=True)\n")
    assert [c for c in _torch_load_calls(bad) if not _weights_only_true(c)].__len__() == 2
    assert all(_weights_only_true(c) for c in _torch_load_calls(good))


def test_no_module_starts_ray_or_writes_files_at_import_time():
    """Ray workers import our modules too: module bodies must only define things."""
    offenders = []
    for path in (ROOT / "raycyto").rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in tree.body:
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
                src = ast.unparse(node.value)
                if any(s in src for s in ("ray.init", "mkdir", "serve.start", "makedirs")):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {src}")
    assert not offenders, offenders


def test_every_command_option_and_argument_has_a_help_line_and_version_prints():
    import click
    import typer
    from typer.testing import CliRunner

    from raycyto import __version__
    from raycyto.cli import app

    def walk(cmd, path):
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from walk(sub, [*path, name])
        else:
            yield path, cmd

    missing = [f"{' '.join(path)} {p.name}" for path, cmd in walk(typer.main.get_command(app), [])
               for p in cmd.params if not getattr(p, "help", None) and p.name != "help"]
    assert not missing, missing
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"raycyto {__version__}"


def test_serve_never_imports_analysis():
    """Serve answers from the referral package; the report's analysis code is not on its path."""
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "raycyto" / "serve").rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if "raycyto.analysis" in line]
    assert not hits, hits


def test_rule_score_mode_names_have_one_owner_and_match_their_registries():
    """raycyto.config owns the names; each registry implements exactly them (and no module
    spells a tuple of them again)."""
    import numpy as np
    import torch

    from raycyto import config
    from raycyto.errors import ConfigError, RaycytoError
    from raycyto.models import finetune
    from raycyto.referral import conformal, policy

    # fine-tuning modes: every name resolves in finetune, an unknown one does not
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    for mode in config.FINETUNE_MODES:
        finetune.apply_finetune(net, ("0", "1"), mode)
    try:
        finetune.apply_finetune(net, ("0", "1"), "last3")
        raise AssertionError("an unknown fine-tune mode was accepted")
    except RaycytoError:
        pass
    assert finetune.FINETUNE_MODES is config.FINETUNE_MODES and conformal.SCORES is config.CONFORMAL_SCORES
    # conformal scores: every name scores, an unknown one does not
    p, y = np.array([[0.7, 0.3], [0.2, 0.8]]), np.array([0, 1])
    for score in config.CONFORMAL_SCORES:
        assert conformal.conformity_scores(p, y, score).shape == (2,)
    try:
        conformal.conformity_scores(p, y, "raps")
        raise AssertionError("an unknown conformal score was accepted")
    except RaycytoError:
        pass
    # refer rules and set_keep: the served policy accepts exactly the config's names
    cal = conformal.calibrate_conformal(np.tile(p, (20, 1)), np.tile(y, 20), [0.9], config.CONFORMAL_SCORES)
    meta = {"class_names": ["n", "a"], "positive_class": "a",
            "referral": {"conformal": {"score": "lac", "level": 0.9, "calibration": cal.to_json()},
                         "risk": {"threshold": 0.9, "statement": ""}}}
    for rule in config.REFER_RULES:
        for keep in config.SET_KEEP:
            pol = policy.ReferralPolicy.from_meta({**meta, "referral": {**meta["referral"], "set_keep": keep}}, rule)
            assert pol.rule == rule and pol.set_keep == keep
    try:
        policy.ReferralPolicy.from_meta(meta, "coin")
        raise AssertionError("an unknown refer rule was accepted")
    except ConfigError:
        pass
    # no second spelling of a name tuple anywhere in the package
    spelled = {repr(t) for t in (config.FINETUNE_MODES, config.REFER_RULES, config.CONFORMAL_SCORES,
                                  config.SET_KEEP)}
    for path in (ROOT / "raycyto").rglob("*.py"):
        if path.name == "config.py":
            continue
        text = path.read_text()
        assert not [t for t in spelled if t in text], path
