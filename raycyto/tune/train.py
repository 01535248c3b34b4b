"""Training loops: a head on cached feature arrays, or backbone + head on streamed images.

Plain functions, callable without Ray. One loop (:func:`fit`) serves both cases; they
differ only in where batches come from. On CPU the result is deterministic for a given
seed (seeded init, seeded shuffling, deterministic algorithms).

Example::

    result = train_head("a", x_train, y_train, x_val, y_val, num_classes=2, lr=1e-3,
                        batch_size=16, epochs=5, positive=1, seed=0)
    result.history          # one row per epoch: train_/val_ loss, accuracy, precision, ...
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

import numpy as np
import pandas as pd

from raycyto.config import METRICS, metric_mode

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

Batches = Callable[[int], Iterable[tuple["torch.Tensor", "torch.Tensor"]]]  # epoch -> (x, y) batches


def _adam(params, lr: float, weight_decay: float):
    import torch

    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def _sgd(params, lr: float, weight_decay: float):
    import torch

    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)


#: ``train.optimizer`` name -> builder(params, lr, weight_decay).
OPTIMIZERS: dict[str, Callable] = {"adam": _adam, "sgd": _sgd}


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
    from sklearn.metrics import log_loss

    from raycyto.analysis.metrics import classification_metrics as scores

    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(1, keepdims=True)  # float32 softmax rows sum to 1 only within rounding
    # the report's own metric functions, so results.csv and `raycyto report` agree by construction
    values, _ = scores(labels, probs.argmax(1), probs, positive)
    loss = log_loss(labels, np.clip(probs, 1e-7, 1.0), labels=list(range(probs.shape[1])))
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
    history: pd.DataFrame           # one row per epoch: epoch, train_<m>, val_<m>
    best_epoch: int                 # 1-based
    best: dict[str, float] = field(default_factory=dict)  # val_<m> of the best epoch


def fit(model: "nn.Module", train_batches: Batches, val_batches: Callable[[], Iterable], *,
        num_classes: int, positive: Optional[int], lr: float, epochs: int, optimizer: str = "adam",
        weight_decay: float = 0.0, class_weight: Optional[np.ndarray] = None,
        select_metric: str = "val_accuracy", patience: Optional[int] = None,
        forward: Optional[Callable] = None, device: Optional[str] = None, precision: str = "fp32") -> FitResult:
    """Train ``model`` with cross-entropy; keep the epoch with the best ``select_metric``.

    Args:
        model: maps a batch ``x`` to logits [B, C] (a head on features, or a classifier).
        train_batches: epoch -> iterable of (x, y) training batches (shuffled per epoch).
        val_batches: () -> iterable of (x, y) validation batches.
        num_classes: C (2 for binary tasks: two logits + softmax).
        positive: positive class index for binary metrics, None for multiclass.
        lr, epochs, optimizer, weight_decay: optimisation settings.
        class_weight: optional [C] weights for the loss.
        select_metric: ``val_<m>`` picking the best epoch (min for loss, max otherwise).
        patience: stop after this many epochs without improvement (None: run all epochs).
        forward: optional ``(model, x) -> logits`` (default ``model(x)``).
        device: where to train (default :func:`raycyto.device.worker_device`: the GPU Ray gave
            this trial, else the CPU). The model comes back on the CPU.
        precision: "fp32", or "bf16" (autocast; the loss and metrics stay fp32).

    Returns:
        FitResult with the best weights loaded into ``model``.
    """
    import torch

    from raycyto.device import autocast, worker_device

    device = device or worker_device()
    forward = forward or (lambda m, x: m(x))
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = OPTIMIZERS[optimizer](params, lr, weight_decay)
    weight = torch.as_tensor(class_weight, dtype=torch.float32, device=device) if class_weight is not None else None
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
    mode = metric_mode(select_metric)
    rows, best_value, best_epoch, best_state, since_best = [], math.nan, 0, None, 0
    for epoch in range(1, epochs + 1):
        model.train()
        ys, ps = [], []
        for x, y in train_batches(epoch):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            with autocast(device, precision):
                logits = forward(model, x).float()  # [B, C]
            loss = loss_fn(logits, y)
            loss.backward()
            opt.step()
            ys.append(y.cpu().numpy())
            ps.append(torch.softmax(logits.detach(), 1).cpu().numpy())
        train = classification_metrics(np.concatenate(ys), np.concatenate(ps), positive)
        val_probs, val_labels = predict_probs(model, val_batches(), forward, device, precision)
        val = classification_metrics(val_labels, val_probs, positive)
        row = {"epoch": epoch, **{f"train_{k}": v for k, v in train.items()},
               **{f"val_{k}": v for k, v in val.items()}}
        rows.append(row)
        if best_state is None or _better(row[select_metric], best_value, mode):
            best_value, best_epoch, since_best = row[select_metric], epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            since_best += 1
            if patience is not None and since_best >= patience:
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
        x: [N, ...] float32 inputs (e.g. features [N, D]).
        y: [N] int labels.
    Returns:
        epoch -> iterable of (x [B, ...], y [B]) tensors.
    """
    import torch

    xt = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)
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


def train_head(head: str, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, *,
               num_classes: int, positive: Optional[int], lr: float, batch_size: int, epochs: int,
               optimizer: str = "adam", weight_decay: float = 0.0, class_weight: Optional[np.ndarray] = None,
               select_metric: str = "val_accuracy", patience: Optional[int] = None, seed: int = 0,
               head_kwargs: Optional[dict] = None, precision: str = "fp32") -> FitResult:
    """Train a head (``raycyto.models.heads``) on feature arrays.

    Heads with a ``fit_svm`` step (head "b") are trained like head "a", then the SVM is
    fitted on the training features of the best epoch.

    Args:
        head: head name in ``HEADS``.
        x_train: [N, D] float32 features; y_train: [N] int labels.
        x_val: [M, D]; y_val: [M].
        Remaining args as in :func:`fit`; ``seed`` fixes init and shuffling.

    Returns:
        FitResult whose ``model`` is the trained head (eval mode).
    """
    from raycyto.models.heads import build_head

    seed_everything(seed)
    model = build_head(head, x_train.shape[1], num_classes, **(head_kwargs or {}))
    result = fit(model, array_batches(x_train, y_train, batch_size, seed),
                 lambda: array_batches(x_val, y_val, max(batch_size, 256))(0),
                 num_classes=num_classes, positive=positive, lr=lr, epochs=epochs, optimizer=optimizer,
                 weight_decay=weight_decay, class_weight=class_weight, select_metric=select_metric,
                 patience=patience, precision=precision)
    if hasattr(result.model, "fit_svm"):
        result.model.fit_svm(np.asarray(x_train, np.float32), np.asarray(y_train, np.int64))
    return result


def image_batches(ds: Any, spec: Any, input_size: Optional[int], batch_size: int,
                  seed: Optional[int] = None) -> Batches:
    """Stream (preprocessed image, label) batches from a Ray Dataset of image rows.

    Args:
        ds: Ray Dataset with ``image`` [S,S,3] uint8 and ``label`` columns.
        spec: the backbone spec used by ``raycyto.models.registry.preprocess``.
        input_size: backbone input side (None = spec native).
        seed: local shuffle seed (per epoch); None keeps dataset order.

    Returns:
        epoch -> iterable of (x [B,3,S,S] float32, y [B] int64).
    """
    import torch

    from raycyto.models.registry import preprocess

    def batches(epoch: int = 0):
        kw = {} if seed is None else {"local_shuffle_buffer_size": 4 * batch_size,
                                      "local_shuffle_seed": seed * 1000 + epoch}
        for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy", **kw):
            yield preprocess(np.stack(list(batch["image"])), spec, input_size), torch.as_tensor(
                batch["label"].astype(np.int64))

    return batches


def train_finetune(model: "nn.Module", train_ds: Any, val_images: np.ndarray, val_labels: np.ndarray, *,
                   input_size: Optional[int],
                   num_classes: int, positive: Optional[int], lr: float, batch_size: int, epochs: int,
                   optimizer: str = "adam", weight_decay: float = 0.0,
                   class_weight: Optional[np.ndarray] = None, select_metric: str = "val_accuracy",
                   patience: Optional[int] = None, seed: int = 0, precision: str = "fp32") -> FitResult:
    """Fine-tune a classifier (backbone + head) on images streamed from Ray Data.

    Args:
        model: ``raycyto.models.Classifier`` with trainable parts set by its finetune mode.
        train_ds: Ray Dataset of training image rows (all copies), streamed every epoch.
        val_images: [M, S, S, 3] uint8 validation images; val_labels: [M].
        Remaining args as in :func:`fit`.

    Returns:
        FitResult whose ``model`` holds the best epoch's weights.
    """
    seed_everything(seed)
    result = fit(model, image_batches(train_ds, model.spec, input_size, batch_size, seed),
                 lambda: image_array_batches(val_images, val_labels, model.spec, input_size, 64),
                 num_classes=num_classes, positive=positive, lr=lr, epochs=epochs, optimizer=optimizer,
                 weight_decay=weight_decay, class_weight=class_weight, select_metric=select_metric,
                 patience=patience, precision=precision)
    if hasattr(result.model.head, "fit_svm"):
        feats, labels = extract_features(result.model, image_batches(train_ds, model.spec, input_size, 64)(0))
        result.model.head.fit_svm(feats, labels)
    return result


def image_array_batches(images: np.ndarray, labels: np.ndarray, spec: Any, input_size: Optional[int],
                        batch_size: int) -> Iterable[tuple["torch.Tensor", "torch.Tensor"]]:
    """In-order (preprocessed image [B,3,S,S], label [B]) batches from uint8 arrays [N,S,S,3]."""
    import torch

    from raycyto.models.registry import preprocess

    for i in range(0, len(labels), batch_size):
        yield (preprocess(images[i:i + batch_size], spec, input_size),
               torch.as_tensor(np.asarray(labels[i:i + batch_size], dtype=np.int64)))


def extract_features(model: "nn.Module", batches: Iterable, device: Optional[str] = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Backbone features of a classifier in eval mode, on ``device`` (default: the worker's);
    the model comes back on the CPU.

    Returns:
        (features [N, D] float32, labels [N] int64) in batch order.
    """
    import torch

    from raycyto.device import worker_device

    device = device or worker_device()
    model.to(device).eval()
    fs, ys = [], []
    with torch.no_grad():
        for x, y in batches:
            fs.append(model.features(x.to(device)).float().cpu().numpy())
            ys.append(np.asarray(y))
    model.to("cpu")
    return np.concatenate(fs).astype(np.float32), np.concatenate(ys).astype(np.int64)
