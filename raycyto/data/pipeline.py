"""The Ray Data image pipeline: read bytes -> safe decode -> resize -> copies -> augment.

Both stages are ``Dataset.map_batches`` over plain functions (no per-worker setup cost
worth an actor: cv2 and pyarrow are imported once per worker process anyway). Every
output row depends only on its (path, copy), never on the batch or block it landed in,
so the bytes are the same whatever the worker count, block count or batch size.
Unreadable files become error rows (empty image, ``error`` = reason) that
:func:`split_errors` turns into the bad-file report.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from raycyto.data.augment import augment, get_policy, image_key
from raycyto.data.decode import MAX_PIXELS, DecodeError, load_image
from raycyto.data.sources import SourceTable

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger("raycyto.data")

ROW_COLUMNS = ("path", "label", "label_name", "group")
EMPTY_IMAGE_SHAPE = (0, 0, 3)  # error rows: same ndim as good images, zero pixels


def decode_batch(batch: dict[str, np.ndarray], image_size: int, max_pixels: int) -> dict[str, np.ndarray]:
    """Decode + resize each ``path`` of a batch; failures become error rows.

    Args:
        batch: columns of ROW_COLUMNS, [B] each.
    Returns:
        the batch plus ``image`` ([B] of [S,S,3] uint8, or [0,0,3] on error), ``error`` ([B]
        str) and ``fingerprint`` ([B] str: the perceptual hash of the decoded image for
        near-duplicate checks, ``raycyto.data.quality.fingerprint``; "" on error).
    """
    import cv2

    from raycyto.data.quality import fingerprint

    cv2.setNumThreads(1)  # one Ray task per CPU already; cv2's own threads would oversubscribe
    images, errors, prints = [], [], []
    for path in batch["path"]:
        try:
            images.append(load_image(str(path), image_size, max_pixels))
            prints.append(fingerprint(images[-1]))
            errors.append("")
        except DecodeError as e:
            images.append(np.zeros(EMPTY_IMAGE_SHAPE, np.uint8))
            errors.append(e.reason)
            prints.append("")
        except Exception as e:  # noqa: BLE001 - one odd file must not fail the whole dataset
            images.append(np.zeros(EMPTY_IMAGE_SHAPE, np.uint8))
            errors.append(f"unreadable ({type(e).__name__}: {e})")
            prints.append("")
    out = dict(batch)
    out["image"] = images
    out["error"] = np.array(errors, dtype=object)
    out["fingerprint"] = np.array(prints, dtype=object)
    return out


def expand_batch(batch: dict[str, np.ndarray], policy: str, copies: int, seed: int) -> dict[str, np.ndarray]:
    """Turn each good row into ``copies`` rows (copy 0 = original); error rows stay single.

    Returns:
        columns of ROW_COLUMNS + image, error, copy (int64); [B'] rows, B' = copies * good + bad.
    """
    cols: dict[str, list] = {c: [] for c in (*ROW_COLUMNS, "image", "error", "fingerprint", "copy")}
    for i, path in enumerate(batch["path"]):
        bad = bool(batch["error"][i])
        key = "" if bad else image_key(batch["image"][i])  # content, not location
        for c in range(1 if bad else copies):
            for name in ROW_COLUMNS:
                cols[name].append(batch[name][i])
            img = batch["image"][i]
            cols["image"].append(img if bad else augment(img, policy, seed, key, c))
            cols["error"].append(batch["error"][i])
            cols["fingerprint"].append(batch["fingerprint"][i])
            cols["copy"].append(c)
    out = {k: np.array(v, dtype=object) for k, v in cols.items() if k not in ("image", "label", "copy")}
    out["label"] = np.array(cols["label"], dtype=np.int64)
    out["copy"] = np.array(cols["copy"], dtype=np.int64)
    same = len({im.shape for im in cols["image"]}) == 1
    out["image"] = np.stack(cols["image"]) if same else cols["image"]  # [B', S, S, 3] when all ok
    return out


def image_dataset(table: SourceTable, image_size: int, policy: str = "none", copies: int = 1,
                  seed: int = 0, max_pixels: int = MAX_PIXELS, batch_size: int = 32,
                  num_blocks: int | None = None, concurrency: int | None = None) -> "ray.data.Dataset":
    """A lazy Ray Dataset of decoded, resized and augmented images.

    Args:
        table: the source (see sources.read_source).
        image_size: S, every image is resized to S x S.
        policy: augmentation policy name (augment.POLICIES).
        copies: rows per readable source image: copy 0 the original, 1.. augmented.
        seed: augmentation seed.
        max_pixels: decompression-bomb guard.
        batch_size: rows per map_batches call (does not change the output bytes).
        num_blocks: input blocks (parallel tasks); default ceil(N / batch_size).
        concurrency: max concurrent tasks per stage (None = as many as CPUs allow).
    Returns:
        Dataset with rows image [S,S,3] uint8 ([0,0,3] on error), label, label_name, path,
        group, copy (int), error (str, "" when ok).
    """
    import ray.data

    get_policy(policy)  # fail before any work on an unknown name
    if copies < 1:
        from raycyto.errors import ConfigError

        raise ConfigError("data.copies", f"must be >= 1, got {copies}")
    df = table.df[list(ROW_COLUMNS)].astype({"path": str, "label_name": str, "group": str})
    blocks = num_blocks or max(1, min(len(df), math.ceil(len(df) / batch_size), 256))
    bounds = np.linspace(0, len(df), blocks + 1).astype(int)
    # one DataFrame per block (from_pandas' own override_num_blocks fails on Ray 2.60)
    ds = ray.data.from_pandas([df.iloc[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a])
    ds = ds.map_batches(decode_batch, batch_format="numpy", batch_size=batch_size,
                        fn_kwargs={"image_size": image_size, "max_pixels": max_pixels},
                        concurrency=concurrency)
    # bound the rows one expand call emits (batch x copies) so blocks stay small with copies=33
    return ds.map_batches(expand_batch, batch_format="numpy", batch_size=max(1, batch_size // copies),
                          fn_kwargs={"policy": policy, "copies": copies, "seed": seed},
                          concurrency=concurrency)


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to ``RAY_ADDRESS`` when set (e.g. under ``ray job submit``), else start a local
    Ray with ``num_cpus`` (default ``RAYCYTO_NUM_CPUS`` or every local core); then quiet Ray
    Data's own progress output, since raycyto's commands print theirs."""
    import os

    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        else:
            cpus = num_cpus or int(os.environ.get("RAYCYTO_NUM_CPUS", os.cpu_count() or 1))
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    quiet_ray_data()


def quiet_ray_data() -> None:
    """Turn off Ray Data's progress bars and per-dataset INFO lines (for rich CLIs, benchmarks)."""
    import ray.data

    for name in ("ray.data", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def report_bad_files(bad: pd.DataFrame, first: int = 5) -> None:
    """Log a warning with the number of bad files and the first few (path: reason)."""
    if len(bad):
        listed = "; ".join(f"{p}: {r}" for p, r in zip(bad["path"][:first], bad["reason"][:first]))
        more = f" (+{len(bad) - first} more)" if len(bad) > first else ""
        log.warning("%d bad file(s) skipped and reported: %s%s", len(bad), listed, more)


def bad_file_report(ds: "ray.data.Dataset") -> pd.DataFrame:
    """The bad-file report of an :func:`image_dataset`: (path, reason) sorted by path.

    Only the path and error columns reach the driver, never the images. A warning lists the
    count and the first bad paths.
    """
    return _bad_rows(ds.select_columns(["path", "error"]).to_pandas())


def scan_images(ds: "ray.data.Dataset") -> tuple[pd.DataFrame, dict[str, str]]:
    """One pass over an :func:`image_dataset`: the bad-file report and the fingerprint of every
    readable image (copy 0), ``{path: fingerprint}`` (only these columns reach the driver)."""
    rows = ds.select_columns(["path", "error", "fingerprint", "copy"]).to_pandas()
    good = rows[(rows["error"].astype(str) == "") & (rows["copy"] == 0)]
    return _bad_rows(rows), dict(zip(good["path"].astype(str), good["fingerprint"].astype(str)))


def _bad_rows(rows: pd.DataFrame) -> pd.DataFrame:
    bad = rows[rows["error"].astype(str) != ""].rename(columns={"error": "reason"})
    # an empty result may have no columns at all: reindex so the report always has both
    bad = bad.reindex(columns=["path", "reason"]).astype({"path": str, "reason": str})
    bad = bad.sort_values("path").reset_index(drop=True)
    report_bad_files(bad)
    return bad


def split_errors(ds: "ray.data.Dataset") -> tuple["ray.data.Dataset", pd.DataFrame]:
    """Separate good rows from the bad-file report; the dataset is materialised once.

    Returns:
        (dataset of rows with error == "", DataFrame path, reason sorted by path).
        A warning lists the count and the first bad paths.
    """
    from ray.data.expressions import col

    ds = ds.materialize()
    bad = bad_file_report(ds)
    ok = ds.filter(expr=col("error") == "")
    # good rows all have [S,S,3] images: stack them so `image` is a fixed-shape tensor column
    return ok.map_batches(_stack_images, batch_format="numpy", batch_size=256), bad


def _stack_images(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    batch = dict(batch)
    batch["image"] = np.stack(list(batch["image"]))  # [B, S, S, 3]
    return batch


def load_arrays(ds: "ray.data.Dataset") -> dict[str, np.ndarray]:
    """Materialise good rows as numpy arrays sorted by (path, copy).

    Error rows are left out and reported by a warning (use split_errors for the report).

    Returns:
        image [N,S,S,3] uint8, label [N] int64, label_name, path, group [N] str, copy [N] int64.
    """
    cols: dict[str, list] = {c: [] for c in (*ROW_COLUMNS, "image", "copy", "error")}
    for batch in ds.iter_batches(batch_format="numpy", batch_size=256):  # fingerprints stay behind
        for c in cols:
            cols[c].extend(list(batch[c]))
    errors = np.array(cols.pop("error"), dtype=object)
    ok = errors == ""
    if (~ok).any():
        bad = pd.DataFrame({"path": np.array(cols["path"], dtype=object)[~ok], "reason": errors[~ok]})
        report_bad_files(bad)
    out = {c: np.array(v, dtype=object)[ok] for c, v in cols.items() if c != "image"}
    order = np.lexsort((out["copy"].astype(np.int64), out["path"].astype(str)))  # path, then copy
    images = [cols["image"][i] for i in np.flatnonzero(ok)[order]]
    result = {
        "image": np.stack(images) if images else np.zeros((0, 0, 0, 3), np.uint8),  # [N,S,S,3]
        "label": out["label"][order].astype(np.int64),
        "label_name": out["label_name"][order].astype(str),
        "path": out["path"][order].astype(str),
        "group": out["group"][order].astype(str),
        "copy": out["copy"][order].astype(np.int64),
    }
    return result
