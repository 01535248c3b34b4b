"""Training loops: a head on cached feature arrays, or backbone + head on streamed images.

Plain functions, callable without Ray. One loop (:func:`fit`) serves both cases; they
differ only in where batches come from. Settings come as typed objects, never as loose
keyword splats: the task (:class:`Task`), the config's ``train`` section
(:class:`~raycyto.config.TrainConfig`: epochs, optimiser, weight decay, early stopping,
best-epoch metric, precision) and the search sample (:class:`HParams`: learning rate,
batch size). On CPU the result is deterministic for a given seed (seeded init, seeded
shuffling, deterministic algorithms).

Example::

    task, train = Task(num_classes=2, positive=1), TrainConfig(epochs=30, patience=5)
    result = train_head("a", HeadData(x_train, y_train, x_val, y_val), task=task, train=train,
                        hp=HParams(lr=1e-3, batch_size=32), seed=0)
    result.history          # one row per epoch: train_/val_ loss, accuracy, precision, ...
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional

import numpy as np
import pandas as pd

from raycyto.config import METRICS, TrainConfig, metric_mode

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from raycyto.models.preprocessing import Preprocess


@dataclass(frozen=True)
class Task:
    """What is being predicted: C classes (2 for binary) and the positive class (binary only)."""

    num_classes: int
    positive: Optional[int] = None


@dataclass(frozen=True)
class HParams:
    """One search sample: what the searcher chooses for a trial."""

    lr: float
    batch_size: int

    @classmethod
    def from_trial(cls, config: Mapping[str, Any]) -> "HParams":
        """From a Tune trial config (``{"lr": ..., "batch_size": ..., ...}``)."""
        return cls(lr=float(config["lr"]), batch_size=int(config["batch_size"]))


@dataclass(frozen=True)
class HeadData:
    """A fold's feature arrays for head training.

    Attributes:
        x_train: [N, ...] float32 features (every augmented copy); y_train: [N] int labels.
        x_val, y_val: validation features [M, ...] and labels [M] (copy 0 only).
        groups_train: [N] patient / source-image id per training row (group-aware SVM calibration).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    groups_train: Optional[np.ndarray] = None

Batches = Callable[[int], Iterable[tuple["torch.Tensor", "torch.Tensor"]]]  # epoch -> (x, y) batches


def _adam(params, lr: float, weight_decay: float):
    import torch

    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def _sgd(params, lr: float, weight_decay: float):
    import torch

    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)


def _adamw(params, lr: float, weight_decay: float):
    import torch

    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


#: ``train.optimizer`` name -> builder(params, lr, weight_decay). Keys = ``config.OPTIMIZERS``.
OPTIMIZERS: dict[str, Callable] = {"adam": _adam, "adamw": _adamw, "sgd": _sgd}


def classification_metrics(labels: np.ndarray, probs: np.ndarray, positive: Optional[int]) -> dict[str, float]:
    """Accuracy, precision, recall, F1, AUC and cross-entropy of predicted probabilities.

    Args:
        labels: [N] int true labels.
        probs: [N, C] class probabilities.
        positive: index of the positive class for binary tasks (metrics of that class);
            None -> multiclass macro averages and one-vs-rest macro AUC.

    Returns:
        {loss, accuracy, precision, recall, f1, auc}; AUC is NaN when only one class is present.
    """
    from raycyto.analysis.metrics import classification_metrics as scores
    from raycyto.analysis.metrics import log_loss_of

    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(1, keepdims=True)  # float32 softmax rows sum to 1 only within rounding
    # the report's own metric functions, so results.csv and `raycyto report` agree by construction
    values, _ = scores(labels, probs.argmax(1), probs, positive)
    loss = log_loss_of(labels, probs)
    return {"loss": float(loss), **values}


def _better(value: float, best: float, mode: str) -> bool:
    if math.isnan(value):
        return False
    if math.isnan(best):
        return True
    return value > best if mode == "max" else value < best


@dataclass
class FitResult:
    """Outcome of :func:`fit`: the model holds the best epoch's weights."""

    model: Any
    history: pd.DataFrame           # one row per epoch: epoch, lr, train_<m>, val_<m>
    best_epoch: int                 # 1-based
    best: dict[str, float] = field(default_factory=dict)  # val_<m> of the best epoch


def fit(model: "nn.Module", train_batches: Batches, val_batches: Callable[[], Iterable], *,
        task: Task, train: TrainConfig, hp: HParams, class_weight: Optional[np.ndarray] = None,
        forward: Optional[Callable] = None, device: Optional[str] = None) -> FitResult:
    """Train ``model`` with cross-entropy; keep (and restore) the epoch with the best
    ``train.select_metric`` (ties: the lower validation loss); stop after ``train.patience``
    epochs without improvement.

    Args:
        model: maps a batch ``x`` to logits [B, C] (a head on features, or a classifier).
        train_batches: epoch -> iterable of (x, y) training batches (shuffled per epoch).
        val_batches: () -> iterable of (x, y) validation batches.
        task: classes and positive class (binary metrics).
        train: epochs, optimizer, schedule, weight_decay, label_smoothing, select_metric, patience,
            precision.
        hp: learning rate (the batch size is already in the batches).
        class_weight: optional [C] weights for the loss.
        forward: optional ``(model, x) -> logits`` (default ``model(x)``).
        device: where to train (default :func:`raycyto.device.worker_device`: the GPU Ray gave
            this trial, else the CPU). The model comes back on the CPU.

    Returns:
        FitResult with the best epoch's weights loaded into ``model``.
    """
    import torch

    from raycyto.device import autocast, worker_device

    device = device or worker_device()
    forward = forward or (lambda m, x: m(x))
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = OPTIMIZERS[train.optimizer](params, hp.lr, train.weight_decay)
    # cosine: lr * (1 + cos(pi * e / epochs)) / 2 in epoch e + 1, stepped once per epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, train.epochs) if train.schedule == "cosine" else None
    weight = torch.as_tensor(class_weight, dtype=torch.float32, device=device) if class_weight is not None else None
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=train.label_smoothing)
    select, mode = train.select_metric, metric_mode(train.select_metric)
    rows, best_value, best_loss, best_epoch, best_state, since_best = [], math.nan, math.inf, 0, None, 0
    for epoch in range(1, train.epochs + 1):
        model.train()
        ys, ps, lr = [], [], opt.param_groups[0]["lr"]
        for x, y in train_batches(epoch):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            with autocast(device, train.precision):
                logits = forward(model, x).float()  # [B, C]
            loss = loss_fn(logits, y)
            loss.backward()
            opt.step()
            ys.append(y.cpu().numpy())
            ps.append(torch.softmax(logits.detach(), 1).cpu().numpy())
        if sched is not None:
            sched.step()
        train_m = classification_metrics(np.concatenate(ys), np.concatenate(ps), task.positive)
        val_probs, val_labels = predict_probs(model, val_batches(), forward, device, train.precision)
        val = classification_metrics(val_labels, val_probs, task.positive)
        row = {"epoch": epoch, "lr": lr, **{f"train_{k}": v for k, v in train_m.items()},
               **{f"val_{k}": v for k, v in val.items()}}
        rows.append(row)
        tie = row[select] == best_value and row["val_loss"] < best_loss  # e.g. equal accuracy: lower loss
        if best_state is None or _better(row[select], best_value, mode) or tie:
            best_value, best_loss, best_epoch, since_best = row[select], row["val_loss"], epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            since_best += 1
            if train.patience is not None and since_best >= train.patience:
                break
    model.load_state_dict(best_state)
    model.to("cpu").eval()
    history = pd.DataFrame(rows)
    best = {f"val_{m}": float(history.loc[best_epoch - 1, f"val_{m}"]) for m in METRICS}
    return FitResult(model=model, history=history, best_epoch=best_epoch, best=best)


def predict_probs(model: "nn.Module", batches: Iterable, forward: Optional[Callable] = None,
                  device: str = "cpu", precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (eval mode, no grad) softmax probabilities; ``model`` must be on ``device``.

    Returns:
        (probs [N, C] float32, labels [N] int64) in batch order.
    """
    import torch

    from raycyto.device import autocast

    forward = forward or (lambda m, x: m(x))
    model.eval()
    ps, ys = [], []
    with torch.no_grad(), autocast(device, precision):
        for x, y in batches:
            ps.append(torch.softmax(forward(model, x.to(device)).float(), 1).cpu().numpy())
            ys.append(np.asarray(y))
    return np.concatenate(ps).astype(np.float32), np.concatenate(ys).astype(np.int64)


def array_batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: Optional[int] = None) -> Batches:
    """Batches over in-memory arrays; shuffled per epoch with a seeded generator when ``seed`` is set.

    Args:
        x: [N, ...] inputs (features [N, D] float32; cached maps [N, C, H, W] stay float16 and
            are converted by the consumer).
        y: [N] int labels.
    Returns:
        epoch -> iterable of (x [B, ...], y [B]) tensors.
    """
    import torch

    x = np.ascontiguousarray(x)  # float16 (cached maps / prefix activations) stays float16: half the memory
    xt = torch.as_tensor(x, dtype=torch.float16 if x.dtype == np.float16 else torch.float32)
    yt = torch.as_tensor(np.asarray(y), dtype=torch.int64)

    def batches(epoch: int = 0):
        if seed is None:
            order = torch.arange(len(yt))
        else:
            order = torch.randperm(len(yt), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            yield xt[idx], yt[idx]

    return batches


def seed_everything(seed: int) -> None:
    """Seed torch and make CPU kernels deterministic where PyTorch supports it."""
    import torch

    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def train_head(head: str, data: HeadData, *, task: Task, train: TrainConfig, hp: HParams, seed: int = 0,
               head_kwargs: Optional[dict] = None, class_weight: Optional[np.ndarray] = None) -> FitResult:
    """Train a head (``raycyto.models.heads``) on feature arrays.

    A head with a ``norm`` (:class:`~raycyto.models.heads.Standardize`) first learns the
    training rows' per-feature mean and spread (saved with its weights). Heads with a
    ``fit_svm`` step (head "b") are trained like head "a", then the SVM is fitted on the
    training features of the best epoch, calibrated on folds grouped by ``data.groups_train``.

    Args:
        head: head name in ``HEADS``.
        data: the fold's training and validation arrays.
        task, train, hp: as in :func:`fit`; ``seed`` fixes init and shuffling.
        head_kwargs: options of the head.
        class_weight: optional [C] loss weights.

    Returns:
        FitResult whose ``model`` is the trained head (eval mode).
    """
    from raycyto.models.heads import build_head, head_spec

    seed_everything(seed)
    spec = head_spec(head)
    model = build_head(head, data.x_train.shape[1], task.num_classes, **(head_kwargs or {}))
    if spec.pre_fit is not None:
        spec.pre_fit(model, data.x_train)
    result = fit(model, array_batches(data.x_train, data.y_train, hp.batch_size, seed),
                 lambda: array_batches(data.x_val, data.y_val, max(hp.batch_size, 256))(0),
                 task=task, train=train, hp=hp, class_weight=class_weight)
    if spec.post_fit is not None:
        spec.post_fit(result.model, data.x_train, data.y_train, data.groups_train)
    return result


def image_batches(ds: Any, pre: "Preprocess", batch_size: int, seed: Optional[int] = None) -> Batches:
    """Stream (preprocessed image, label) batches from a Ray Dataset of image rows.

    Args:
        ds: Ray Dataset with ``image`` [S,S,3] uint8 and ``label`` columns.
        pre: the preprocessing contract (its backbone-input step; images are already at image_size).
        seed: global shuffle seed: epoch ``e`` sees a permutation of ALL rows seeded (seed, e)
            (``Dataset.random_shuffle``), not a local buffer, so batches mix classes even
            when the source lists images class by class. None keeps dataset order.

    Returns:
        epoch -> iterable of (x [B,3,S,S] float32, y [B] int64).
    """
    import torch

    def batches(epoch: int = 0):
        rows = ds if seed is None else ds.random_shuffle(seed=seed * 1000 + epoch)
        for batch in rows.iter_batches(batch_size=batch_size, batch_format="numpy"):
            yield pre.to_tensor(np.stack(list(batch["image"]))), torch.as_tensor(batch["label"].astype(np.int64))

    return batches


def train_finetune(model: "nn.Module", train_ds: Any, val_images: np.ndarray, val_labels: np.ndarray, *,
                   pre: "Preprocess", task: Task, train: TrainConfig, hp: HParams, seed: int = 0,
                   class_weight: Optional[np.ndarray] = None) -> FitResult:
    """Fine-tune a classifier (backbone + head) on images streamed from Ray Data.

    Args:
        model: ``raycyto.models.Classifier`` with trainable parts set by its finetune mode.
        train_ds: Ray Dataset of training image rows (all copies; ``image``, ``label``,
            ``group``), globally reshuffled every epoch.
        val_images: [M, S, S, 3] uint8 validation images; val_labels: [M].
        pre: the preprocessing contract.
        task, train, hp: as in :func:`fit`.

    Returns:
        FitResult whose ``model`` holds the best epoch's weights.
    """
    seed_everything(seed)
    result = fit(model, image_batches(train_ds, pre, hp.batch_size, seed),
                 lambda: image_array_batches(val_images, val_labels, pre, 64),
                 task=task, train=train, hp=hp, class_weight=class_weight)
    from raycyto.models.heads import head_spec

    post_fit = head_spec(model.config["head"]).post_fit  # the registry name build_classifier recorded
    if post_fit is not None:
        feats, labels, groups = dataset_features(result.model, train_ds, pre)
        post_fit(result.model.head, feats, labels, groups)
    return result


def dataset_features(model: "nn.Module", ds: Any, pre: "Preprocess", batch_size: int = 64
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backbone features of every row of a Ray Dataset of image rows, in dataset order.

    Returns:
        (features [N, D] float32, labels [N] int64, groups [N] str).
    """
    groups: list[np.ndarray] = []

    def batches():
        for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
            groups.append(np.asarray(batch["group"]).astype(str))
            yield pre.to_tensor(np.stack(list(batch["image"]))), batch["label"].astype(np.int64)

    feats, labels = extract_features(model, batches())
    return feats, labels, np.concatenate(groups)


def image_array_batches(images: np.ndarray, labels: np.ndarray, pre: "Preprocess",
                        batch_size: int) -> Iterable[tuple["torch.Tensor", "torch.Tensor"]]:
    """In-order (preprocessed image [B,3,S,S], label [B]) batches from uint8 arrays [N,S,S,3]
    (already at the contract's image_size)."""
    import torch

    for i in range(0, len(labels), batch_size):
        yield (pre.to_tensor(images[i:i + batch_size]),
               torch.as_tensor(np.asarray(labels[i:i + batch_size], dtype=np.int64)))


def extract_features(model: "nn.Module", batches: Iterable, device: Optional[str] = None,
                     features: Optional[Callable] = None) -> tuple[np.ndarray, np.ndarray]:
    """Backbone features of a classifier in eval mode, on ``device`` (default: the worker's);
    the model comes back on the CPU.

    Args:
        features: ``(model, x) -> [B, D]`` (default ``model.features(x)``; e.g. the trainable
            tail of a fine-tuned backbone on cached prefix activations).

    Returns:
        (features [N, D] float32, labels [N] int64) in batch order.
    """
    import torch

    from raycyto.device import worker_device

    device = device or worker_device()
    features = features or (lambda m, x: m.features(x))
    model.to(device).eval()
    fs, ys = [], []
    with torch.no_grad():
        for x, y in batches:
            fs.append(features(model, x.to(device)).float().cpu().numpy())
            ys.append(np.asarray(y))
    model.to("cpu")
    return np.concatenate(fs).astype(np.float32), np.concatenate(ys).astype(np.int64)
