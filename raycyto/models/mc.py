"""Monte-Carlo dropout: exact, seeded, and cheap when dropout lives only in the head.

:class:`MCDropout` behaves like ``nn.Dropout`` while training (its masks drawn from torch's CPU
generator on every device, so a seed trains alike on CPU and CUDA). In ``eval()`` it is the
identity unless MC mode is switched on with :func:`mc_mode`, in which case it applies
seeded masks. The model itself stays in ``eval()`` the whole time (baal's approach), so
batch-norm running statistics are used, never updated.

**One mask per pass.** The mask of pass ``t`` in the ``k``-th dropout call of a forward is
a counter-based hash of (seed, t, k, element index), drawn for all T passes at once in a
few vectorised integer operations, and applied to every image of the batch. So the
probabilities of pass ``t`` depend only on (seed, t, the image): never on how the T passes
are chunked, on which replica runs them, or on which other images share the batch. Inside
:func:`mc_mode` an MCDropout layer sees inputs whose leading dimension is ``N * T`` rows,
image-major (``[n0 t0, n0 t1, ..., n1 t0, ...]``), and multiplies the view ``[N, T, ...]``
with masks ``[T, ...]``.

``scope="head"``: the backbone runs once (deterministically) and the T passes run on the
features in one vectorised call (features ``[N, D]`` repeated to ``[N*T, D]``).
Dropout placed inside the backbone (``backbone_dropout``) is *not* sampled in this
scope; use ``scope="full"``, where every pass runs the whole network, for that. Without
backbone dropout the two scopes give identical passes.
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


_M32 = 0xFFFFFFFF


def hash32(x: Tensor) -> Tensor:
    """A 32-bit integer hash of int64 values, elementwise (the lowbias32 shape; both odd
    multipliers are < 2**31, so every product of a 32-bit value fits in int64)."""
    x = x & _M32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _M32
    x = ((x ^ (x >> 15)) * 0x5BD1E995) & _M32
    return x ^ (x >> 16)


class MCState:
    """The masks of passes ``first .. first + passes - 1`` of a request seeded ``seed``.

    ``mask`` is called once per dropout call of a forward, in order (the call index k tells
    the layers apart), and returns ``[T, ...]`` keep-masks.
    """

    def __init__(self, seed: int, passes: int, first: int = 0) -> None:
        self.passes = int(passes)
        t = torch.arange(int(first), int(first) + self.passes, dtype=torch.int64)
        self.pass_keys = hash32(t ^ hash32(torch.tensor(int(seed) & _M32)))  # [T]
        self.calls = 0

    def mask(self, shape: tuple[int, ...], p: float) -> Tensor:
        """Bool keep-mask ``[T, *shape]`` with P(keep) = 1 - p for the next dropout call."""
        k = hash32(torch.tensor(self.calls * 0x9E3779B1 + 0x632BE5AB))
        self.calls += 1
        j = torch.arange(int(np.prod(shape, dtype=np.int64)), dtype=torch.int64)  # element index
        u = hash32(hash32(self.pass_keys ^ k)[:, None] ^ j[None, :])  # [T, n] uniform in [0, 2**32)
        return (u >= int(p * 2**32)).view(self.passes, *shape)


class MCDropout(nn.Dropout):
    """Dropout that can stay on in ``eval()`` (MC mode), with one seeded mask per pass.

    Attributes:
        state: the :class:`MCState` while inside :func:`mc_mode` (shared by every MCDropout
            of the model), else None.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__(p=p)
        self.state: MCState | None = None

    @property
    def mc(self) -> bool:
        """True while inside :func:`mc_mode`."""
        return self.state is not None

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            return self._train_drop(x)
        if not self.mc or self.p == 0.0:
            return x
        t = self.state.passes
        if x.shape[0] % t:
            from raycyto.errors import RaycytoError

            raise RaycytoError(f"MC mode with {t} passes needs N*T leading rows, got shape {tuple(x.shape)}")
        rest = tuple(x.shape[1:])
        masks = self.state.mask(rest, self.p).to(device=x.device, dtype=x.dtype)  # [T, ...]
        out = x.view(x.shape[0] // t, t, *rest) * masks / (1.0 - self.p)  # [N, T, ...]
        return out.view(x.shape)

    def _train_drop(self, x: Tensor) -> Tensor:
        """Training dropout whose mask comes from torch's CPU generator whatever ``x``'s device:
        the same seed drops the same units on CPU and on CUDA (CUDA's generator draws another
        stream), so a trial trains to the same weights on either, up to float rounding."""
        if self.p == 0.0:
            return x
        keep = torch.rand(x.shape) >= self.p  # CPU generator, [*x.shape]
        return x * keep.to(device=x.device, dtype=x.dtype) / (1.0 - self.p)

    def pre_hook(self, module: nn.Module, args: tuple) -> tuple:
        """Forward pre-hook: apply this dropout to ``module``'s first input."""
        return (self(args[0]), *args[1:])


def mc_dropouts(model: nn.Module) -> list[MCDropout]:
    """All :class:`MCDropout` modules in ``model``."""
    return [m for m in model.modules() if isinstance(m, MCDropout)]


def has_mc_dropout(model: nn.Module) -> bool:
    """Whether MC passes of ``model`` can differ (some MCDropout with p > 0)."""
    return any(d.p > 0 for d in mc_dropouts(model))


@contextlib.contextmanager
def mc_mode(model: nn.Module, seed: int = 0, passes: int = 1, first: int = 0) -> Iterator[None]:
    """Switch ``model``'s MC dropouts on for passes ``first .. first + passes - 1``.

    One forward call per ``mc_mode`` block: the block's :class:`MCState` counts the dropout
    calls to tell the layers apart.

    Args:
        model: any module holding :class:`MCDropout` layers (train/eval state untouched).
        seed: request seed.
        passes: T, the number of passes in each forward call (inputs carry ``N * T`` rows).
        first: index of the first pass (chunks of one request continue the numbering).
    """
    state = MCState(seed, passes, first)
    drops = mc_dropouts(model)
    saved = [d.state for d in drops]
    for d in drops:
        d.state = state
    try:
        yield
    finally:
        for d, st in zip(drops, saved):
            d.state = st


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
def _head_passes(model: nn.Module, head_fn, features: Tensor, passes: int, seed: int, first: int,
                 chunk_rows: int) -> Tensor:
    """Vectorised MC passes of ``head_fn`` on ``features [N, ...]`` -> probs ``[N, T, C]``."""
    n = features.shape[0]
    per = max(1, chunk_rows // passes)  # images per chunk so one call holds <= chunk_rows rows
    out = []
    for i in range(0, n, per):
        f = features[i:i + per]
        rep = f.repeat_interleave(passes, dim=0)  # [n*T, ...], image-major
        with mc_mode(model, seed, passes, first):  # same pass masks for every chunk
            logits = head_fn(rep)  # [n*T, C]
        out.append(logits.softmax(-1).view(f.shape[0], passes, -1))  # [n, T, C]
    return torch.cat(out, 0)


def mc_head_predict(head: nn.Module, features: Tensor, passes: int, seed: int = 0,
                    chunk_rows: int = 65536, first: int = 0) -> np.ndarray:
    """MC dropout on a head alone.

    Args:
        head: module ``[N, ...] -> logits [N, C]`` with :class:`MCDropout` layers.
        features: ``[N, D]`` backbone features (or ``[N, C, H, W]`` maps for spatial heads).
        passes: T.
        seed: request seed (see :class:`MCState`).
        chunk_rows: at most this many rows per head call (memory bound; results do not
            depend on it).
        first: index of the first pass.
    Returns:
        probs ``[N, T, C]`` float32.
    """
    _check(passes)
    with _eval(head):
        return _head_passes(head, head, features, int(passes), seed, first, chunk_rows).cpu().numpy()


@torch.no_grad()
def mc_predict(model: "Classifier | nn.Module", x: Tensor, passes: int, scope: str = "head",
               seed: int = 0, features: Tensor | None = None,
               chunk_rows: int = 65536, first: int = 0) -> np.ndarray:
    """Monte-Carlo dropout predictions.

    Args:
        model: a :class:`~raycyto.models.classifier.Classifier` (``scope="head"`` needs its
            ``features`` / ``classify_features``); any module for ``scope="full"``.
        x: ``[N, 3, H, W]`` preprocessed images (may be None when ``features`` is given).
        passes: T stochastic passes.
        scope: ``"head"`` (backbone once, passes vectorised on the head) or ``"full"``
            (every pass runs the whole network).
        seed: request seed; pass ``t`` gets the same masks whatever the chunking.
        features: precomputed ``[N, D]`` features (``scope="head"`` only).
        chunk_rows: memory bound for the vectorised head call.
        first: index of the first pass (a chunk of a longer request).
    Returns:
        probs ``[N, T, C]`` float32.
    """
    _check(passes, scope)
    t = int(passes)
    with _eval(model):
        if scope == "head":
            if features is None:
                features = model.features(x)  # [N, D], deterministic (MC mode still off)
            probs = _head_passes(model, model.classify_features, features, t, seed, first, chunk_rows)
        else:
            outs = []
            for i in range(first, first + t):
                with mc_mode(model, seed, 1, i):
                    outs.append(model(x).softmax(-1))  # [N, C]
            probs = torch.stack(outs, 1)  # [N, T, C]
    return probs.float().cpu().numpy()


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
