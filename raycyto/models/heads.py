"""Classification heads on pooled backbone features ``[N, D] -> logits [N, C]``.

Registry :data:`HEADS` (built from D and C only, never per backbone):

- ``a``: D -> 128 -> C, ReLU (study B head A).
- ``b``: head ``a``, trained as usual; then :meth:`SVMHead.fit_svm` fits a linear SVM with
  sigmoid (Platt) probability calibration (``CalibratedClassifierCV(LinearSVC)``) on the
  128-d penultimate features (study B head B). After fitting, ``forward`` returns
  log-probabilities, so ``softmax(logits)`` equals the SVM's calibrated probabilities.
  The fitted SVM is stored as tensors (buffers) in the state dict -- coefficients,
  intercepts and calibration slopes/offsets of each CV fold -- and evaluated in torch,
  so bundles stay plain ``weights_only`` state dicts.
- ``c``: D -> 1024 -> 512 -> 128 -> C, ReLU (study B head C).
- ``d``: ``c`` with dropout p=0.5 after each hidden ReLU (study B head D).
- ``k``: study A's top: BatchNorm -> dropout -> dense(units) -> ReLU -> dropout -> C;
  ``units``, ``dropout1`` and ``dropout2`` are keyword arguments.
- ``s``: spatial -- reads a feature map ``[N, C, h, w]`` (the layer named by
  ``BackboneSpec.feature_map``), not pooled features: a positional multiple-instance head
  (:class:`raycyto.models.spatial.MILMapHead`; ``in_dim`` = map channels, option
  ``grid=(h, w)`` of the map -- the default 1x1 grid also takes pooled ``[N, D]``, so it
  builds from D and C like the others; ``width``, ``kernel``, ``channel_dropout``,
  ``dropout``, ``temperature``, ``shared``).

Each entry is a :class:`HeadSpec`: the builder plus the head's capabilities (reads a map or
pooled features, pre-/post-fit steps, its MC path, its evidence method), so no caller tests a
head's type. Every head is a :class:`Head` and answers :meth:`Head.evidence` (where in the
image its answer comes from: exact per-cell contributions for map heads, Grad-CAM through the
backbone for pooled ones; :mod:`raycyto.evidence`).

Binary tasks use **C = 2 logits with softmax cross-entropy everywhere** (equivalent to
BCE-with-logits on the logit difference), so MC dropout, metrics and SVM calibration
handle binary and multi-class alike.

All dropout layers are :class:`~raycyto.models.mc.MCDropout` (plain dropout in training,
switchable on in eval for MC passes).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from raycyto.errors import DataError, RaycytoError
from raycyto.models.mc import MCDropout
from raycyto.models.protocol import Head
from raycyto.models.spatial import build_spatial_head


class Standardize(nn.Module):
    """Per-feature ``(x - mean) / scale`` with statistics of the training rows (buffers, so
    they travel in the head's state dict and the bundle). Identity until :meth:`fit`.

    Args:
        dim: feature width D (statistics per feature; for maps ``[N, C, H, W]`` per channel).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    @torch.no_grad()
    def fit(self, x: Tensor | np.ndarray) -> "Standardize":
        """Learn mean and standard deviation from ``x [N, D, ...]``. As scikit-learn's
        ``StandardScaler``, a feature that is constant on the training rows keeps scale 1
        (dividing by ~0 would blow up whatever it is on new images)."""
        t = torch.as_tensor(np.asarray(x), dtype=torch.float32)
        dims = [0, *range(2, t.ndim)]  # all but the feature/channel axis
        mean, std = t.mean(dims), t.std(dims, unbiased=False)
        self.mean.copy_(mean)
        self.scale.copy_(torch.where(std > 1e-6 * max(float(std.max()), 1e-12), std, torch.ones_like(std)))
        return self

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)  # broadcast over [N, D] or [N, C, H, W]
        return (x - self.mean.view(shape).to(x.dtype)) / self.scale.view(shape).to(x.dtype)


class MLPHead(Head):
    """Dense ReLU stack ``D -> hidden... -> C`` with optional dropout after each hidden ReLU.

    Inputs are used as the backbone gives them: per-feature standardisation (as the probe
    does) lowered the test accuracy of heads a and d by ~2 points on a real image set
    (scikit-learn's digits, Lite0 features, 5 folds), because it blows up near-constant
    features; the benchmark ``benchmarks/probe_vs_heads.py`` measures it."""

    def __init__(self, in_dim: int, num_classes: int, hidden: Sequence[int] = (128,),
                 dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(MCDropout(dropout))
            width = h
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, num_classes)

    def penultimate(self, x: Tensor) -> Tensor:
        """``[N, D] -> [N, hidden[-1]]`` (after the last hidden ReLU / dropout)."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.penultimate(x))


class StudyAHead(Head):
    """Study A: BatchNorm -> dropout -> dense(units) -> ReLU -> dropout -> output."""

    def __init__(self, in_dim: int, num_classes: int, units: int = 256,
                 dropout1: float = 0.5, dropout2: float = 0.5) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm1d(in_dim), MCDropout(dropout1),
                                  nn.Linear(in_dim, units), nn.ReLU(), MCDropout(dropout2))
        self.out = nn.Linear(units, num_classes)

    def penultimate(self, x: Tensor) -> Tensor:
        """``[N, D] -> [N, units]``."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.penultimate(x))


class SVMHead(MLPHead):
    """Head ``b``: head ``a`` plus a calibrated linear SVM on its 128-d penultimate features.

    Before :meth:`fit_svm` it behaves exactly like head ``a``.
    """

    def __init__(self, in_dim: int, num_classes: int, hidden: int = 128, svm_cv: int = 3,
                 svm_c: float = 1.0, seed: int = 0) -> None:
        super().__init__(in_dim, num_classes, hidden=(hidden,))
        if num_classes < 2:
            raise RaycytoError(f"head b needs num_classes >= 2, got {num_classes}")
        self.svm_cv, self.svm_c, self.seed = int(svm_cv), float(svm_c), int(seed)
        k, m = self.svm_cv, (1 if num_classes == 2 else num_classes)  # m = SVM decision columns
        self.register_buffer("svm_fitted", torch.zeros((), dtype=torch.bool))
        self.register_buffer("svm_folds", torch.zeros((), dtype=torch.int64))  # calibration folds used (<= svm_cv)
        self.register_buffer("svm_coef", torch.zeros(k, m, hidden, dtype=torch.float64))
        self.register_buffer("svm_intercept", torch.zeros(k, m, dtype=torch.float64))
        self.register_buffer("cal_a", torch.zeros(k, m, dtype=torch.float64))
        self.register_buffer("cal_b", torch.zeros(k, m, dtype=torch.float64))

    @torch.no_grad()
    def fit_svm(self, features: Tensor | np.ndarray, labels: np.ndarray | Sequence[int],
                groups: np.ndarray | Sequence[str] | None = None) -> "SVMHead":
        """Fit the calibrated linear SVM on this head's penultimate features.

        The Platt calibration is fitted on ``svm_cv`` cross-validation folds. With ``groups``
        (patient / source image per row) they are shuffled ``StratifiedGroupKFold`` folds, so
        the augmented copies of one image, or the images of one patient, never sit on both
        sides of a calibration split (fewer folds when a class has fewer groups; ungrouped,
        with a warning, only when a class has a single group); without, shuffled stratified folds.

        Args:
            features: backbone features ``[N, D]`` (the head's input, not the 128-d ones).
            labels: ``[N]`` ints in ``0..C-1``; every class needs >= ``svm_cv`` samples
                (groups, when given).
            groups: ``[N]`` group id per row, or None.
        Returns:
            self (now predicting SVM log-probabilities).
        """
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
        from sklearn.svm import LinearSVC

        was_training = self.training
        self.eval()
        f = torch.as_tensor(np.asarray(features), dtype=torch.float32, device=self.out.weight.device)
        z = self.penultimate(f).double().cpu().numpy()  # [N, 128]
        self.train(was_training)
        y = np.asarray(labels).astype(int)
        c = self.out.out_features
        counts = np.bincount(y, minlength=c) if y.size and y.min() >= 0 else None
        if counts is None or len(counts) != c or counts.min() < self.svm_cv:
            raise DataError(f"head b SVM needs every class 0..{c - 1} with >= {self.svm_cv} "
                            f"samples; got counts {None if counts is None else counts.tolist()}")
        g = None if groups is None else np.asarray(groups).astype(str)
        n_groups = min(len(np.unique(g[y == k])) for k in range(c)) if g is not None else None
        if g is not None and n_groups >= 2:
            k_cv = min(self.svm_cv, n_groups)
            folds = list(StratifiedGroupKFold(k_cv, shuffle=True, random_state=self.seed).split(z, y, g))
        else:
            if g is not None:
                import logging

                logging.getLogger(__name__).warning(
                    "head b: a class has a single group in the training rows, so the SVM calibration "
                    "folds cannot be grouped (copies of one image may sit on both sides)")
            folds = list(StratifiedKFold(self.svm_cv, shuffle=True, random_state=self.seed).split(z, y))
        self.calibration_folds = folds  # kept in memory for checks only; not part of the state
        svm = LinearSVC(C=self.svm_c, dual="auto", max_iter=20000, random_state=self.seed)
        cal = CalibratedClassifierCV(svm, method="sigmoid", cv=folds, ensemble=True)
        cal.fit(z, y)
        for i, cc in enumerate(cal.calibrated_classifiers_):
            est = cc.estimator
            self.svm_coef[i] = torch.from_numpy(np.asarray(est.coef_, dtype=np.float64))
            self.svm_intercept[i] = torch.from_numpy(np.asarray(est.intercept_, dtype=np.float64))
            self.cal_a[i] = torch.tensor([cb.a_ for cb in cc.calibrators], dtype=torch.float64)
            self.cal_b[i] = torch.tensor([cb.b_ for cb in cc.calibrators], dtype=torch.float64)
        self.svm_fitted.fill_(True)
        self.svm_folds.fill_(len(folds))
        self._sklearn = cal  # kept in memory for cross-checks only; not part of the state
        return self

    def svm_proba(self, x: Tensor) -> Tensor:
        """Calibrated SVM probabilities ``[N, C]`` (sklearn's ``predict_proba``, in torch)."""
        z = self.penultimate(x).double()  # [N, 128]
        dec = torch.einsum("nh,kmh->knm", z, self.svm_coef) + self.svm_intercept[:, None]  # [K,N,m]
        k = int(self.svm_folds)  # the calibration folds actually fitted
        dec = dec[:k]
        p = torch.sigmoid(-(self.cal_a[:k, None] * dec + self.cal_b[:k, None]))  # [K, N, m]
        if self.out.out_features == 2:
            p = torch.cat([1 - p, p], -1)  # [K, N, 2]
        else:
            s = p.sum(-1, keepdim=True)
            p = torch.where(s > 0, p / s.clamp_min(1e-300), torch.full_like(p, 1 / p.shape[-1]))
        return p.mean(0)  # [N, C], ensemble over CV folds

    def forward(self, x: Tensor) -> Tensor:
        if not bool(self.svm_fitted):
            return super().forward(x)
        return self.svm_proba(x).clamp_min(1e-12).log().to(x.dtype)


class LinearProbe(Head):
    """The baseline every frozen-backbone sweep reports: standardised features -> one linear
    layer, fitted by scikit-learn's ``LogisticRegression`` (:meth:`load_sklearn`), not by SGD.

    For two classes the logits are ``[0, w.x + b]``, so ``softmax`` gives the logistic
    regression's probabilities exactly.
    """

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = Standardize(in_dim)
        self.out = nn.Linear(in_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.norm(x))

    @torch.no_grad()
    def load_sklearn(self, model: "object") -> "LinearProbe":
        """Copy a fitted ``LogisticRegression`` (on the standardised features) into the layer."""
        coef = torch.as_tensor(np.asarray(model.coef_), dtype=torch.float32)  # [1 or C, D]
        bias = torch.as_tensor(np.asarray(model.intercept_), dtype=torch.float32)
        if coef.shape[0] == 1:  # binary: class 1 against class 0
            coef = torch.cat([torch.zeros_like(coef), coef])
            bias = torch.cat([torch.zeros_like(bias), bias])
        self.out.weight.copy_(coef)
        self.out.bias.copy_(bias)
        return self


def _fit_norm(head: nn.Module, x: np.ndarray) -> None:
    """Pre-fit step: the head's per-feature / per-channel standardisation from the training rows."""
    head.norm.fit(x)


def _fit_svm(head: nn.Module, x: np.ndarray, y: np.ndarray, groups: np.ndarray | None) -> None:
    """Post-fit step of head ``b``: the calibrated SVM on the trained penultimate features."""
    head.fit_svm(np.asarray(x, np.float32), np.asarray(y, np.int64), groups=groups)


def _mc_pooled(head: nn.Module, x: Tensor, passes: int, seed: int = 0, first: int = 0) -> np.ndarray:
    from raycyto.models.mc import mc_head_predict

    return mc_head_predict(head, x, passes, seed=seed, first=first)


def _mc_map(head: nn.Module, x: Tensor, passes: int, seed: int = 0, first: int = 0) -> np.ndarray:
    from raycyto.models.spatial import mc_map_predict

    return mc_map_predict(head, x, passes, seed=seed, first=first)


#: what a head reads: pooled backbone features ``[N, D]`` or the backbone's feature map ``[N, C, h, w]``
READS = ("pooled", "map")
#: how a head shows where its evidence is (:meth:`Head.evidence`)
EVIDENCE_METHODS = ("gradcam", "additive")


@dataclass(frozen=True)
class HeadSpec:
    """One registry entry: how to build a head and what it can do. Callers read these
    capabilities instead of testing a head's type or attributes.

    Attributes:
        build: ``(in_dim, num_classes, **options) -> nn.Module``.
        reads: ``"pooled"`` (``[N, D]`` features of the whole backbone) or ``"map"`` (the
            backbone's feature map ``spec.feature_map``; frozen backbones only, trained on
            cached maps).
        pre_fit: ``(head, x_train)`` run before training (a ``Standardize`` to fit), or None.
        post_fit: ``(head, x_train, y_train, groups)`` run on the best epoch's head (the SVM of
            head ``b``), or None.
        mc: head-scope MC passes ``(head, x, passes, seed=, first=) -> probs [N, T, C]`` (map
            heads: without T copies of every map).
        evidence: what :meth:`Head.evidence` gives: ``"additive"`` (exact per-cell
            decomposition of the logit, computed from the embedding) or ``"gradcam"``
            (Grad-CAM through the backbone, on request).
        baseline: fitted by ``raycyto.tune.probe`` in every frozen sweep, never a grid.heads choice.
    """

    build: Callable[..., nn.Module]
    reads: str = "pooled"
    pre_fit: Callable[[nn.Module, np.ndarray], None] | None = None
    post_fit: Callable[..., None] | None = None
    mc: Callable[..., np.ndarray] = _mc_pooled
    evidence: str = "gradcam"
    baseline: bool = False

    @property
    def reads_map(self) -> bool:
        """True when the head reads a feature map (so it needs a frozen backbone's map)."""
        return self.reads == "map"


HEADS: dict[str, HeadSpec] = {
    "a": HeadSpec(partial(MLPHead, hidden=(128,))),
    "b": HeadSpec(SVMHead, post_fit=_fit_svm),
    "c": HeadSpec(partial(MLPHead, hidden=(1024, 512, 128))),
    "d": HeadSpec(partial(MLPHead, hidden=(1024, 512, 128), dropout=0.5)),
    "k": HeadSpec(StudyAHead),
    # feature maps [N, C, h, w] (raycyto.models.spatial)
    "s": HeadSpec(build_spatial_head, reads="map", pre_fit=_fit_norm, mc=_mc_map, evidence="additive"),
    # the baseline (raycyto.tune.probe: scikit-learn fits it), not a grid.heads choice
    "probe": HeadSpec(LinearProbe, pre_fit=_fit_norm, baseline=True),
}
#: Heads that are baselines: fitted by raycyto.tune.probe in every frozen sweep, never in grid.heads.
BASELINE_HEADS = tuple(name for name, spec in HEADS.items() if spec.baseline)


def head_spec(name: str) -> HeadSpec:
    """The registry entry of head ``name`` (unknown names raise, listing the known ones)."""
    if name not in HEADS:
        raise RaycytoError(f"unknown head {name!r}; known: {', '.join(HEADS)}")
    return HEADS[name]


def build_head(name: str, in_dim: int, num_classes: int, **kw) -> nn.Module:
    """Build a head from the registry.

    Args:
        name: one of :data:`HEADS` (``a b c d k``; ``s`` reads feature maps, see raycyto.models.spatial).
        in_dim: feature width D.
        num_classes: C (2 for binary tasks).
        **kw: head options (``k``: units, dropout1, dropout2; ``b``: svm_cv, svm_c, seed).
    Returns:
        module ``[N, D] -> logits [N, C]``.
    """
    spec = head_spec(name)
    if int(num_classes) < 2:
        raise RaycytoError(f"num_classes must be >= 2 (binary tasks use 2 logits), got {num_classes}")
    try:
        return spec.build(int(in_dim), int(num_classes), **kw)
    except TypeError as e:
        raise RaycytoError(f"head {name!r}: bad options {kw}: {e}") from e
