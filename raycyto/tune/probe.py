"""The linear-probe baseline of every frozen-backbone sweep.

Per backbone and fold: scikit-learn's ``LogisticRegression`` on the standardised cached
features of the training rows (every augmented copy), its regularisation ``C`` chosen on
the fold's validation split by the same ``train.select_metric`` that picks a head's best
epoch, on exactly the folds the trained heads use. It costs seconds and tells a user at a
glance whether the trained heads add anything.

Its predictions, history (one row per ``C`` tried), and bundle (head ``probe``,
:class:`~raycyto.models.heads.LinearProbe`) are written like a trial's, under the trial id
``probe-<backbone>``; results.csv marks it ``baseline``. It is never selected or exported
unless named (``raycyto export --trial probe-<backbone>``).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import numpy as np
import pandas as pd

from raycyto.config import TrainConfig, metric_mode
from raycyto.tune.train import HeadData, Task, classification_metrics

#: Inverse regularisation strengths tried (chosen on validation).
PROBE_CS = tuple(float(c) for c in np.logspace(-4, 2, 7))
PROBE_HEAD = "probe"


def probe_trial_id(backbone: str) -> str:
    """``probe-<backbone>``: the probe's trial id in results.csv and predictions.parquet."""
    return f"{PROBE_HEAD}-{backbone}"


def fit_probe(data: HeadData, task: Task, train: TrainConfig, seed: int = 0,
              cs: tuple[float, ...] = PROBE_CS) -> tuple[Any, pd.DataFrame, int]:
    """Fit the probe for one fold, ``C`` chosen on validation.

    Args:
        data: training rows (every copy) and validation rows (copy 0) of the fold.
        task: classes and positive class.
        train: its ``select_metric`` ranks the ``C`` values (ties: lower validation loss, then smaller C).
        seed: solver seed.
        cs: the ``C`` values tried.

    Returns:
        (fitted :class:`~raycyto.models.heads.LinearProbe` in eval mode, history with one row
        per C (``epoch`` = its index, ``C``, ``val_<m>``), 1-based index of the chosen C).
    """
    import torch
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    from raycyto.models.heads import LinearProbe

    probe = LinearProbe(data.x_train.shape[1], task.num_classes)
    probe.norm.fit(data.x_train)
    with torch.no_grad():
        xt = probe.norm(torch.as_tensor(data.x_train, dtype=torch.float32)).cpu().numpy()
        xv = probe.norm(torch.as_tensor(data.x_val, dtype=torch.float32)).cpu().numpy()
    select, mode = train.select_metric, metric_mode(train.select_metric)
    rows, fitted = [], []
    for i, c in enumerate(cs, start=1):
        lr = LogisticRegression(C=c, max_iter=2000, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # the strongest C values on tiny folds
            lr.fit(xt, data.y_train)
        probs = _full_probs(lr, xv, task.num_classes)
        val = classification_metrics(data.y_val, probs, task.positive)
        rows.append({"epoch": i, "C": c, **{f"val_{k}": v for k, v in val.items()}})
        fitted.append(lr)
    history = pd.DataFrame(rows)
    sign = -1.0 if mode == "max" else 1.0
    key = history.assign(_s=history[select] * sign, _l=history["val_loss"])
    best = int(key.sort_values(["_s", "_l", "C"], na_position="last").iloc[0]["epoch"])
    probe.load_sklearn(fitted[best - 1])
    return probe.eval(), history, best


def _full_probs(model: Any, x: np.ndarray, num_classes: int) -> np.ndarray:
    """predict_proba with a column for every class (a class absent from training gets 0)."""
    probs = np.zeros((len(x), num_classes))
    probs[:, model.classes_] = model.predict_proba(x)
    return probs


class ProbeRunner:
    """A :class:`~raycyto.tune.trainable.FoldRunner` look-alike for ``run_fold``: the probe of
    one backbone on the cached features."""

    def __init__(self, backbone: str, ctx: Any) -> None:
        import ray

        from raycyto.models.classifier import build_classifier

        self.ctx, self.cfg = ctx, ctx.cfg
        self.config = {"backbone": backbone, "finetune": "frozen", "head": PROBE_HEAD}
        self.pre = ctx.preprocess(backbone)
        self.features = ray.get(ctx.feature_refs[backbone])
        self.bundle_model = build_classifier(backbone, PROBE_HEAD, ctx.task.num_classes, "frozen", pretrained=True)
        self.chosen_c: Optional[float] = None

    @property
    def hparams(self) -> dict:
        return {"C": self.chosen_c}

    def run(self, split: Any) -> Any:
        from raycyto.tune.trainable import FoldOutput, _evals, _used, fold_features, mc_seed

        fs, rows = fold_features(self.ctx, self.config["backbone"], self.features, split)
        train = rows["train"]
        data = HeadData(fs.features[train], fs.label[train], fs.features[rows["val"]], fs.label[rows["val"]])
        head, history, best = fit_probe(data, self.ctx.task, self.cfg.train, seed=mc_seed(self.cfg, split.fold))
        self.chosen_c = float(history.loc[best - 1, "C"])
        self.bundle_model.head = head
        return FoldOutput(self.bundle_model, history, _evals(fs, rows), _used(fs, rows, best),
                          (data.x_train, data.y_train))


def run_probes(ctx: Any, progress: bool = True) -> list[dict]:
    """Fit the probe of every cached backbone on every fold (files written like a trial's).

    Returns:
        one results.csv row per backbone (``baseline`` True, fold means of val/test metrics).
    """
    import time

    from raycyto.tune.trainable import fold_means, run_fold

    rows = []
    for backbone in (b for b in ctx.cfg.grid.backbones if b in ctx.feature_refs):  # pooled features cached
        t0 = time.time()
        runner, trial_id = ProbeRunner(backbone, ctx), probe_trial_id(backbone)
        done = {split.fold: run_fold(runner, split, trial_id) for split in ctx.splits}
        means = fold_means(done)
        rows.append({"trial_id": trial_id, "backbone": backbone, "finetune": "frozen", "head": PROBE_HEAD,
                     "lr": math.nan, "batch_size": math.nan, "status": "TERMINATED", "folds_done": len(done),
                     **means, "time_s": time.time() - t0, "baseline": True, "mc_dropout": False})
        if progress:
            from rich.console import Console

            Console(stderr=True).print(
                f"baseline probe {backbone}: validation accuracy {means['val_accuracy']:.3f}, "
                f"test accuracy {means['test_accuracy']:.3f} ({time.time() - t0:.1f}s, {len(done)} folds)")
    return rows
