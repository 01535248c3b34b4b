"""``raycyto export``: pick a trained model from a sweep and write a servable bundle.

Selection (validation data only; the test metrics are copied, never used to choose):
1. the trial: the best ``val_<metric>`` in ``results.csv`` (fold mean; highest wins, lowest
   for ``loss``; ties go to the first row), or the trial named with ``--trial``;
2. the fold: among ``checkpoints/<trial>/fold<k>/`` the fold whose best-epoch
   ``val_<metric>`` in ``histories/<trial>/fold<k>.csv`` is best (the checkpoint *is* that
   fold's best epoch). Folds without a history rank last; ties go to the lowest fold.

The checkpoint bundle is loaded (its checksums verified), enriched and saved again with
``raycyto.models.bundle.save_bundle``, so ``model.json`` carries the SHA-256 of each weights
file and ``load_bundle`` refuses a tampered copy.
"""

from __future__ import annotations

import json
import math
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from raycyto.analysis.load import read_csv
from raycyto.config import METRICS, metric_mode
from raycyto.data.decode import is_uri
from raycyto.errors import ConfigError, DataError
from raycyto.storage import copy_tree


def metric_column(metric: str) -> tuple[str, bool]:
    """``"auc"`` / ``"val_auc"`` -> (``"val_auc"``, higher_is_better)."""
    m = metric.removeprefix("val_")
    if m not in METRICS:
        raise ConfigError("--best", f"unknown metric {metric!r}; choose one of {list(METRICS)}")
    return f"val_{m}", metric_mode(m) == "max"


def _best_index(values: pd.Series, higher: bool) -> Any:
    v = pd.to_numeric(values, errors="coerce").dropna()
    if v.empty:
        return None
    return v.idxmax() if higher else v.idxmin()  # first occurrence on ties


def select_trial(results: pd.DataFrame, metric: str, trial_id: str | None = None) -> pd.Series:
    """The row of ``results.csv`` to export.

    Args:
        results: one row per trial (``trial_id``, ``val_<m>``, ...).
        metric: selection metric (``auc`` or ``val_auc``).
        trial_id: explicit choice; overrides the metric.
    Returns:
        the chosen row.
    """
    if trial_id is not None:
        rows = results[results["trial_id"].astype(str) == str(trial_id)]
        if rows.empty:
            raise ConfigError("--trial", f"trial {trial_id!r} not in results.csv; "
                                         f"known: {results['trial_id'].astype(str).tolist()[:20]}")
        return rows.iloc[0]
    col, higher = metric_column(metric)
    if col not in results.columns:
        raise DataError(f"results.csv has no column {col!r} (columns: {list(results.columns)})")
    idx = _best_index(results[col], higher)
    if idx is None:
        raise DataError(f"results.csv: no trial has a value for {col!r}; did every trial fail?")
    return results.loc[idx]


def _resolve(exp_dir: Path, value: Any, default: Path) -> Path:
    if isinstance(value, str) and value and value.lower() != "nan":
        p = Path(value)
        return p if p.is_absolute() else exp_dir / p
    return default


def select_fold(exp_dir: Path, row: pd.Series, metric: str) -> tuple[Path, int, float | None]:
    """The fold checkpoint of a trial with the best validation metric.

    Returns:
        (checkpoint folder, fold number, its best-epoch ``val_<metric>`` or None).
    """
    trial = str(row["trial_id"])
    ckpt_root = _resolve(exp_dir, row.get("checkpoint_dir"), exp_dir / "checkpoints" / trial)
    hist_root = _resolve(exp_dir, row.get("history_dir"), exp_dir / "histories" / trial)
    folds = sorted((int(p.name.removeprefix("fold")), p) for p in ckpt_root.glob("fold*")
                   if p.name.removeprefix("fold").isdigit() and (p / "model.json").is_file())
    if not folds:
        raise DataError(f"{ckpt_root}: no fold<k>/model.json checkpoint for trial {trial!r}")
    col, higher = metric_column(metric)
    scored = []
    for k, path in folds:
        hist = hist_root / f"fold{k}.csv"
        score = None
        if hist.is_file():
            h = pd.read_csv(hist)
            if col in h.columns and h[col].notna().any():
                score = float(h[col].max() if higher else h[col].min())
        scored.append((k, path, score))
    sign = 1.0 if higher else -1.0
    k, path, score = max(scored, key=lambda t: (t[2] is not None, sign * (t[2] or 0.0), -t[0]))
    return path, k, score


def _metrics(row: pd.Series, prefix: str) -> dict[str, float]:
    out = {}
    for m in METRICS:
        v = pd.to_numeric(pd.Series([row.get(f"{prefix}_{m}")]), errors="coerce").iloc[0]
        if not (isinstance(v, float) and math.isnan(v)):
            out[m] = float(v)
    return out


def export_model(exp_dir: str | Path, out: str | Path, best: str | None = None,
                 trial: str | None = None) -> Path | str:
    """Export the best (or a named) trial of a sweep as a verified model bundle.

    Args:
        exp_dir: experiment folder written by ``raycyto sweep``.
        out: destination folder (replaced if it already holds a bundle), or an object-store
            URI (``s3://bucket/models/x``, pass it as a string): the verified bundle is
            written locally, then copied there.
        best: selection metric (default: the experiment's configured ``select_metric``).
        trial: export this trial id instead of the best one.
    Returns:
        ``out`` (holding model.json + weight files).
    """
    import yaml

    from raycyto.models.bundle import load_bundle, save_bundle

    if is_uri(str(out)):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="raycyto-export-") as tmp:
            copy_tree(str(export_model(exp_dir, Path(tmp) / "model", best, trial)), str(out))
        return out
    exp_dir, out = Path(exp_dir), Path(out)
    results_csv = exp_dir / "results.csv"
    if not results_csv.is_file():
        raise DataError(f"{results_csv} not found: is {exp_dir} an experiment folder from `raycyto sweep`?")
    experiment = json.loads((exp_dir / "experiment.json").read_text()) if (exp_dir / "experiment.json").is_file() else {}
    config = yaml.safe_load((exp_dir / "config.yaml").read_text()) if (exp_dir / "config.yaml").is_file() else {}
    metric = best or experiment.get("select_metric") or ((config or {}).get("train") or {}).get("select_metric") or "auc"

    row = select_trial(read_csv(results_csv), metric, trial)
    ckpt, fold, fold_score = select_fold(exp_dir, row, metric)
    model, meta = load_bundle(ckpt)  # verifies the checkpoint's checksums

    mc = {**(meta.get("mc") or {}), **(experiment.get("mc") or {})}
    mc.setdefault("scope", "head")
    col, _ = metric_column(metric)
    enriched = {k: v for k, v in meta.items() if k != "files"}
    enriched.update({
        "name": f"{experiment.get('task') or (config or {}).get('name') or 'raycyto'}-{row['backbone']}-{row['head']}",
        "class_names": experiment.get("class_names") or meta.get("class_names"),
        "positive_class": experiment.get("positive_class", meta.get("positive_class")),
        "mc": mc,
        "config": config,
        "metrics": {"val": _metrics(row, "val"), "test": _metrics(row, "test")},
        "selection": {"metric": col, "trial_id": str(row["trial_id"]), "fold": fold,
                      "fold_val": fold_score, "source": str(exp_dir.resolve()),
                      "rule": "trial by fold-mean validation metric, then fold by best-epoch validation metric"},
        "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })

    if out.exists() and any(out.iterdir()) and not (out / "model.json").is_file():
        raise ConfigError("--out", f"{out} exists and is not a model bundle; choose an empty folder")
    tmp = out.with_name(out.name + ".tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    save_bundle(tmp, model, enriched)
    load_bundle(tmp)  # refuse to publish a bundle that does not verify
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
