"""``raycyto data ...``: look at a data source before training on it."""

from __future__ import annotations

from typing import Optional

import typer

app = typer.Typer(no_args_is_help=True, help="Inspect data sources (image folders, CSV manifests).")


@app.callback()
def _data() -> None:
    """Inspect data sources.

    Example: raycyto data inspect data/leukemia --folds 5
    """


def _decode_all(table, image_size: int, policy: str, copies: int, seed: int, max_pixels: int, console):
    """Run every file through the Ray Data pipeline; returns (rows out, bad DataFrame)."""
    import pandas as pd
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from raycyto.data.pipeline import image_dataset

    ds = image_dataset(table, image_size, policy=policy, copies=copies, seed=seed, max_pixels=max_pixels)
    bad, rows = [], 0
    columns = (TextColumn("decoding"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("decode", total=len(table.df))
        for batch in ds.select_columns(["path", "copy", "error"]).iter_batches(batch_format="numpy",
                                                                                 batch_size=64):
            rows += len(batch["path"])
            bad += [(str(p), str(e)) for p, e in zip(batch["path"], batch["error"]) if e]
            bar.advance(task, int((batch["copy"] == 0).sum()))  # one copy-0 row per source image
    bad_df = pd.DataFrame(bad, columns=["path", "reason"]).sort_values("path").reset_index(drop=True)
    return rows, bad_df  # printed as a table by the caller


def _table(title: str, df) -> "object":
    import pandas as pd
    from rich.table import Table

    t = Table(title=title)
    for c in df.columns:
        t.add_column(str(c), justify="right" if pd.api.types.is_numeric_dtype(df[c]) else "left")
    for row in df.itertuples(index=False):
        t.add_row(*(str(v) for v in row))
    return t


@app.command("inspect")
def inspect(
    source: str = typer.Argument(..., help="Image folder root/<label>/*, folder with manifest.csv, or CSV manifest (path or URI)."),
    policy: str = typer.Option("none", help="Augmentation policy to run: karyogram, leukemia, none."),
    copies: int = typer.Option(1, min=1, help="Rows per source image (copy 0 = original)."),
    folds: int = typer.Option(5, min=2, help="Outer group-stratified folds."),
    val_fraction: float = typer.Option(0.2, help="Share of training groups held out for validation."),
    seed: int = typer.Option(0, help="Seed for folds and augmentation."),
    image_size: int = typer.Option(224, min=1, help="Resize side length."),
    classes: Optional[str] = typer.Option(None, help="Comma-separated subset and order, e.g. ALL,HLT."),
    max_pixels: Optional[int] = typer.Option(None, help="Refuse images with more pixels (default decode.MAX_PIXELS)."),
) -> None:
    """Decode every image through Ray Data; print class/group counts, the fold table and bad files.

    Exit 0 even when bad files exist (they are listed); 1 when nothing is readable; 2 when
    the source or the fold settings are invalid.

    Example: raycyto data inspect data/karyo --folds 5 --policy karyogram --copies 3
    """
    from rich.console import Console

    from raycyto.data.augment import get_policy
    from raycyto.data.decode import MAX_PIXELS
    from raycyto.data.sources import read_source, unlisted_files
    from raycyto.data.splits import kfold_splits
    from raycyto.data.summary import class_table, fold_table, without_paths
    from raycyto.errors import RaycytoError

    console = Console(width=max(Console().width, 120))
    try:
        get_policy(policy)
        table = read_source(source, classes=[c.strip() for c in classes.split(",")] if classes else None)
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
    rows, bad = _decode_all(table, image_size, policy, copies, seed, max_pixels or MAX_PIXELS, console)
    good = without_paths(table, bad["path"].tolist())
    console.print(f"decoded {len(good.df)}/{len(table.df)} images -> {rows - len(bad)} rows "
                  f"(policy {policy}, {copies} copies, {image_size}px)")
    if len(bad):
        console.print(_table(f"bad files ({len(bad)}, left out)", bad))
    else:
        console.print("bad files: none")
    if good.df.empty:
        console.print(f"[red]error:[/red] no readable image in {source}")
        raise typer.Exit(1)

    try:
        splits = kfold_splits(good.df["label"].to_numpy(), good.df["group"].to_numpy(),
                              k=folds, val_fraction=val_fraction, seed=seed)
    except RaycytoError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    console.print(_table(f"readable images per fold (seed {seed}; groups never cross splits)",
                         fold_table(good, splits)))
