"""Backbone + head, with fine-tuning mode and optional backbone MC dropout."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from raycyto.models.finetune import FINETUNE_MODES, apply_finetune, frozen_batchnorms
from raycyto.models.heads import build_head, head_spec
from raycyto.models.mc import MCDropout
from raycyto.models.registry import BackboneSpec, build_backbone, build_map_extractor, get_spec

__all__ = ["Classifier", "build_classifier", "FINETUNE_MODES"]

#: what a head reads (``HeadSpec.reads``) -> (backbone builder, head input width from the spec):
#: pooled heads sit on the whole backbone, map heads on the backbone up to its feature map
_INPUTS = {
    "pooled": (build_backbone, lambda spec: spec.feature_dim),
    "map": (lambda name, pretrained: build_map_extractor(name, pretrained), lambda spec: spec.feature_map.channels),
}


class Classifier(nn.Module):
    """``[N, 3, H, W] -> logits [N, C]`` = head(pre_head(backbone(x))).

    Attributes:
        backbone: feature extractor ``[N, 3, H, W] -> [N, D]``.
        head: ``[N, D] -> [N, C]``.
        spec: the backbone's :class:`BackboneSpec`.
        pre_head: ``MCDropout(backbone_dropout)`` when the backbone is frozen (dropout on the
            features, sampled by head-scope MC), else identity.
        backbone_dropout: ``MCDropout`` run (via a forward pre-hook) in front of the first
            trainable block group when fine-tuning, else None.
        config: the build arguments (what a bundle needs to rebuild this model).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, spec: BackboneSpec,
                 finetune: str = "frozen", backbone_dropout: float = 0.0,
                 config: dict | None = None) -> None:
        super().__init__()
        self.backbone, self.head, self.spec = backbone, head, spec
        self.finetune = finetune
        self.config = dict(config or {})
        first = apply_finetune(backbone, spec.block_groups, finetune)
        p = float(backbone_dropout)
        self.pre_head: nn.Module = MCDropout(p) if p > 0 and not first else nn.Identity()
        self.backbone_dropout = MCDropout(p) if p > 0 and first else None
        if self.backbone_dropout is not None:
            # a bound method, so deepcopy / pickling re-point the hook at the copied dropout
            first[0].register_forward_pre_hook(self.backbone_dropout.pre_hook)

    def features(self, x: Tensor) -> Tensor:
        """``[N, 3, H, W] -> [N, D]``; no gradient through a frozen backbone."""
        ctx = torch.no_grad() if self.finetune == "frozen" else contextlib.nullcontext()
        with ctx:
            return self.backbone(x)

    def classify_features(self, f: Tensor) -> Tensor:
        """``[N, D] -> logits [N, C]`` (feature dropout + head)."""
        return self.head(self.pre_head(f))

    def forward(self, x: Tensor) -> Tensor:
        return self.classify_features(self.features(x))

    def train(self, mode: bool = True) -> "Classifier":
        """Like ``nn.Module.train`` but batch norm in frozen parts stays in eval."""
        super().train(mode)
        if mode:
            for bn in frozen_batchnorms(self.backbone):
                bn.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that train (for the optimiser)."""
        return [p for p in self.parameters() if p.requires_grad]


def build_classifier(backbone: str, head: str, num_classes: int, finetune: str = "frozen",
                     pretrained: bool = True, head_kwargs: dict | None = None,
                     backbone_dropout: float = 0.0, seed: int | None = 0) -> Classifier:
    """Build backbone + head.

    Args:
        backbone: registry name.
        head: head name (``a b c d k``, or ``s``: a spatial head on the backbone's feature
            map, ``spec.feature_map``; the backbone is then the map extractor, and
            ``head_kwargs`` carries the map's ``grid``).
        num_classes: C (2 for binary).
        finetune: one of ``frozen last1 last2 full``.
        pretrained: ImageNet weights (verified, offline) or random init when False.
        head_kwargs: options for the head.
        backbone_dropout: MC-dropout rate before the trainable block groups (on the
            features when frozen); 0 = none.
        seed: seeds random initialisation (head, and backbone when not pretrained);
            None uses the global RNG.
    Returns:
        the :class:`Classifier`, in train mode.
    """
    spec = get_spec(backbone)
    if finetune not in FINETUNE_MODES:
        from raycyto.errors import RaycytoError

        raise RaycytoError(f"finetune must be one of {FINETUNE_MODES}, got {finetune!r}")
    head_kwargs = dict(head_kwargs or {})
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(int(seed))
        hs = head_spec(head)
        if hs.reads_map and finetune != "frozen":
            from raycyto.errors import RaycytoError

            raise RaycytoError(f"spatial head {head!r} runs on a frozen backbone only, got finetune={finetune!r}")
        extractor, in_dim = _INPUTS[hs.reads]
        bb = extractor(backbone, pretrained)
        hd = build_head(head, in_dim(spec), num_classes, **head_kwargs)
    config = {"backbone": backbone, "head": head, "num_classes": int(num_classes),
              "finetune": finetune, "pretrained": bool(pretrained), "head_kwargs": head_kwargs,
              "backbone_dropout": float(backbone_dropout), "seed": seed}
    return Classifier(bb, hd, spec, finetune, backbone_dropout, config).train()
