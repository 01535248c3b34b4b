"""``raycyto models ...``: inspect the backbone registry."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, help="Backbones, weights and heads.")


@app.callback()
def models() -> None:
    """Backbones, weights and heads. Example: raycyto models list"""


def backbone_rows() -> list[dict]:
    """One dict per registered backbone: name, params, feature_dim, input_size, groups, offline.

    Parameters are counted on a model built on the ``meta`` device (no memory, no weights).
    """
    import torch

    from raycyto.errors import WeightsError
    from raycyto.models.registry import BACKBONES
    from raycyto.models.weights import expected_path, locate

    rows = []
    for name, spec in BACKBONES.items():
        with torch.device("meta"):
            params = sum(p.numel() for p in spec.builder(pretrained=False).parameters())
        path = locate(spec.weights)
        if path is not None:
            where = f"package {spec.weights.package}" if spec.weights.package else str(path)
        else:
            try:
                where = f"put {spec.weights.filename} in {expected_path(spec.weights).parent}"
            except WeightsError as e:
                where = str(e)
        rows.append({"name": name, "params": params, "feature_dim": spec.feature_dim,
                     "input_size": spec.input_size, "block_groups": spec.block_groups,
                     "available": path is not None, "where": where})
    return rows


@app.command("list")
def list_backbones() -> None:
    """List backbones: parameters, feature width, input size, block groups, offline weights.

    Example: raycyto models list
    """
    from rich.console import Console
    from rich.table import Table

    table = Table(title="raycyto backbones")
    for col in ("name", "params", "features", "input", "block groups (last = nearest head)",
                "pretrained offline"):
        table.add_column(col, overflow="fold", no_wrap=col == "name")
    for r in backbone_rows():
        avail = f"[green]yes[/] ({r['where']})" if r["available"] else f"[red]no[/] ({r['where']})"
        table.add_row(r["name"], f"{r['params'] / 1e6:.1f}M", str(r["feature_dim"]),
                      str(r["input_size"]), ", ".join(r["block_groups"]), avail)
    Console().print(table)
