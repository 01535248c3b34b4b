"""Sweep building blocks without Ray: training loop, metrics, per-cell searchers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raycyto.config import SEARCH_ALGORITHMS, TrainConfig, load_config
from raycyto.tune.search import SEARCHERS, CellSearcher
from raycyto.tune.train import HeadData, HParams, Task, classification_metrics, train_head


def _blobs(n=60, d=16, classes=2, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = (rng.normal(size=(n, d)) + y[:, None] * 1.5).astype(np.float32)  # [N, D]
    return x, y


def _train(head="a", seed=0, lr=1e-2, **train):
    x, y = _blobs()
    return train_head(head, HeadData(x[:40], y[:40], x[40:], y[40:], groups_train=np.arange(40).astype(str)),
                      task=Task(2, positive=1), train=TrainConfig(**{"epochs": 4, **train}),
                      hp=HParams(lr=lr, batch_size=8), seed=seed)


def test_train_head_is_deterministic_on_cpu():
    a, b = _train(seed=3), _train(seed=3)
    assert a.history.equals(b.history)
    for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert torch.equal(p, q)
    assert not _train(seed=4).history.equals(a.history)


def test_best_epoch_by_select_metric_is_the_model_returned():
    x, y = _blobs()
    res = _train(select_metric="val_loss", epochs=5)
    assert res.best_epoch == int(res.history["val_loss"].idxmin()) + 1
    from raycyto.tune.train import array_batches, predict_probs

    probs, labels = predict_probs(res.model, array_batches(x[40:], y[40:], 64)(0))
    assert classification_metrics(labels, probs, 1)["loss"] == pytest.approx(res.best["val_loss"], abs=1e-6)
    assert {"train_loss", "train_accuracy", "val_precision", "val_recall", "val_auc"} <= set(res.history)


def test_bf16_precision_runs_the_forward_in_bf16_and_keeps_metrics_fp32():
    from raycyto.models.heads import build_head
    from raycyto.tune.train import array_batches, fit

    x, y = _blobs()
    dtypes = []

    def forward(model, xb):
        logits = model(xb)
        dtypes.append(logits.dtype)
        return logits

    torch.manual_seed(0)
    res = fit(build_head("a", 16, 2), array_batches(x[:40], y[:40], 8, seed=0),
              lambda: array_batches(x[40:], y[40:], 64)(0), task=Task(2, positive=1),
              train=TrainConfig(epochs=3, precision="bf16"), hp=HParams(lr=1e-2, batch_size=8), forward=forward)
    assert set(dtypes) == {torch.bfloat16}  # autocast on (CPU here, the trial's GPU on a cluster)
    assert res.history.notna().all().all() and res.best["val_accuracy"] > 0.8
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in res.model.parameters())
    fp32 = _train(epochs=3)
    assert fp32.history["val_accuracy"].iloc[-1] == pytest.approx(res.history["val_accuracy"].iloc[-1], abs=0.1)


def test_worker_device_is_the_cpu_without_a_visible_gpu():
    from raycyto.device import autocast, worker_device

    assert worker_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="precision"):
        autocast("cpu", "fp16")


def test_head_b_is_head_a_followed_by_a_calibrated_svm():
    res = _train("b")
    assert bool(res.model.svm_fitted)
    x, y = _blobs()
    with torch.no_grad():
        svm = res.model.eval()(torch.as_tensor(x[40:])).softmax(1).numpy()
    z = res.model.penultimate(torch.as_tensor(x[40:])).detach().double().numpy()
    np.testing.assert_allclose(svm, res.model._sklearn.predict_proba(z), atol=1e-5)  # the SVM answers, not head a


def test_early_stopping_stops_and_restores_the_best_epoch():
    x, y = _blobs()
    noise = np.random.default_rng(5).permutation(y[:40])  # training labels unrelated to x: overfits
    res = train_head("c", HeadData(x[:40], noise, x[40:], y[40:]), task=Task(2, positive=1),
                     train=TrainConfig(epochs=60, patience=3, select_metric="val_loss"),
                     hp=HParams(lr=1e-2, batch_size=8), seed=0)
    assert len(res.history) < 60  # stopped early
    assert len(res.history) - res.best_epoch == 3  # patience epochs after the best one
    assert res.best["val_loss"] == pytest.approx(res.history["val_loss"].min())


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_lr_schedule_gives_each_epoch_its_learning_rate(schedule):
    x, y = _blobs()
    res = train_head("a", HeadData(x[:40], y[:40], x[40:], y[40:]), task=Task(2, positive=1),
                     train=TrainConfig(epochs=6, schedule=schedule), hp=HParams(lr=1e-2, batch_size=8), seed=0)
    e = np.arange(6)
    want = 1e-2 * (1 + np.cos(np.pi * e / 6)) / 2 if schedule == "cosine" else np.full(6, 1e-2)
    np.testing.assert_allclose(res.history["lr"].to_numpy(), want, rtol=1e-6)


def test_search_algorithms_beside_the_config_are_exactly_the_registry():
    assert set(SEARCH_ALGORITHMS) == set(SEARCHERS)


def test_classification_metrics_match_sklearn():
    from sklearn.metrics import f1_score, recall_score, roc_auc_score

    rng = np.random.default_rng(0)
    y = np.arange(30) % 3
    p = rng.dirichlet(np.ones(3), size=30)
    m = classification_metrics(y, p, None)
    assert m["recall"] == pytest.approx(recall_score(y, p.argmax(1), average="macro"))
    assert m["f1"] == pytest.approx(f1_score(y, p.argmax(1), average="macro"))
    assert m["auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr"))
    yb = y % 2
    pb = np.stack([1 - p[:, 0], p[:, 0]], 1)
    mb = classification_metrics(yb, pb, 0)  # positive class 0: metrics of class 0
    assert mb["recall"] == pytest.approx(recall_score(yb, pb.argmax(1), pos_label=0))
    assert mb["auc"] == pytest.approx(roc_auc_score(yb == 0, pb[:, 0]))
    assert math.isnan(classification_metrics(np.zeros(4, int), pb[:4], 1)["auc"])  # one class present


@pytest.mark.parametrize("algorithm", sorted(SEARCHERS))
def test_cell_searcher_round_robins_cells_within_bounds_and_routes_results(algorithm, tmp_path):
    cfg = load_config({"search": {"algorithm": algorithm, "samples": 3, "lr": [1e-4, 1e-2],
                                  "batch_size": [16, 32]}, "grid": {"heads": ["a", "k"]}})
    cells = [{"backbone": "efficientnet_lite0", "finetune": "frozen", "head": h} for h in ("a", "k")]
    s = CellSearcher(cells, cfg.search, log_path=str(tmp_path / "log.jsonl"))
    configs = []
    for i in range(6):
        c = s.suggest(f"t{i}")
        assert 1e-4 <= c["lr"] <= 1e-2 and c["batch_size"] in (16, 32)
        configs.append(c)
        s.on_trial_complete(f"t{i}", {"val_accuracy": 0.5 + 0.1 * c["cell"]})
    assert [c["head"] for c in configs] == ["a", "k"] * 3 and [c["cell"] for c in configs] == [0, 1] * 3
    assert s.suggest("t6") == "FINISHED"
    path = tmp_path / "state.pkl"
    s.save(str(path))
    fresh = CellSearcher(cells, cfg.search)
    fresh.restore(str(path))
    assert fresh.suggest("t7") == "FINISHED" and fresh._trial_cell == s._trial_cell
    from raycyto.tune.search import read_search_log

    log = read_search_log(tmp_path / "log.jsonl")
    assert [r["value"] for r in log] == [pytest.approx(0.5 + 0.1 * (i % 2)) for i in range(6)]


def test_feature_actors_leave_cpu_for_the_tasks_that_feed_them():
    """2 actors on a 2-CPU cluster at 1 CPU each starved the decode tasks (the stage hung)."""
    from raycyto.tune.features import actor_cpus

    assert actor_cpus(8, 2) == 1.0 and actor_cpus(3, 2) == 1.0 and actor_cpus(2, 1) == 1.0
    assert actor_cpus(2, 2) == 0.5 and actor_cpus(4, 4) == 0.75  # one CPU left for a decode task
