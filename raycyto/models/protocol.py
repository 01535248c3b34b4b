"""The head protocol: every registry head is a :class:`Head` (an ``nn.Module`` mapping what it
reads to logits) and answers :meth:`Head.evidence`, where in the image its answer comes from.

Pooled heads see one vector per image, so their evidence has to come back through the
backbone: Grad-CAM (captum's ``LayerGradCam``, :func:`raycyto.evidence.maps.gradcam`), a
backward pass, so it runs on request only. Map heads (``s``) score every cell of the feature
map themselves and override :meth:`Head.evidence` with an exact additive decomposition of the
logit, computed from the embedding they already have (no backward pass, no extra backbone run).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover
    from raycyto.evidence.maps import EvidenceMap


class Head(nn.Module):
    """Base of every registry head."""

    def evidence(self, model: nn.Module, x: Optional[Tensor], target: Optional[Tensor] = None,
                 embedding: Optional[Tensor] = None) -> "EvidenceMap":
        """Where the answer for class ``target`` comes from, per image.

        Args:
            model: the :class:`~raycyto.models.classifier.Classifier` this head sits on.
            x: preprocessed images ``[N, 3, S, S]`` (pooled heads need them: Grad-CAM runs
                the backbone); may be None for map heads when ``embedding`` is given.
            target: class index per image ``[N]`` (None: the predicted class).
            embedding: what the head reads (``model.features(x)``), if already computed.
        Returns:
            an :class:`~raycyto.evidence.maps.EvidenceMap` (values ``[N, h, w]`` on a grid
            covering the whole input image).
        """
        from raycyto.evidence.maps import gradcam

        return gradcam(model, x, target)
