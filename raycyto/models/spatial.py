"""Spatial heads: classify a backbone's feature map ``[N, C, h, w]``, not its pooled vector.

A karyogram is an ordered layout: every chromosome pair sits in a known slot (about 1 %
position jitter), and an abnormality is local -- a third small chromosome in slot 13, 18 or
21, one X and no Y, a q arm shortened by 30-45 % in one of chromosomes 1-12, two large
chromosomes of changed length and banding. Global average pooling averages that away (a
logistic regression on pooled EfficientNet-Lite0 features of the default synthetic
karyograms scores about 0.57 balanced accuracy), so these heads read the map itself.

:class:`MILMapHead` (registry letter ``s`` in :data:`raycyto.models.heads.HEADS`) is a
positional multiple-instance head: every map cell is an instance, and a class is present if
some cell carries evidence for it (a smooth maximum, noisy-OR like):

1. ``trunk``: ``k x k`` conv ``C -> width`` + batch norm + ReLU. The 3x3 context matters:
   45,X is "one X *and* no Y", two neighbouring slots.
2. per-cell class scores ``s[n, c, p] = z[n, :, p] . (u_c + W[c, p]) + b[c, p]``: a readout
   ``u_c`` shared by all cells (a shortened or extra chromosome looks alike in every slot,
   and each slot sees few abnormal examples) plus a position-specific correction ``W[c, p]``
   and bias ``b[c, p]`` (what is normal differs per slot: one Y, short acrocentrics ...).
3. ``logits[n, c] = tau * logsumexp_p(s[n, c, p] / tau) + bias_c``.

Dropout lives only here, so head-scope MC dropout is exact: ``channel_dropout`` drops whole
channels of ``z`` (one mask per row and channel), which is what makes MC passes disagree on
borderline cases -- elementwise dropout on hundreds of cells averages out, and its passes
vote unanimously; ``dropout`` is optional elementwise dropout on ``z``. Every
:class:`~raycyto.models.mc.MCDropout` here receives a tensor whose first dimension is the
batch (``N`` or ``N*T`` image-major in MC mode).

MC cost: the trunk is deterministic in eval mode. When MC mode runs ``T > 1`` passes on
rows that are exact repeats (what head-scope MC feeds a head: ``[N*T, C, h, w]``,
image-major), :meth:`MILMapHead.forward` runs the trunk once per image and only the cheap
readout per pass (with ``dropout=0``, one small matrix product per image for all T passes).
The caller's ``T`` copies of every map still cost memory and time (T=100 on 240 Lite0 maps:
9 s at one thread, mostly copying 7 GB); :func:`mc_map_predict` gives the same passes
without them (~1.5 s); :meth:`~MILMapHead.trunk` / :meth:`~MILMapHead.readout` are public for
callers that repeat the trunk output themselves (``T`` copies of ``[width, h, w]`` instead
of ``[C, h, w]``: 3.5x less memory for Lite0 ``blocks.4``).

Feature maps come from :func:`raycyto.models.registry.build_map_extractor` (the layer named
by ``BackboneSpec.feature_map``); :func:`raycyto.models.build_classifier` builds the map
extractor + this head as one Classifier (head ``s``). Measured on the default synthetic
karyograms (README, "How learnable the synthetic sets are"): Lite0 ``blocks.4`` at 416 px
(112 x 26 x 26, 148 KB per image and copy in float16) -> 0.95 balanced accuracy over 5 test
folds with 600 patients (0.90-0.95 over three seeds), where the probe on pooled features gives 0.55.

Example::

    from raycyto.models.registry import build_map_extractor, get_spec
    maps = build_map_extractor("efficientnet_lite0", pretrained=True).eval()
    fm = get_spec("efficientnet_lite0").feature_map          # blocks.4, 112 channels, stride 16
    head = MILMapHead(fm.channels, map_grid(maps, 416), num_classes=2)
    logits = head(maps(x))                                   # x: [N, 3, 416, 416]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor, nn

from raycyto.errors import DataError, RaycytoError
from raycyto.models.mc import MCDropout
from raycyto.models.protocol import Head

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from raycyto.evidence.maps import EvidenceMap

__all__ = ["MILMapHead", "is_spatial", "map_grid",
           "build_spatial_head", "mc_map_predict"]


def _grid(grid: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(grid, int):
        grid = (grid, grid)
    g = tuple(int(v) for v in grid)
    if len(g) != 2 or min(g) < 1:
        raise RaycytoError(f"grid must be an int or (h, w) of positive ints, got {grid!r}")
    return g  # type: ignore[return-value]


class MILMapHead(Head):
    """Positional multiple-instance head ``[N, C, h, w] -> logits [N, num_classes]``.

    Args:
        channels: C, channels of the feature map.
        grid: ``(h, w)`` of the map (an int for square maps); fixed, because the readout is
            partly position-specific.
        num_classes: number of logits (2 for binary tasks).
        width: channels after the trunk conv.
        kernel: trunk conv size (odd; 3 gives each cell its neighbours' context).
        channel_dropout: MC dropout rate on whole trunk channels.
        dropout: MC dropout rate on single trunk activations (0 = none).
        temperature: ``tau`` of the smooth maximum over cells (-> max as tau -> 0).
        shared: add the readout shared by all cells (True: recommended).
        reference: a class whose logit is pinned at 0 -- "no cell carries evidence" (binary
            tasks: the negative class, set by the sweep). Without it every class is a smooth
            maximum over cells, which for "normal" means "some cell looks normal": on the
            default karyograms that variant stalled for epochs at chance and reached 0.84
            balanced accuracy over 5 folds against 0.95 with the reference (README, learnability).

    The input is standardised per channel with the training maps' statistics
    (:class:`~raycyto.models.heads.Standardize`, fitted by ``train_head``; saved with the
    weights) and cast to float32 (cached maps are float16).
    """

    def __init__(self, channels: int, grid: int | Sequence[int], num_classes: int, width: int = 32,
                 kernel: int = 3, channel_dropout: float = 0.3, dropout: float = 0.0,
                 temperature: float = 1.0, shared: bool = True, reference: int | None = None) -> None:
        super().__init__()
        from raycyto.models.heads import Standardize  # heads imports this module
        h, w = _grid(grid)
        if int(num_classes) < 2:
            raise RaycytoError(f"num_classes must be >= 2, got {num_classes}")
        if int(kernel) < 1 or int(kernel) % 2 == 0:
            raise RaycytoError(f"kernel must be a positive odd int, got {kernel}")
        if float(temperature) <= 0:
            raise RaycytoError(f"temperature must be > 0, got {temperature}")
        if reference is not None and not 0 <= int(reference) < int(num_classes):
            raise RaycytoError(f"reference must be a class index in [0, {num_classes}), got {reference}")
        self.channels, self.grid, self.num_classes = int(channels), (h, w), int(num_classes)
        self.reference = None if reference is None else int(reference)
        self.norm = Standardize(self.channels)
        self.width, self.temperature = int(width), float(temperature)
        cells = h * w
        self.conv = nn.Conv2d(self.channels, self.width, int(kernel), padding=int(kernel) // 2)
        self.bn = nn.BatchNorm2d(self.width)
        self.channel_drop = MCDropout(float(channel_dropout))
        self.drop = MCDropout(float(dropout))
        self.shared = nn.Parameter(torch.randn(self.num_classes, self.width) * 0.1) if shared else None
        self.position = nn.Parameter(torch.randn(self.num_classes, cells, self.width) * 0.01)
        self.cell_bias = nn.Parameter(torch.full((self.num_classes, cells), -2.0))
        self.bias = nn.Parameter(torch.zeros(self.num_classes))

    def trunk(self, x: Tensor) -> Tensor:
        """Deterministic (in eval) part: ``[N, C, h, w] -> [N, width, h, w]`` (a 1x1-grid head
        also takes pooled ``[N, C]``)."""
        if x.ndim == 2 and self.grid == (1, 1):
            x = x[:, :, None, None]
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.channels, *self.grid):
            raise DataError(f"spatial head expects maps [N, {self.channels}, {self.grid[0]}, "
                            f"{self.grid[1]}], got {tuple(x.shape)} (input size or layer differs "
                            "from the one the head was built for)")
        return torch.relu(self.bn(self.conv(self.norm(x.float()))))

    def _weights(self) -> Tensor:
        """Per-cell readout weights ``[num_classes, h*w, width]`` (shared + position-specific)."""
        return self.position if self.shared is None else self.position + self.shared[:, None, :]

    def _pool(self, s: Tensor) -> Tensor:
        """Cell scores ``[..., num_classes, h*w]`` -> logits ``[..., num_classes]``."""
        t = self.temperature
        logits = t * torch.logsumexp((s + self.cell_bias) / t, dim=-1) + self.bias
        if self.reference is None:
            return logits
        keep = torch.ones(self.num_classes, dtype=logits.dtype, device=logits.device)
        keep[self.reference] = 0.0  # the reference class: logit 0, "no evidence anywhere"
        return logits * keep

    def cell_scores(self, z: Tensor) -> Tensor:
        """Dropout + per-cell class scores (before the cell bias): ``[N, width, h, w] -> [N, C, h*w]``."""
        n = z.shape[0]
        # whole-channel dropout: a [rows, width, 1, 1] mask, broadcast over the cells
        z = z * self.channel_drop(z.new_ones(n, self.width, 1, 1))
        z = self.drop(z.flatten(2))  # [N, width, P]
        w = self._weights().transpose(1, 2)  # [C, width, P]
        # a multiply-sum per class: einsum("nrp,cpr->ncp") runs one tiny matmul per cell (676
        # for Lite0 blocks.4); a training step is 1.22x faster this way (benchmarks/spatial_readout.py)
        return torch.stack([(z * w[c]).sum(1) for c in range(self.num_classes)], 1)

    def readout(self, z: Tensor) -> Tensor:
        """Stochastic part (MC dropout): trunk output ``[N, width, h, w] -> logits [N, C]``."""
        return self._pool(self.cell_scores(z))

    def _readout_repeated(self, z: Tensor, t: int) -> Tensor:
        """``readout(z.repeat_interleave(t, 0))`` without the repeats (elementwise dropout off):
        a channel mask only rescales each channel's contribution, so per image the T passes are
        one matrix product ``[C*P, width] @ [width, T]``. Same masks, same dropout calls."""
        n, c, p = z.shape[0], self.num_classes, z.shape[2] * z.shape[3]
        masks = self.channel_drop(z.new_ones(n * t, self.width, 1, 1)).view(n, t, self.width)
        zw = torch.einsum("nrp,cpr->ncpr", z.flatten(2), self._weights())  # [n, C, P, width]
        s = torch.matmul(zw.reshape(n, c * p, self.width), masks.transpose(1, 2))  # [n, C*P, T]
        s = s.view(n, c, p, t).permute(0, 3, 1, 2)  # [n, T, C, P]
        return self._pool(s).reshape(n * t, c)

    def readout_passes(self, z: Tensor, t: int) -> Tensor:
        """``readout(z.repeat_interleave(t, 0))``: the T passes of every image's trunk output
        ``[n, width, h, w]`` -> logits ``[n*T, C]`` (image-major); one matrix product per image
        when elementwise dropout is off."""
        if self.drop.p == 0:
            return self._readout_repeated(z, t)
        return self.readout(z.repeat_interleave(t, dim=0))

    def penultimate(self, x: Tensor) -> Tensor:
        """``[N, width]``: the trunk's channels, max over cells (an embedding, no dropout)."""
        return self.trunk(x).amax(dim=(2, 3))

    @torch.no_grad()
    def evidence(self, model: nn.Module | None, x: Tensor | None, target: Tensor | None = None,
                 embedding: Tensor | None = None) -> "EvidenceMap":
        """Exact additive per-cell decomposition of the logit (no dropout, eval statistics).

        With ``s_cp`` the cell scores plus cell bias, ``L_c = tau * logsumexp_p(s_cp / tau)``
        and ``w_cp = softmax_p(s_cp / tau)``, cell ``p`` contributes ``w_cp * L_c``; the cells
        sum to ``L_c``, and ``logit_c = L_c + bias_c``. With a ``reference`` class (binary
        sweeps) the explained quantity is the margin ``logit_target - logit_other``: for a
        non-reference target that is its logit (the reference is pinned at 0); for the
        reference itself it is minus the strongest other class's logit, so the cells carry
        ``-w * L`` (evidence *against* that class). Computed in float64.

        Args:
            model: the Classifier (its ``features`` make the map when ``embedding`` is None).
            x: preprocessed images ``[N, 3, S, S]`` (unused when ``embedding`` is given).
            target: class per image ``[N]`` or an int; None: the deterministic forward's argmax.
            embedding: the feature maps ``[N, C, h, w]`` this head reads.
        Returns:
            :class:`~raycyto.evidence.maps.EvidenceMap` (``additive``, values ``[N, h, w]``).
        """
        from raycyto.evidence.maps import EvidenceMap

        maps = embedding if embedding is not None else model.features(x)
        was = self.training
        self.eval()
        try:
            z = self.trunk(maps).double().flatten(2)  # [N, width, P]
        finally:
            self.train(was)
        w = self._weights().double()  # [C, P, width]
        s = torch.einsum("nrp,cpr->ncp", z, w) + self.cell_bias.double()  # [N, C, P]
        tau = self.temperature
        pooled = tau * torch.logsumexp(s / tau, dim=-1)  # [N, C]
        logits = pooled + self.bias.double()
        n = z.shape[0]
        if self.reference is not None:
            logits[:, self.reference] = 0.0
        t = logits.argmax(-1) if target is None else torch.as_tensor(target, dtype=torch.int64).reshape(-1).expand(n)
        cls, sign = t.clone(), torch.ones(n, dtype=torch.float64)
        if self.reference is not None:
            others = logits.clone()
            others[:, self.reference] = -torch.inf
            is_ref = t == self.reference
            cls = torch.where(is_ref, others.argmax(-1), t)
            sign = torch.where(is_ref, -1.0, 1.0).double()
        rows = torch.arange(n)
        share = torch.softmax(s[rows, cls] / tau, dim=-1)  # [N, P]
        values = sign[:, None] * share * pooled[rows, cls][:, None]
        bias = sign * self.bias.double()[cls]
        h, wd = self.grid
        return EvidenceMap("additive", values.view(n, h, wd).cpu().numpy(), t.cpu().numpy(),
                           (values.sum(-1) + bias).cpu().numpy(), bias.cpu().numpy())

    def _mc_passes(self) -> int:
        state = getattr(self.channel_drop, "state", None) or getattr(self.drop, "state", None)
        return int(getattr(state, "passes", 1) or 1)

    def forward(self, x: Tensor) -> Tensor:
        t = self._mc_passes()
        if not self.training and t > 1 and x.shape[0] % t == 0:
            rows = x.view(x.shape[0] // t, t, *x.shape[1:])
            if torch.equal(rows, rows[:, :1].expand_as(rows)):  # head scope: T repeats per image
                return self.readout_passes(self.trunk(rows[:, 0]), t)
        return self.readout(self.trunk(x))


@torch.no_grad()
def mc_map_predict(head: MILMapHead, maps: Tensor, passes: int, seed: int = 0, first: int = 0,
                   chunk: int = 64) -> "np.ndarray":
    """Head-scope MC passes of a spatial head without materialising ``T`` copies of each map.

    Equals :func:`raycyto.models.mc.mc_head_predict` (same seed, passes and ``first``: the
    same masks, pass for pass) -- which repeats every ``[C, h, w]`` map ``T`` times before the
    head runs (7 GB of copies for 240 Lite0 maps at T=100) -- but runs the trunk once per image
    and, with ``dropout=0``, all T readouts as one matrix product per image.

    Args:
        head: the spatial head (put in eval mode for the call, flags restored after).
        maps: ``[N, C, h, w]`` feature maps.
        passes: T.
        seed, first: as :func:`~raycyto.models.mc.mc_head_predict`.
        chunk: images per call.
    Returns:
        probs ``[N, T, num_classes]`` float32.
    """
    from raycyto.models.mc import _check, _eval, mc_mode

    _check(passes)
    t = int(passes)
    out = []
    with _eval(head):
        for i in range(0, maps.shape[0], int(chunk)):
            z = head.trunk(maps[i:i + int(chunk)])
            with mc_mode(head, seed, t, first):
                logits = head.readout_passes(z, t)
            out.append(logits.softmax(-1).view(z.shape[0], t, -1))
    return torch.cat(out, 0).float().cpu().numpy()


@torch.no_grad()
def map_grid(extractor: nn.Module, input_size: int) -> tuple[int, int]:
    """``(h, w)`` of ``extractor``'s map for square ``input_size`` inputs (one zero image, eval)."""
    was = extractor.training
    extractor.eval()
    try:
        out = extractor(torch.zeros(1, 3, int(input_size), int(input_size)))
    finally:
        extractor.train(was)
    return int(out.shape[-2]), int(out.shape[-1])


def build_spatial_head(in_dim: int, num_classes: int, grid: int | Sequence[int] = 1,
                       **kw) -> MILMapHead:
    """``HEADS["s"]``: the registry's ``(in_dim, num_classes, **options)`` calling convention,
    with ``in_dim`` = map channels and ``grid=(h, w)`` the map's grid (from
    :func:`map_grid`). The default 1x1 grid also accepts pooled ``[N, D]`` features, where the
    head degenerates to a small non-spatial head (what it does on pooled features; a map of
    another grid is refused with a DataError)."""
    return MILMapHead(in_dim, grid, num_classes, **kw)


def is_spatial(head: str) -> bool:
    """Whether registry head ``head`` reads a feature map (``HeadSpec.reads_map``; kept for callers
    of the old name)."""
    from raycyto.models.heads import head_spec

    return head_spec(head).reads_map
