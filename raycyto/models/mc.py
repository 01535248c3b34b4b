"""Monte-Carlo dropout: exact, seeded, and cheap when dropout lives only in the head.

:class:`MCDropout` behaves like ``nn.Dropout`` while training. In ``eval()`` it is the
identity unless MC mode is switched on with :func:`mc_mode`, in which case it samples
masks from a seeded ``torch.Generator``. The model itself stays in ``eval()`` the whole
time (baal's approach), so batch-norm running statistics are used, never updated.

``scope="head"``: the backbone runs once (deterministically) and the T passes run on the
features in one vectorised call: features ``[N, D]`` are repeated to ``[N*T, D]``, so every
(image, pass) row gets its own independent mask -- exactly T independent MC passes per
image. Dropout placed inside the backbone (``backbone_dropout``) is *not* sampled in this
scope; use ``scope="full"``, where every pass runs the whole network, for that.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover
    from raycyto.models.classifier import Classifier

SCOPES = ("head", "full")


class MCDropout(nn.Dropout):
    """Dropout that can stay on in ``eval()`` (MC mode), with seeded masks.

    Attributes:
        mc: True while inside :func:`mc_mode`.
        generator: the ``torch.Generator`` masks are drawn from in MC mode.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__(p=p)
        self.mc = False
        self.generator: torch.Generator | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            return super().forward(x)
        if not self.mc or self.p == 0.0:
            return x
        if self.p >= 1.0:
            return torch.zeros_like(x)
        keep = torch.empty_like(x).bernoulli_(1.0 - self.p, generator=self.generator)
        return x * keep / (1.0 - self.p)

    def pre_hook(self, module: nn.Module, args: tuple) -> tuple:
        """Forward pre-hook: apply this dropout to ``module``'s first input."""
        return (self(args[0]), *args[1:])


def mc_dropouts(model: nn.Module) -> list[MCDropout]:
    """All :class:`MCDropout` modules in ``model``."""
    return [m for m in model.modules() if isinstance(m, MCDropout)]


@contextlib.contextmanager
def mc_mode(model: nn.Module, seed: int = 0) -> Iterator[torch.Generator]:
    """Switch ``model``'s MC dropouts on (seeded) without touching train/eval state.

    Args:
        model: any module holding :class:`MCDropout` layers.
        seed: seed for the one generator shared by all of them (passes are reproducible).
    Yields:
        the generator.
    """
    gen = torch.Generator().manual_seed(int(seed))
    drops = mc_dropouts(model)
    saved = [(d.mc, d.generator) for d in drops]
    for d in drops:
        d.mc, d.generator = True, gen
    try:
        yield gen
    finally:
        for d, (mc, g) in zip(drops, saved):
            d.mc, d.generator = mc, g


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    """Put the model in eval for the block and restore its train/eval flags after."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, f in flags.items():
            m.training = f


def _check(passes: int, scope: str = "head") -> None:
    from raycyto.errors import RaycytoError

    if int(passes) < 1:
        raise RaycytoError(f"passes must be >= 1, got {passes}")
    if scope not in SCOPES:
        raise RaycytoError(f"scope must be one of {SCOPES}, got {scope!r}")


@torch.no_grad()
def _head_passes(head_fn, features: Tensor, passes: int, chunk_rows: int) -> Tensor:
    """Vectorised MC passes of ``head_fn`` on ``features [N, D]`` -> probs ``[N, T, C]``."""
    n = features.shape[0]
    per = max(1, chunk_rows // passes)  # images per chunk so one call holds <= chunk_rows rows
    out = []
    for i in range(0, n, per):
        f = features[i:i + per]
        rep = f.repeat_interleave(passes, dim=0)  # [n*T, D], image-major
        logits = head_fn(rep)  # [n*T, C]
        out.append(logits.softmax(-1).view(f.shape[0], passes, -1))  # [n, T, C]
    return torch.cat(out, 0)


def mc_head_predict(head: nn.Module, features: Tensor, passes: int, seed: int = 0,
                    chunk_rows: int = 65536) -> np.ndarray:
    """MC dropout on a head alone.

    Args:
        head: module ``[N, D] -> logits [N, C]`` with :class:`MCDropout` layers.
        features: ``[N, D]`` backbone features.
        passes: T.
        seed: generator seed.
        chunk_rows: at most this many ``[row, D]`` rows per head call (memory bound).
    Returns:
        probs ``[N, T, C]`` float32.
    """
    _check(passes)
    with _eval(head), mc_mode(head, seed):
        return _head_passes(head, features, int(passes), chunk_rows).numpy()


@torch.no_grad()
def mc_predict(model: "Classifier | nn.Module", x: Tensor, passes: int, scope: str = "head",
               seed: int = 0, features: Tensor | None = None,
               chunk_rows: int = 65536) -> np.ndarray:
    """Monte-Carlo dropout predictions.

    Args:
        model: a :class:`~raycyto.models.classifier.Classifier` (``scope="head"`` needs its
            ``features`` / ``classify_features``); any module for ``scope="full"``.
        x: ``[N, 3, H, W]`` preprocessed images (may be None when ``features`` is given).
        passes: T stochastic passes.
        scope: ``"head"`` (backbone once, passes vectorised on the head) or ``"full"``
            (every pass runs the whole network).
        seed: generator seed; same seed -> same probabilities.
        features: precomputed ``[N, D]`` features (``scope="head"`` only).
        chunk_rows: memory bound for the vectorised head call.
    Returns:
        probs ``[N, T, C]`` float32.
    """
    _check(passes, scope)
    t = int(passes)
    with _eval(model):
        if scope == "head":
            if features is None:
                features = model.features(x)  # [N, D], deterministic (MC mode still off)
            with mc_mode(model, seed):
                probs = _head_passes(model.classify_features, features, t, chunk_rows)
        else:
            with mc_mode(model, seed):
                probs = torch.stack([model(x).softmax(-1) for _ in range(t)], 1)  # [N, T, C]
    return probs.float().numpy()


def summarize(probs: np.ndarray, threshold: float = 0.8) -> dict[str, np.ndarray]:
    """Per-image summary of MC passes (study A's vote + confidence, and more).

    Args:
        probs: ``[N, T, C]`` softmax probabilities of T passes.
        threshold: refer an image to a human when its vote confidence is below this.
    Returns:
        dict of numpy arrays:
        ``vote [N]`` int -- majority label over the per-pass argmax (ties -> lowest label);
        ``confidence [N]`` -- share of passes that voted for ``vote``;
        ``mean [N, C]`` / ``std [N, C]`` -- over passes (population std);
        ``entropy [N]`` -- predictive entropy of ``mean`` (nats);
        ``mutual_information [N]`` -- entropy of mean minus mean per-pass entropy;
        ``refer [N]`` bool -- ``confidence < threshold``.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 3 or p.shape[1] < 1 or p.shape[2] < 2:
        from raycyto.errors import RaycytoError

        raise RaycytoError(f"probs must be [N, T, C] with T >= 1, C >= 2; got shape {p.shape}")
    n, t, c = p.shape
    labels = p.argmax(-1)  # [N, T]
    counts = np.zeros((n, c), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(n), t), labels.ravel()), 1)  # [N, C]
    vote = counts.argmax(-1)  # first max -> lowest label on ties
    confidence = counts[np.arange(n), vote] / t
    mean = p.mean(1)  # [N, C]

    def ent(q: np.ndarray) -> np.ndarray:
        return -(q * np.log(np.clip(q, 1e-12, None))).sum(-1)

    entropy = ent(mean)
    mi = np.clip(entropy - ent(p).mean(1), 0.0, None)  # >= 0 up to rounding
    return {"vote": vote.astype(np.int64), "confidence": confidence, "mean": mean,
            "std": p.std(1), "entropy": entropy, "mutual_information": mi,
            "refer": confidence < threshold}
