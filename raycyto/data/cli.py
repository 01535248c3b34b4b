"""``raycyto data ...``: look at a data source before training on it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(no_args_is_help=True, help="Inspect data sources (image folders, CSV manifests).")


@app.callback()
def _data() -> None:
    """Inspect data sources.

    Example: raycyto data inspect data/leukemia --folds 5
    """


def _decode_all(table, image_size: int, policy: str, copies: int, seed: int, max_pixels: int, console):
    """Run every file through the Ray Data pipeline; returns (rows out, bad DataFrame, {path: fingerprint})."""
    import pandas as pd
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from raycyto.data.pipeline import image_dataset

    ds = image_dataset(table, image_size, policy=policy, copies=copies, seed=seed, max_pixels=max_pixels)
    bad, rows, prints = [], 0, {}
    columns = (TextColumn("decoding"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("decode", total=len(table.df))
        for batch in ds.select_columns(["path", "copy", "error", "fingerprint"]).iter_batches(
                batch_format="numpy", batch_size=64):
            rows += len(batch["path"])
            bad += [(str(p), str(e)) for p, e in zip(batch["path"], batch["error"]) if e]
            first = batch["copy"] == 0
            prints.update(zip(batch["path"][first].astype(str), batch["fingerprint"][first].astype(str)))
            bar.advance(task, int(first.sum()))  # one copy-0 row per source image
    bad_df = pd.DataFrame(bad, columns=["path", "reason"]).sort_values("path").reset_index(drop=True)
    return rows, bad_df, prints  # printed as tables by the caller


def _table(title: str, df) -> "object":
    import pandas as pd
    from rich.table import Table

    t = Table(title=title)
    for c in df.columns:
        t.add_column(str(c), justify="right" if pd.api.types.is_numeric_dtype(df[c]) else "left")
    for row in df.itertuples(index=False):
        t.add_row(*(str(v) for v in row))
    return t


def _settings(config: Optional[Path], sets: list[str], given: dict) -> dict:
    """Inspect settings: an explicit option wins, then the config (with --set), then defaults."""
    from raycyto.config import SweepConfig, load_config

    cfg = (load_config(config) if config else SweepConfig()).override(sets)
    base = {"policy": cfg.data.policy, "copies": cfg.data.copies, "folds": cfg.cv.folds,
            "val_fraction": cfg.cv.val_fraction, "seed": cfg.cv.seed, "image_size": cfg.data.image_size,
            "classes": ",".join(cfg.data.classes) if cfg.data.classes else None}
    return {k: (given[k] if given.get(k) is not None else v) for k, v in base.items()}


@app.command("inspect")
def inspect(
    source: str = typer.Argument(..., help="Image folder root/<label>/*, folder with manifest.csv, or CSV manifest (path or URI)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Take data/cv settings from a sweep config."),
    set_: list[str] = typer.Option([], "--set", help="Override a config field (repeatable), e.g. --set cv.folds=3."),
    policy: Optional[str] = typer.Option(None, help="Augmentation policy to run: karyogram, leukemia, none (default none)."),
    copies: Optional[int] = typer.Option(None, min=1, help="Rows per source image (copy 0 = original; default 1)."),
    folds: Optional[int] = typer.Option(None, min=2, help="Outer group-stratified folds (default 5)."),
    val_fraction: Optional[float] = typer.Option(None, help="Share of training groups held out for validation (default 0.2)."),
    seed: Optional[int] = typer.Option(None, help="Seed for folds and augmentation (default 0)."),
    image_size: Optional[int] = typer.Option(None, min=1, help="Resize side length (default 224)."),
    classes: Optional[str] = typer.Option(None, help="Comma-separated subset and order, e.g. ALL,HLT."),
    max_pixels: Optional[int] = typer.Option(None, help="Refuse images with more pixels (default decode.MAX_PIXELS)."),
) -> None:
    """Decode every image through Ray Data; print class/group counts, the fold table, bad files,
    and warnings about groups and near-duplicate images that straddle folds.

    Exit 0 even when bad files exist (they are listed); 1 when nothing is readable; 2 when
    the source, the config or the fold settings are invalid.

    Example: raycyto data inspect data/karyo --folds 5 --policy karyogram --copies 3
    """
    from rich.console import Console

    from raycyto.data.augment import get_policy
    from raycyto.data.decode import MAX_PIXELS
    from raycyto.data.quality import describe_duplicates, group_warning, near_duplicates, test_folds_of
    from raycyto.data.sources import read_source, unlisted_files
    from raycyto.data.splits import kfold_splits
    from raycyto.data.summary import class_table, fold_table, without_paths
    from raycyto.errors import RaycytoError

    console = Console(width=max(Console().width, 120))
    try:
        o = _settings(config, set_, {"policy": policy, "copies": copies, "folds": folds, "seed": seed,
                                     "val_fraction": val_fraction, "image_size": image_size, "classes": classes})
        get_policy(o["policy"])
        table = read_source(source, classes=[c.strip() for c in o["classes"].split(",")] if o["classes"] else None)
    except RaycytoError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    console.print(f"source [bold]{source}[/bold]: {len(table.df)} images, "
                  f"{table.df['group'].nunique()} groups, classes {table.class_names}")
    console.print(_table("classes (all listed files)", class_table(table)))
    unlisted = unlisted_files(source, table)
    if unlisted:
        console.print(f"[yellow]note:[/yellow] {len(unlisted)} file(s) under {source} are not in "
                      f"manifest.csv and are not read, e.g. {unlisted[:3]}")

    from raycyto.data.pipeline import ensure_ray

    ensure_ray()
    rows, bad, prints = _decode_all(table, o["image_size"], o["policy"], o["copies"], o["seed"],
                                    max_pixels or MAX_PIXELS, console)
    good = without_paths(table, bad["path"].tolist())
    console.print(f"decoded {len(good.df)}/{len(table.df)} images -> {rows - len(bad)} rows "
                  f"(policy {o['policy']}, {o['copies']} copies, {o['image_size']}px)")
    if len(bad):
        console.print(_table(f"bad files ({len(bad)}, left out)", bad))
    else:
        console.print("bad files: none")
    if good.df.empty:
        console.print(f"[red]error:[/red] no readable image in {source}")
        raise typer.Exit(1)

    try:
        splits = kfold_splits(good.df["label"].to_numpy(), good.df["group"].to_numpy(), k=o["folds"],
                              val_fraction=o["val_fraction"], seed=o["seed"], class_names=good.class_names)
    except RaycytoError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    console.print(_table(f"readable images per fold (seed {o['seed']}; groups never cross splits)",
                         fold_table(good, splits)))
    paths = good.df["path"].astype(str)
    pairs = near_duplicates(paths, paths.map(prints), good.df["group"].astype(str),
                            test_folds_of(len(paths), splits))
    for w in (group_warning(good), describe_duplicates(pairs)):
        if w:
            console.print(f"[yellow]warning:[/yellow] {w}")
    if len(pairs):
        console.print(_table(f"near-duplicate pairs across folds ({len(pairs)})",
                             pairs[["path_a", "path_b", "bits", "fold_a", "fold_b"]].head(50)))
