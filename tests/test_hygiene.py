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
