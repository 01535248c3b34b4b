"""Run any slice of a backbone's forward: the frozen prefix once, the trainable tail per epoch.

Every registry spec lists its forward as ordered submodules (``BackboneSpec.sequence``, block-group
syntax: ``"blocks.0-6"`` expands to ``blocks.0 .. blocks.6``). :class:`SequentialView` runs a slice
of that list on the *same* modules (no copies: training the tail trains the backbone), and
flattens a pooled ``[N, D, 1, 1]`` output to ``[N, D]``.

For ``lastN`` fine-tuning, :func:`prefix_tail` cuts the sequence at the first module of the
earliest trainable block group: everything before is frozen (eval-mode batch norm, no
gradient), so its output for a given (image, augmentation copy) never changes during training
and can be computed once and cached (``raycyto.tune.features``); each epoch then only runs the
tail. ``tests/test_models_split.py`` checks, for every registry backbone, that the full view equals
the backbone's own forward and that prefix then tail equals the whole.

Example::

    prefix, tail = prefix_tail(model.backbone, model.spec, "last2")
    acts = prefix(x)          # [N, 112, 26, 26] for Lite0 at 416 px: cache these (fp16)
    feats = tail(acts)        # [N, 1280] == model.backbone(x)
"""

from __future__ import annotations

from torch import Tensor, nn

from raycyto.errors import RaycytoError
from raycyto.models.finetune import _RANGE, trainable_groups


def expand(names: tuple[str, ...]) -> list[str]:
    """Block-group syntax -> plain submodule names (``"features.0-2"`` -> ``features.0..2``)."""
    out = []
    for group in names:
        for ref in group.split("+"):
            m = _RANGE.match(ref)
            out += [f"{m['parent']}.{i}" for i in range(int(m["a"]), int(m["b"]) + 1)] if m else [ref]
    return out


class SequentialView(nn.Module):
    """``modules[0] -> modules[1] -> ...`` of a backbone, sharing its parameters.

    Args:
        backbone: the built backbone.
        names: plain submodule names in forward order (see :func:`expand`).
        pooled: the slice ends with the backbone's global pooling: flatten its ``[N, D, 1, 1]``.
    """

    def __init__(self, backbone: nn.Module, names: list[str], pooled: bool = True) -> None:
        super().__init__()
        self.pooled = pooled
        try:
            mods = [backbone.get_submodule(n) for n in names]
        except AttributeError as e:
            raise RaycytoError(f"backbone has no submodule for the sequence {names}: {e}") from e
        # a plain list, not a ModuleList: the view owns nothing, the backbone keeps the parameters
        self._mods = mods
        self.names = list(names)

    def forward(self, x: Tensor) -> Tensor:
        for m in self._mods:
            x = m(x)
        return x.flatten(1) if self.pooled and x.ndim > 2 else x


def sequence_names(spec: object) -> list[str]:
    """The spec's forward as plain submodule names."""
    names = expand(spec.sequence)  # type: ignore[attr-defined]
    if not names:
        raise RaycytoError(f"backbone {spec.name!r} lists no forward sequence")  # type: ignore[attr-defined]
    return names


def split_index(spec: object, mode: str) -> int:
    """Position in :func:`sequence_names` of the first trainable module of ``mode`` (0 for
    ``full``; the length of the sequence for ``frozen``)."""
    names = sequence_names(spec)
    if mode == "full":  # every parameter trains, the stem included
        return 0
    groups = trainable_groups(spec.block_groups, mode)  # type: ignore[attr-defined]
    if not groups:
        return len(names)
    first = expand((groups[0],))[0]
    if first not in names:
        raise RaycytoError(f"{spec.name}: block group {groups[0]!r} starts at {first!r}, which its "  # type: ignore[attr-defined]
                           f"forward sequence does not list")
    return names.index(first)


def prefix_tail(backbone: nn.Module, spec: object, mode: str) -> tuple[SequentialView, SequentialView]:
    """(frozen prefix, trainable tail) views of ``backbone`` for fine-tuning ``mode``."""
    names, i = sequence_names(spec), split_index(spec, mode)
    return SequentialView(backbone, names[:i], pooled=i == len(names)), SequentialView(backbone, names[i:])
