"""raycyto.analysis: tables, figures and an HTML report from one sweep's experiment directory.

Python API (each table a pandas DataFrame)::

    from raycyto.analysis import load_experiment, summary_table, write_report
    exp = load_experiment("runs/karyo")
    summary_table(exp)                   # one row per (backbone, finetune, head)
    write_report("runs/karyo")           # -> runs/karyo/report/report.html

Imports are lazy so ``import raycyto.analysis`` stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_API = {
    "Experiment": "load", "ExperimentError": "load", "load_experiment": "load",
    "summary_table": "tables", "per_class_table": "tables", "folds_table": "tables",
    "hpo_table": "tables", "mispredictions_table": "tables", "selection_table": "tables",
    "select_best": "tables", "threshold_for_recall": "tables", "SelectionRule": "selection",
    "write_report": "report",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(f"raycyto.analysis.{_API[name]}"), name)
    raise AttributeError(f"module 'raycyto.analysis' has no attribute {name!r}")
