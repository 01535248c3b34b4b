"""Rich progress for a sweep: a Tune callback counting finished (trial, fold) steps."""

from __future__ import annotations

from typing import Any

from ray.tune import Callback


class RichProgress(Callback):
    """Progress bar over ``total`` fold steps; survives pickling (Tune stores callbacks with
    the run so ``Tuner.restore`` gets them back) by rebuilding the bar in ``setup``.

    Args:
        total: number of (trial, fold) steps of the whole sweep.
        metric: search metric shown as "best so far".
        enabled: False = silent.
    """

    def __init__(self, total: int, metric: str, enabled: bool = True) -> None:
        self.total, self.metric, self.enabled = total, metric, enabled
        self.seen: dict[str, int] = {}
        self.bar: Any = None

    def setup(self, **info: Any) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("folds  {task.fields[note]}"), TimeElapsedColumn(),
                            disable=not self.enabled)
        self.task = self.bar.add_task("folds", total=self.total, note="")
        self.bar.start()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.seen[trial.trial_id] = int(result.get("folds_done", 0))
        values = [t.last_result.get(self.metric) for t in trials if t.last_result]
        values = [v for v in values if v is not None]
        note = f"best {self.metric} {max(values):.3f}" if values else ""
        if self.bar is not None:
            self.bar.update(self.task, completed=sum(self.seen.values()), note=note)

    def on_experiment_end(self, trials, **info) -> None:
        if self.bar is not None:
            self.bar.stop()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["bar"] = None
        state.pop("task", None)
        return state
