"""`raycyto models list` runs offline and shows the Lite backbones as available."""

from __future__ import annotations

from typer.testing import CliRunner

from raycyto.models import BACKBONES
from raycyto.models.cli import app, backbone_rows


def test_models_list_runs_offline_and_shows_lite_available(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache: torchvision ones unavailable
    monkeypatch.setenv("COLUMNS", "250")
    rows = {r["name"]: r for r in backbone_rows()}
    assert set(rows) == set(BACKBONES)
    for n in (0, 1, 2):
        assert rows[f"efficientnet_lite{n}"]["available"]
    assert not rows["resnet18"]["available"]
    assert "resnet18-f37072fd.pth" in rows["resnet18"]["where"]
    assert rows["senet154"]["params"] > 100_000_000 and rows["efficientnet_lite0"]["params"] < 5_000_000
    result = CliRunner().invoke(app, ["list"])
    assert result.exit_code == 0, result.output
    assert "efficientnet_lite2" in result.output and "yes" in result.output
