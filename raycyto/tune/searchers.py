"""Ray Tune ``Searcher`` classes used by ``raycyto.tune.search`` (imports Ray)."""

from __future__ import annotations

import json
import math
import pickle
import time
from pathlib import Path
from typing import Any, Optional

from ray.tune.search import Searcher

from raycyto.config import SearchConfig
from raycyto.tune.search import SEARCHERS


class RandomSearcher(Searcher):
    """Log-uniform lr and uniform batch-size choice from a seeded numpy Generator."""

    def __init__(self, lr, batch_sizes, metric: str, mode: str, seed: int) -> None:
        import numpy as np

        super().__init__(metric=metric, mode=mode)
        self._lr = (math.log(lr[0]), math.log(lr[1]))
        self._batch_sizes = list(batch_sizes)
        self._rng = np.random.default_rng(seed)

    def suggest(self, trial_id: str) -> dict[str, Any]:
        return {"lr": float(math.exp(self._rng.uniform(*self._lr))),
                "batch_size": int(self._rng.choice(self._batch_sizes))}

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        pass

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_bytes(pickle.dumps(self.__dict__))

    def restore(self, checkpoint_path: str) -> None:
        self.__dict__.update(pickle.loads(Path(checkpoint_path).read_bytes()))

class BayesOptSearcher(Searcher):
    """Gaussian-process Bayesian optimisation with ``bayes_opt.BayesianOptimization``.

    Args:
        bounds: parameter name -> (low, high), all continuous.
        metric, mode: the value to optimise and its direction.
        seed: random state of the GP optimiser.
    """

    def __init__(self, bounds: dict[str, tuple[float, float]], metric: str, mode: str, seed: int) -> None:
        from bayes_opt import BayesianOptimization

        super().__init__(metric=metric, mode=mode)
        self._optimizer = BayesianOptimization(f=None, pbounds=bounds, random_state=seed, verbose=0,
                                               allow_duplicate_points=True)
        self._sign = 1.0 if mode == "max" else -1.0
        self._pending: dict[str, dict[str, float]] = {}

    def suggest(self, trial_id: str) -> dict[str, float]:
        params = {k: float(v) for k, v in self._optimizer.suggest().items()}
        self._pending[trial_id] = params
        return params

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        params = self._pending.pop(trial_id, None)
        if params is None or error or not result or result.get(self.metric) is None:
            return
        value = float(result[self.metric])
        if math.isfinite(value):
            self._optimizer.register(params=params, target=self._sign * value)

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_bytes(pickle.dumps(self.__dict__))

    def restore(self, checkpoint_path: str) -> None:
        self.__dict__.update(pickle.loads(Path(checkpoint_path).read_bytes()))


class CellSearcher(Searcher):
    """One sub-searcher per grid cell; suggestions round-robin over cells.

    Args:
        cells: one dict per cell, e.g. ``{"backbone": ..., "finetune": ..., "head": ...}``.
        search: the ``search`` section (algorithm, samples, lr, batch_size, metric, seed).
        log_path: optional JSON-lines file; every ``on_trial_complete`` appends
            ``{trial_id, cell, value, error}`` (the value the sub-searcher learned from).
    """

    def __init__(self, cells: list[dict[str, Any]], search: SearchConfig,
                 log_path: Optional[str] = None) -> None:
        super().__init__(metric=search.metric, mode=search.resolved_mode)
        spec = SEARCHERS[search.algorithm]
        self.cells = [dict(c) for c in cells]
        self.samples = search.samples
        self._subs = []
        self._decoders = []
        for i in range(len(self.cells)):
            sub, decode = spec.build(tuple(search.lr), tuple(search.batch_size), search.metric,
                                     search.resolved_mode, search.seed + i)
            self._subs.append(sub)
            self._decoders.append(decode)
        self._issued = [0] * len(self.cells)
        self._next = 0
        self._trial_cell: dict[str, int] = {}
        self.log_path = log_path

    @property
    def total_samples(self) -> int:
        """Number of trials the whole sweep runs (cells x samples)."""
        return len(self.cells) * self.samples

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # metric and mode are fixed by the config

    def suggest(self, trial_id: str):
        if all(n >= self.samples for n in self._issued):
            return Searcher.FINISHED
        for _ in range(len(self.cells)):
            cell = self._next
            self._next = (self._next + 1) % len(self.cells)
            if self._issued[cell] < self.samples:
                break
        params = self._subs[cell].suggest(trial_id)
        if params is None or params == Searcher.FINISHED:
            self._next = cell  # ask the same cell again next time
            return None
        self._issued[cell] += 1
        self._trial_cell[trial_id] = cell
        return {**self.cells[cell], **self._decoders[cell](params), "cell": cell}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        cell = self._trial_cell.get(trial_id)
        if cell is not None:
            self._subs[cell].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        cell = self._trial_cell.get(trial_id)
        if cell is None:
            return
        self._subs[cell].on_trial_complete(trial_id, result=result, error=error)
        if self.log_path:
            value = None if not result else result.get(self.metric)
            line = {"trial_id": trial_id, "cell": cell, "metric": self.metric, "value": value,
                    "error": bool(error), "time": time.time()}
            with open(self.log_path, "a") as f:
                f.write(json.dumps(line) + "\n")

    def save(self, checkpoint_path: str) -> None:
        import cloudpickle

        Path(checkpoint_path).write_bytes(cloudpickle.dumps(self.__dict__))

    def restore(self, checkpoint_path: str) -> None:
        self.__dict__.update(pickle.loads(Path(checkpoint_path).read_bytes()))
