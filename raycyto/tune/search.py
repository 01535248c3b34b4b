"""Bayesian search per grid cell inside ONE Tune run.

``CellSearcher`` holds one sub-searcher per (backbone, finetune, head) cell and routes
``suggest`` / ``on_trial_complete`` by cell, round-robin, ``samples`` suggestions per
cell. Each sub-searcher therefore learns only from its own cell's fold-averaged
validation metric. Sub-searchers come from the ``SEARCHERS`` registry.

Example::

    searcher = CellSearcher(cells=[{"backbone": "efficientnet_lite0", "finetune": "frozen",
                                    "head": "a"}], search=cfg.search)
    TuneConfig(search_alg=searcher, num_samples=searcher.total_samples)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:  # pragma: no cover
    from ray.tune.search import Searcher

    from raycyto.config import SearchConfig

Decode = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class SearcherSpec:
    """How to build one sub-searcher for the (lr, batch_size) space.

    ``build(lr, batch_sizes, metric, mode, seed)`` returns ``(searcher, decode)`` where
    ``decode`` maps the searcher's suggestion to ``{"lr": float, "batch_size": int}``.
    """

    name: str
    build: Callable[[tuple[float, float], tuple[int, ...], str, str, int], tuple["Searcher", Decode]]


def _identity(params: dict[str, Any]) -> dict[str, Any]:
    return {"lr": float(params["lr"]), "batch_size": int(params["batch_size"])}


def _tune_space(lr: tuple[float, float], batch_sizes: tuple[int, ...]) -> dict[str, Any]:
    from ray import tune

    return {"lr": tune.loguniform(lr[0], lr[1]), "batch_size": tune.choice(list(batch_sizes))}


def _optuna(lr, batch_sizes, metric, mode, seed):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one "study created" line per cell otherwise

    return OptunaSearch(OptunaSearch.convert_search_space(_tune_space(lr, batch_sizes)), metric=metric, mode=mode, seed=seed), _identity


def _hyperopt(lr, batch_sizes, metric, mode, seed):
    from ray.tune.search.hyperopt import HyperOptSearch

    searcher = HyperOptSearch(HyperOptSearch.convert_search_space(_tune_space(lr, batch_sizes)), metric=metric, mode=mode,
                              random_state_seed=seed, n_initial_points=4)
    return searcher, _identity


def _bayesopt(lr, batch_sizes, metric, mode, seed):
    """Gaussian-process search (bayes_opt); continuous log(lr) and a batch-size index in [0, n).

    Ray's ``BayesOptSearch`` targets bayes_opt < 2 (``UtilityFunction`` is gone in the
    installed 3.x), so ``searchers.BayesOptSearcher`` drives bayes_opt's own
    suggest/register API directly.
    """
    from raycyto.tune.searchers import BayesOptSearcher

    bounds = {"log_lr": (math.log(lr[0]), math.log(lr[1])),
              "batch_index": (0.0, float(len(batch_sizes)))}
    searcher = BayesOptSearcher(bounds, metric=metric, mode=mode, seed=seed)

    def decode(params: dict[str, Any]) -> dict[str, Any]:
        index = min(int(params["batch_index"]), len(batch_sizes) - 1)
        lr_value = min(max(math.exp(params["log_lr"]), lr[0]), lr[1])  # exp(log(x)) may round past x
        return {"lr": float(lr_value), "batch_size": int(batch_sizes[index])}

    return searcher, decode


def _random(lr, batch_sizes, metric, mode, seed):
    from raycyto.tune.searchers import RandomSearcher

    return RandomSearcher(lr, batch_sizes, metric=metric, mode=mode, seed=seed), _identity


#: algorithm name -> spec. Keys are what ``search.algorithm`` accepts.
SEARCHERS: dict[str, SearcherSpec] = {
    "optuna": SearcherSpec("optuna", _optuna),  # TPE
    "hyperopt": SearcherSpec("hyperopt", _hyperopt),
    "bayesopt": SearcherSpec("bayesopt", _bayesopt),
    "random": SearcherSpec("random", _random),
}


def CellSearcher(cells: list[dict[str, Any]], search: "SearchConfig", log_path: Optional[str] = None):  # noqa: N802
    """Build the per-cell ``Searcher`` (``raycyto.tune.searchers.CellSearcher``)."""
    from raycyto.tune.searchers import CellSearcher as _CellSearcher

    return _CellSearcher(cells, search, log_path)


def read_search_log(path: str | Path) -> list[dict[str, Any]]:
    """Rows of the JSON-lines log written by ``CellSearcher`` (empty when absent)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
