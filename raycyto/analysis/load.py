"""Read and validate an experiment directory written by ``raycyto sweep``.

The contract ("experiment directory" in docs/ARCHITECTURE.md)::

    EXP_DIR/config.yaml, experiment.json, results.csv, predictions.parquet,
            histories/<trial_id>/fold<k>.csv, checkpoints/<trial_id>/fold<k>/

Every problem raises :class:`ExperimentError` naming the file and the field that is
missing or wrong, so ``raycyto report`` can print it and exit 2.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

import numpy as np
import pandas as pd

from raycyto.errors import RaycytoError

T = TypeVar("T")
REQUIRED_FILES = ("config.yaml", "experiment.json", "results.csv", "predictions.parquet")
CELL = ["backbone", "finetune", "head"]   # one configuration of the grid
RESULTS_COLUMNS = ["trial_id", *CELL, "lr", "batch_size", "status"]
PRED_COLUMNS = ["trial_id", *CELL, "fold", "split", "path", "label", "pred",
                "mc_label", "mc_confidence", "refer"]
FAILED_STATUSES = {"error", "failed", "errored"}


class ExperimentError(RaycytoError):
    """EXP_DIR is not a readable raycyto experiment; the message names the file and field."""


@dataclass
class Experiment:
    """One sweep's results, as read from its experiment directory.

    Attributes:
        exp_dir: the experiment directory.
        meta: experiment.json as a dict.
        config_text: config.yaml verbatim.
        results: results.csv, one row per trial (search sample).
        predictions: predictions.parquet; ``label``/``pred``/``mc_label`` as class indices.
        class_names: index = label int.
        positive: index of the positive class (binary: required; multiclass: optional).
        threshold: the configured MC confidence threshold (refer when below).
    """

    exp_dir: Path
    meta: dict[str, Any]
    config_text: str
    results: pd.DataFrame
    predictions: pd.DataFrame
    class_names: list[str]
    positive: int | None
    threshold: float
    progress: bool = False                                              # rich bars on long loops
    cache: dict[Any, Any] = field(default_factory=dict, repr=False)   # derived tables

    def track(self, items: Iterable[T], total: int, description: str) -> Iterator[T]:
        """``items``, with a transient rich progress bar when ``progress`` is on."""
        from rich.console import Console

        console = Console(stderr=True)
        if not self.progress or total < 2 or not console.is_terminal:
            yield from items
            return
        from rich.progress import Progress

        with Progress(console=console, transient=True) as bar:
            task = bar.add_task(description, total=total)
            for item in items:
                yield item
                bar.advance(task)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def binary(self) -> bool:
        return self.num_classes == 2

    @property
    def prob_columns(self) -> list[str]:
        return [f"prob_{c}" for c in self.class_names]

    @property
    def mc_mean_columns(self) -> list[str]:
        return [f"mc_mean_{c}" for c in self.class_names]

    @cached_property
    def val_predictions(self) -> pd.DataFrame:
        """Rows with split == 'val' (the only predictions selection may read)."""
        return self.predictions[self.predictions["split"] == "val"]

    @cached_property
    def test_predictions(self) -> pd.DataFrame:
        """Rows with split == 'test'."""
        return self.predictions[self.predictions["split"] == "test"]

    @cached_property
    def baseline_mask(self) -> pd.Series:
        """Per trial_id: True for baselines (the linear probe), never selected or exported
        unless named (results.csv ``baseline``; older sweeps: head == "probe")."""
        res = self.results.set_index("trial_id")
        if "baseline" in res:
            return res["baseline"].astype(str).str.lower().isin(("true", "1"))
        return res["head"].astype(str) == "probe"

    @cached_property
    def mc_dropout_mask(self) -> pd.Series:
        """Per trial_id: True when the model's MC passes can differ (dropout at prediction time).

        results.csv ``mc_dropout``; older sweeps: whether any MC confidence is below 1.
        Configurations without it have no referral figures (NaN, "no MC dropout").
        """
        res = self.results.set_index("trial_id")
        if "mc_dropout" in res:
            return res["mc_dropout"].astype(str).str.lower().isin(("true", "1"))
        varies = self.predictions.groupby("trial_id")["mc_confidence"].min() < 1.0
        return varies.reindex(res.index).fillna(False).astype(bool)

    def history(self, trial_id: str) -> dict[int, pd.DataFrame]:
        """Per-epoch history of one trial, ``{fold: DataFrame}``; empty when none was written."""
        folder = self.exp_dir / "histories" / str(trial_id)
        out: dict[int, pd.DataFrame] = {}
        for path in sorted(folder.glob("fold*.csv")):
            try:
                fold = int(path.stem.removeprefix("fold"))
            except ValueError:
                continue
            out[fold] = read_csv(path)
        return out


MAIN_JOB_EXPERIMENT = "experiment"   # raycyto run writes runs/<task>/{data,experiment,report,model}


def resolve_experiment_dir(path: str | Path) -> Path:
    """An experiment folder, or a main-job folder (``runs/demo``) -> the experiment folder.

    Raises:
        ExperimentError: neither ``path`` nor ``path/experiment`` holds results.csv.
    """
    path = Path(path)
    if (path / "results.csv").is_file() or not (path / MAIN_JOB_EXPERIMENT / "results.csv").is_file():
        return path  # load_experiment names what is missing
    return path / MAIN_JOB_EXPERIMENT


def main_job_root(exp_dir: str | Path) -> Path | None:
    """``runs/demo`` for a main job's ``runs/demo/experiment``, else None."""
    exp_dir = Path(exp_dir)
    if exp_dir.name == MAIN_JOB_EXPERIMENT and (exp_dir.parent / "data").is_dir():
        return exp_dir.parent
    return None


def default_report_dir(exp_dir: str | Path) -> Path:
    """``runs/demo/report`` beside a main job's experiment folder, else ``EXP_DIR/report``."""
    return (main_job_root(exp_dir) or Path(exp_dir)) / "report"


def _fail(path: Path, message: str) -> ExperimentError:
    return ExperimentError(f"{path}: {message}")


def read_csv(path: str | Path) -> pd.DataFrame:
    """Read a CSV that raycyto wrote (results.csv, summary.csv, histories...).

    ``trial_id`` is always read as text: Ray's 8-hex-digit trial ids such as ``12345678``
    or ``3e104512`` would otherwise come back as numbers (about 1 trial in 25).
    """
    path = Path(path)
    try:
        return pd.read_csv(path, dtype={"trial_id": str})
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise _fail(path, f"cannot read CSV ({exc})") from exc


def _require_columns(df: pd.DataFrame, columns: list[str], path: Path) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise _fail(path, f"missing column(s) {missing}; found {list(df.columns)}. "
                          "Was it written by `raycyto sweep`?")


def _class_index(value: Any, class_names: list[str], path: Path, field_name: str) -> int:
    """A class given by name or index -> index."""
    if isinstance(value, str) and value in class_names:
        return class_names.index(value)
    if isinstance(value, (int, np.integer)) and 0 <= int(value) < len(class_names):
        return int(value)
    raise _fail(path, f"{field_name}={value!r} is not one of the classes {class_names}")


def _to_index(series: pd.Series, class_names: list[str], path: Path, column: str) -> np.ndarray:
    """Label column (ints or class names) -> int array [N]; unknown values raise."""
    if series.dtype == object or pd.api.types.is_string_dtype(series):
        lookup = {c: i for i, c in enumerate(class_names)}
        mapped = series.map(lambda v: lookup.get(v, lookup.get(str(v), -1)))
        bad = series[mapped < 0]
        if len(bad):
            # Maybe strings of ints ("0", "1").
            try:
                ints = series.astype(int)
            except (TypeError, ValueError):
                raise _fail(path, f"column {column!r} has unknown class {bad.iloc[0]!r}; "
                                  f"classes are {class_names}") from None
            series = ints
        else:
            return mapped.to_numpy(dtype=np.int64)
    values = series.to_numpy()
    if pd.isna(values).any():
        raise _fail(path, f"column {column!r} has missing values")
    values = values.astype(np.int64)
    out_of_range = (values < 0) | (values >= len(class_names))
    if out_of_range.any():
        raise _fail(path, f"column {column!r} has class index {values[out_of_range][0]} "
                          f"outside 0..{len(class_names) - 1}")
    return values


def _read_predictions(path: Path, progress: bool) -> pd.DataFrame:
    """Read predictions.parquet batch by batch, with a progress bar for large files."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise _fail(path, f"cannot read Parquet ({exc})") from exc
    n_groups = pf.metadata.num_row_groups
    tables = []
    if progress and n_groups > 1:  # only a multi-row-group file is worth a bar
        from rich.console import Console
        from rich.progress import Progress

        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(f"reading {path.name}", total=n_groups)
            for i in range(n_groups):
                tables.append(pf.read_row_group(i))
                bar.advance(task)
    else:
        if progress:
            from rich.console import Console

            with Console(stderr=True).status(f"reading {path.name} "
                                              f"({pf.metadata.num_rows} rows)"):
                tables = [pf.read()]
        else:
            tables = [pf.read()]
    import pyarrow as pa

    return pa.concat_tables(tables).to_pandas()


def load_experiment(exp_dir: str | Path, progress: bool = False) -> Experiment:
    """Read and validate an experiment directory.

    Args:
        exp_dir: folder written by ``raycyto sweep``.
        progress: show rich progress bars while reading large files.

    Returns:
        The validated :class:`Experiment`.

    Raises:
        ExperimentError: a required file, field or column is missing or invalid (named).
    """
    exp_dir = Path(exp_dir)
    if not exp_dir.is_dir():
        raise ExperimentError(f"{exp_dir}: not a directory; pass the EXP_DIR written by "
                              "`raycyto sweep` (or a main-job folder such as runs/demo)")
    missing = [f for f in REQUIRED_FILES if not (exp_dir / f).is_file()]
    if missing:
        raise ExperimentError(
            f"{exp_dir} is not a raycyto experiment: missing {', '.join(missing)} "
            f"(expected {', '.join(REQUIRED_FILES)} written by `raycyto sweep`)")

    meta_path = exp_dir / "experiment.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise _fail(meta_path, f"not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise _fail(meta_path, "must hold a JSON object")
    class_names = meta.get("class_names")
    if not isinstance(class_names, list) or len(class_names) < 2:
        raise _fail(meta_path, "field 'class_names' must list at least two classes")
    class_names = [str(c) for c in class_names]
    mc = meta.get("mc")
    if not isinstance(mc, dict) or not isinstance(mc.get("threshold"), (int, float)):
        raise _fail(meta_path, "field 'mc.threshold' (the MC confidence threshold) is missing")
    pos_value = meta.get("positive_class")
    if pos_value is None:
        if len(class_names) == 2:
            raise _fail(meta_path, "field 'positive_class' is required for a binary task")
        positive = None
    else:
        positive = _class_index(pos_value, class_names, meta_path, "positive_class")

    results_path = exp_dir / "results.csv"
    results = read_csv(results_path)
    _require_columns(results, RESULTS_COLUMNS, results_path)
    if results.empty:
        raise _fail(results_path, "has no trials")
    if results["trial_id"].duplicated().any():
        dup = results.loc[results["trial_id"].duplicated(), "trial_id"].iloc[0]
        raise _fail(results_path, f"trial_id {dup!r} appears twice")

    pred_path = exp_dir / "predictions.parquet"
    preds = _read_predictions(pred_path, progress)
    prob_cols = [f"prob_{c}" for c in class_names]
    _require_columns(preds, PRED_COLUMNS + prob_cols, pred_path)
    preds["trial_id"] = preds["trial_id"].astype(str)
    for col in ("label", "pred", "mc_label"):
        preds[col] = _to_index(preds[col], class_names, pred_path, col)
    preds["fold"] = preds["fold"].astype(int)
    preds["refer"] = preds["refer"].astype(bool)
    bad_split = set(preds["split"].unique()) - {"val", "test"}
    if bad_split:
        raise _fail(pred_path, f"column 'split' has value(s) {sorted(bad_split)}; "
                               "expected 'val' or 'test'")
    unknown = set(preds["trial_id"]) - set(results["trial_id"])
    if unknown:
        raise _fail(pred_path, f"trial_id {sorted(unknown)[0]!r} is not in results.csv")
    if preds[prob_cols].isna().any().any():
        raise _fail(pred_path, "prob_* columns contain missing values")

    config_text = (exp_dir / "config.yaml").read_text()
    return Experiment(exp_dir=exp_dir, meta=meta, config_text=config_text, results=results,
                      predictions=preds, class_names=class_names, positive=positive,
                      threshold=float(mc["threshold"]), progress=progress)
