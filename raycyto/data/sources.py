"""Data sources: an image folder, a folder holding manifest.csv, or a CSV manifest.

Every source becomes one :class:`SourceTable` with absolute paths (or URIs), integer labels
and a ``group`` (patient / slide / source image) used for leakage-proof splits.
"""

from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from raycyto.data.decode import is_uri
from raycyto.errors import DataError

MANIFEST_NAME = "manifest.csv"
REQUIRED_COLUMNS = ("path", "label")


@dataclass(frozen=True)
class SourceTable:
    """One row per source image.

    Attributes:
        df: columns path (absolute str or URI), label (int), label_name (str), group (str),
            plus any extra manifest columns.
        class_names: index = label int; sorted unless ``classes`` was given.
    """

    df: pd.DataFrame
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)


def _read_text(source: str) -> str:
    if is_uri(source):
        import pyarrow.fs as pafs

        try:
            fs, inner = pafs.FileSystem.from_uri(source)
            with fs.open_input_stream(inner) as f:
                return f.read().decode("utf-8-sig")
        except (OSError, ValueError) as e:
            raise DataError(f"manifest {source}: cannot read ({e})") from None
    return Path(source).read_text(encoding="utf-8-sig")


def _resolve(path: str, base: str) -> str:
    """Relative manifest paths are resolved against the manifest's folder (local or URI)."""
    if is_uri(path) or Path(path).is_absolute():
        return path
    if is_uri(base):
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, path))}"
    return str((Path(base) / path).resolve())


def _from_manifest(csv: str) -> pd.DataFrame:
    try:
        df = pd.read_csv(io.StringIO(_read_text(csv)), dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"manifest {csv} is empty: expected a header 'path,label[,group]'") from None
    except pd.errors.ParserError as e:
        raise DataError(f"manifest {csv} is not valid CSV: {e}") from None
    df.columns = [c.strip() for c in df.columns]
    for col in REQUIRED_COLUMNS:
        if col not in df.columns:
            raise DataError(f"manifest {csv} lacks the column '{col}' "
                            f"(has {list(df.columns)}; needs path,label[,group])")
    for col in REQUIRED_COLUMNS:
        blank = df.index[df[col].str.strip() == ""]
        if len(blank):
            raise DataError(f"manifest {csv}: empty '{col}' on data row {int(blank[0]) + 1}")
    base = posixpath.dirname(csv) if is_uri(csv) else str(Path(csv).resolve().parent)
    df["path"] = [_resolve(p.strip(), base) for p in df["path"]]
    df["label_name"] = df["label"].str.strip()
    if "group" not in df.columns:
        df["group"] = df["path"]
    df["group"] = [g.strip() or p for g, p in zip(df["group"], df["path"])]
    return df.drop(columns=["label"])


def _from_folder(root: Path) -> pd.DataFrame:
    # Every non-hidden file under root/<label>/ is listed, whatever its extension, so a
    # stray GIF or text file shows up in the bad-file report instead of vanishing.
    rows = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in sorted(label_dir.rglob("*")):
            hidden = any(part.startswith(".") for part in f.relative_to(root).parts)
            if f.is_file() and not hidden:
                rows.append({"path": str(f.resolve()), "label_name": label_dir.name})
    df = pd.DataFrame(rows, columns=["path", "label_name"])
    df["group"] = df["path"]
    return df


def unlisted_files(source: str | Path, table: SourceTable) -> list[str]:
    """Files under a manifest folder's ``<label>/`` sub-folders that the manifest does not list.

    They are not read (the manifest is the source of truth); callers report them so a file
    dropped next to a manifest does not go unnoticed. Empty for other kinds of source.
    """
    p = Path(str(source))
    if is_uri(str(source)) or not (p.is_dir() and (p / MANIFEST_NAME).is_file()):
        return []
    listed = set(table.df["path"])
    return [f for f in _from_folder(p)["path"] if f not in listed]


def read_source(source: str | Path, classes: Sequence[str] | None = None) -> SourceTable:
    """Read an image folder, a folder with manifest.csv, or a CSV manifest.

    Args:
        source: ``root/<label>/*`` folder; a folder holding ``manifest.csv``; or a CSV
            (local path or pyarrow.fs URI such as ``s3://bucket/x.csv``) with columns
            ``path,label[,group]`` + any metadata. Relative paths resolve against the CSV's folder.
        classes: select and order a subset of labels (e.g. ``["ALL", "HLT"]``).
    Returns:
        SourceTable; ``group`` defaults to the path when absent.
    Raises:
        DataError: the source does not exist, holds no images, lacks a column, or a
            requested class is absent.
    """
    src = str(source)
    if is_uri(src):
        if not src.lower().endswith(".csv"):
            raise DataError(f"source {src}: a URI source must be a CSV manifest (path,label[,group])")
        df = _from_manifest(src)
    else:
        p = Path(src)
        if not p.exists():
            raise DataError(f"source {src} does not exist (expected an image folder or a CSV manifest)")
        if p.is_dir() and (p / MANIFEST_NAME).is_file():
            df = _from_manifest(str(p / MANIFEST_NAME))
        elif p.is_dir():
            df = _from_folder(p)
        elif p.suffix.lower() == ".csv":
            df = _from_manifest(src)
        else:
            raise DataError(f"source {src} is a file but not a .csv manifest")
    if df.empty:
        raise DataError(f"source {src} has no images (expected root/<label>/<image> or manifest rows)")

    dup = df["path"][df["path"].duplicated()]
    if len(dup):
        raise DataError(f"source {src} lists {dup.iloc[0]} more than once "
                        "(an image in two rows could leak across folds)")
    present = sorted(df["label_name"].unique())
    if classes is not None:
        classes = [str(c) for c in classes]
        missing = [c for c in classes if c not in present]
        if missing:
            raise DataError(f"source {src}: classes {missing} not found; available: {present}")
        if len(set(classes)) != len(classes):
            raise DataError(f"classes {classes} contain duplicates")
        df = df[df["label_name"].isin(classes)]
        class_names = list(classes)
    else:
        class_names = present
    index = {c: i for i, c in enumerate(class_names)}
    df = df.assign(label=df["label_name"].map(index).astype("int64"))
    front = ["path", "label", "label_name", "group"]
    df = df[front + [c for c in df.columns if c not in front]].reset_index(drop=True)
    return SourceTable(df=df, class_names=class_names)
