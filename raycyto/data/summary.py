"""Plain tables about a source and its splits: class/group counts, per-fold class table.

Shared by ``raycyto data inspect`` and the sweep's ``experiment.json`` (``data`` key).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from raycyto.data.sources import SourceTable
from raycyto.data.splits import Split

SPLIT_NAMES = ("train", "val", "test")


def class_table(table: SourceTable) -> pd.DataFrame:
    """One row per class: class, images, groups (distinct group ids)."""
    df = table.df
    rows = [{"class": name,
             "images": int((df["label"] == i).sum()),
             "groups": int(df.loc[df["label"] == i, "group"].nunique())}
            for i, name in enumerate(table.class_names)]
    return pd.DataFrame(rows, columns=["class", "images", "groups"])


def fold_table(table: SourceTable, splits: Sequence[Split]) -> pd.DataFrame:
    """Rows (fold, split) with the image count of each class, the total and the group count."""
    labels = table.df["label"].to_numpy()
    groups = table.df["group"].to_numpy()
    rows = []
    for s in splits:
        for name in SPLIT_NAMES:
            idx = getattr(s, name)
            counts = np.bincount(labels[idx], minlength=table.num_classes)
            rows.append({"fold": s.fold, "split": name,
                         **{c: int(n) for c, n in zip(table.class_names, counts)},
                         "total": int(len(idx)), "groups": int(len(np.unique(groups[idx])))})
    return pd.DataFrame(rows)


def data_summary(table: SourceTable, splits: Sequence[Split], bad: pd.DataFrame) -> dict:
    """The ``data`` block of experiment.json.

    Returns:
        {n_images, class_counts {name: n}, n_groups, folds [{fold, train, val, test}] (image
        counts), bad_files [{path, reason}]}.
    """
    counts = class_table(table)
    return {
        "n_images": int(len(table.df)),
        "class_counts": dict(zip(counts["class"], counts["images"].astype(int).tolist())),
        "n_groups": int(table.df["group"].nunique()),
        "folds": [{"fold": s.fold, **{n: int(len(getattr(s, n))) for n in SPLIT_NAMES}} for s in splits],
        "bad_files": bad[["path", "reason"]].to_dict("records"),
    }


def without_paths(table: SourceTable, paths: Sequence[str]) -> SourceTable:
    """The table without the given (bad) paths, index reset; class names unchanged."""
    df = table.df[~table.df["path"].isin(set(paths))].reset_index(drop=True)
    return SourceTable(df=df, class_names=list(table.class_names))
