"""Fine-tuning modes: which backbone block groups train.

- ``frozen``: no backbone parameter trains (only the head).
- ``last1`` / ``last2``: the last one / two entries of ``spec.block_groups`` train
  (e.g. VGG16's conv block 5, or blocks 4+5 -- study A's variants).
- ``full``: every backbone parameter trains.

Batch-norm layers whose parameters are frozen are kept in eval mode by
:meth:`raycyto.models.classifier.Classifier.train` (their running statistics never move).

A block group string names submodules: ``"layer4"``, an inclusive index range of a
Sequential ``"features.24-30"``, or several joined by ``+`` (``"blocks.6+conv_head+bn2"``).
"""

from __future__ import annotations

import re

from torch import nn

from raycyto.config import FINETUNE_MODES
from raycyto.errors import RaycytoError

_N_GROUPS = {"frozen": 0, "last1": 1, "last2": 2}
_RANGE = re.compile(r"^(?P<parent>.+)\.(?P<a>\d+)-(?P<b>\d+)$")


def resolve_group(module: nn.Module, group: str) -> list[nn.Module]:
    """The submodules a block-group string names, in order.

    Raises:
        RaycytoError: a name that is not a submodule of ``module``.
    """
    out = []
    for ref in group.split("+"):
        m = _RANGE.match(ref)
        names = ([f"{m['parent']}.{i}" for i in range(int(m["a"]), int(m["b"]) + 1)]
                 if m else [ref])
        for name in names:
            try:
                out.append(module.get_submodule(name))
            except AttributeError as e:
                raise RaycytoError(f"block group {group!r}: no submodule {name!r}") from e
    return out


def trainable_groups(block_groups: tuple[str, ...], mode: str) -> tuple[str, ...]:
    """The block groups that train in ``mode`` (``full`` -> all of them)."""
    if mode not in FINETUNE_MODES:
        raise RaycytoError(f"finetune must be one of {FINETUNE_MODES}, got {mode!r}")
    if mode == "full":
        return tuple(block_groups)
    n = _N_GROUPS[mode]
    return tuple(block_groups[len(block_groups) - n:]) if n else ()


def apply_finetune(backbone: nn.Module, block_groups: tuple[str, ...], mode: str) -> list[nn.Module]:
    """Set ``requires_grad`` on ``backbone`` for ``mode``.

    Args:
        backbone: the feature extractor.
        block_groups: its spec's ordered groups.
        mode: one of :data:`FINETUNE_MODES`.
    Returns:
        the first module of the earliest trainable group (where ``backbone_dropout`` goes),
        as a one-element list, or ``[]`` when frozen.
    """
    groups = trainable_groups(block_groups, mode)
    backbone.requires_grad_(mode == "full")
    first: list[nn.Module] = []
    for g in groups:
        mods = resolve_group(backbone, g)
        for m in mods:
            m.requires_grad_(True)
        first = first or mods[:1]
    return first


def frozen_batchnorms(module: nn.Module) -> list[nn.Module]:
    """Batch-norm layers with no trainable parameter (kept in eval during training)."""
    return [m for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and not any(p.requires_grad for p in m.parameters(recurse=False))]
