"""Evidence maps: where in the image a model's answer comes from.

Two methods, chosen by the head's registry entry (``HeadSpec.evidence``) and produced by its
:meth:`~raycyto.models.protocol.Head.evidence`:

- ``additive`` (map heads, ``s``): the head's logit is a smooth maximum of per-cell scores,
  ``logit_c = tau * logsumexp_p(s_cp / tau) + b_c``. With ``w_cp = softmax_p(s_cp / tau)``
  every cell's share of the pooled value is ``w_cp * tau * logsumexp_p(...)``: the cells' values
  sum to the logit minus the bias ``b_c``, exactly (``w`` sums to one). Unlike raw attention
  weights the values are class-specific, carry the logit's sign and add up to it. Computed
  once from the embedding (no MC pass, no backward pass).
- ``gradcam`` (pooled heads): Grad-CAM (Selvaraju et al.) from captum's ``LayerGradCam`` on
  the backbone's feature-map layer (``BackboneSpec.feature_map``, stride 16): the channels
  weighted by their mean gradient, summed, ReLU. Needs a backward pass through the backbone,
  so it runs on request (``explain``). captum fits as it is: it takes any forward function
  and layer; the forward we hand it runs the backbone *with* gradients (a frozen
  ``Classifier.features`` runs under ``no_grad``). pytorch-grad-cam was not used: it needs
  ``opencv-python``, which clashes with the project's ``opencv-python-headless``.

Every map is on a grid that covers the whole backbone input, and the input is the whole image
resized (:class:`~raycyto.models.preprocessing.Preprocess`: no crop, no padding), so cell
``(i, j)`` of an ``h x w`` map covers ``[j/w, (j+1)/w] x [i/h, (i+1)/h]`` of the image in
normalised coordinates, whatever its size.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

#: colour of the overlay (RGB), alpha scaled by the evidence share
HOT = np.array([255, 40, 0], dtype=np.float32)


@dataclass
class EvidenceMap:
    """Evidence of a batch of images.

    Attributes:
        method: ``"additive"`` or ``"gradcam"``.
        values: ``[N, h, w]`` float64 -- additive: each cell's contribution to ``logit``
            (``values.sum((1, 2)) + bias == logit``); gradcam: the (non-negative) Grad-CAM map.
        target: ``[N]`` the class explained.
        logit: ``[N]`` the decomposed logit (additive; None for gradcam).
        bias: ``[N]`` the part of ``logit`` no cell carries (additive; None for gradcam).
    """

    method: str
    values: np.ndarray
    target: np.ndarray
    logit: Optional[np.ndarray] = None
    bias: Optional[np.ndarray] = None

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.values.shape[1]), int(self.values.shape[2])

    @property
    def share(self) -> np.ndarray:
        """``[N, h, w]``: each cell's share of the evidence, non-negative, summing to one per
        image (additive: the smooth-maximum weights ``w``, ``values / values.sum()``; gradcam:
        the map normalised; a map without evidence: uniform)."""
        v = self.values
        if self.method == "additive":
            total = v.sum((1, 2), keepdims=True)
            s = np.where(np.abs(total) > 1e-12, v / np.where(total == 0, 1, total), 0.0)
        else:
            s = np.clip(v, 0, None)
        s = np.clip(s, 0, None)
        tot = s.sum((1, 2), keepdims=True)
        return np.where(tot > 0, s / np.where(tot == 0, 1, tot), 1.0 / (v.shape[1] * v.shape[2]))

    def item(self, i: int) -> "EvidenceMap":
        """Image ``i`` alone (a batch of one)."""
        pick = lambda a: None if a is None else a[i:i + 1]  # noqa: E731
        return EvidenceMap(self.method, self.values[i:i + 1], self.target[i:i + 1], pick(self.logit), pick(self.bias))


def _targets(target: Any, n: int, logits: Tensor) -> Tensor:
    if target is None:
        return logits.argmax(-1)
    t = torch.as_tensor(target, dtype=torch.int64).reshape(-1)
    return t.expand(n) if t.numel() == 1 else t


class _GradForward(nn.Module):
    """``pixels -> logits`` of a Classifier with gradients through its backbone (eval mode)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.classify_features(self.model.backbone(x))


def gradcam(model: nn.Module, x: Tensor, target: Any = None, layer: Optional[str] = None) -> EvidenceMap:
    """Grad-CAM of ``model`` (a Classifier) for class ``target`` on images ``x [N, 3, S, S]``.

    Args:
        model: the classifier (put in eval for the call; its train flags are restored).
        x: preprocessed images.
        target: class per image (int or ``[N]``); None: the predicted class.
        layer: backbone submodule to explain (default: the spec's feature-map layer, stride 16).
    Returns:
        :class:`EvidenceMap` (``gradcam``), values ``[N, h, w]`` at the layer's resolution.
    """
    from captum.attr import LayerGradCam

    from raycyto.errors import RaycytoError

    if x is None:
        raise RaycytoError("Grad-CAM needs the preprocessed images, not only their features")
    name = layer or (model.spec.feature_map.layer if model.spec.feature_map is not None else None)
    if name is None:
        raise RaycytoError(f"backbone {model.spec.name!r} offers no feature map for Grad-CAM; pass layer=")
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        fwd = _GradForward(model)
        with torch.no_grad():
            logits = fwd(x)
        t = _targets(target, x.shape[0], logits)
        cam = LayerGradCam(fwd, model.backbone.get_submodule(name))
        with torch.enable_grad():
            attr = cam.attribute(x.detach().clone().requires_grad_(True), target=t, relu_attributions=True)
        values = attr.detach().double().sum(1).cpu().numpy()  # [N, h, w]
    finally:
        for m, f in flags.items():
            m.training = f
    return EvidenceMap("gradcam", values, t.cpu().numpy())


def explain(model: nn.Module, x: Optional[Tensor], target: Any = None,
            embedding: Optional[Tensor] = None) -> EvidenceMap:
    """The head's evidence (:meth:`~raycyto.models.protocol.Head.evidence`): additive cells for
    map heads (from ``embedding`` when given), Grad-CAM for pooled heads."""
    return model.head.evidence(model, x, target, embedding)


def upsample(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``[h, w]`` cell values -> ``[H, W]`` pixels (each cell a block, bilinear between centres)."""
    import cv2

    return cv2.resize(np.asarray(values, np.float32), (int(size[1]), int(size[0])), interpolation=cv2.INTER_LINEAR)


def peak(share: np.ndarray) -> tuple[float, float]:
    """``(x, y)`` in normalised image coordinates of the centre of the strongest cell of ``share [h, w]``."""
    h, w = share.shape
    i, j = np.unravel_index(int(np.argmax(share)), share.shape)
    return (j + 0.5) / w, (i + 0.5) / h


def overlay(image: np.ndarray, share: np.ndarray, boxes: Optional[dict[str, tuple]] = None,
            highlight: Optional[list[str]] = None, mark: Optional[tuple[float, float]] = None) -> np.ndarray:
    """The image with the evidence painted over it: uint8 ``[H, W, 3]``.

    Args:
        image: uint8 RGB ``[H, W, 3]`` (any size).
        share: ``[h, w]`` evidence share (non-negative).
        boxes: layout boxes ``{name: (x0, y0, x1, y1)}`` (normalised); the ``highlight`` ones are outlined.
        mark: a point ``(x, y)`` (normalised) ringed in the outline colour (a map's peak, where no
            layout names a region).
    """
    import cv2

    img = np.asarray(image, np.float32)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, -1)
    hh, ww = img.shape[:2]
    s = upsample(share, (hh, ww))
    s = np.clip(s / max(float(s.max()), 1e-12), 0, 1)[..., None]
    out = img * (1 - 0.6 * s) + HOT * 0.6 * s
    out = np.clip(out, 0, 255).astype(np.uint8)
    for name in highlight or []:
        if boxes and name in boxes:
            x0, y0, x1, y1 = boxes[name]
            cv2.rectangle(out, (int(x0 * ww), int(y0 * hh)), (int(x1 * ww) - 1, int(y1 * hh) - 1),
                          (0, 90, 255), max(1, ww // 300))
    if mark is not None:
        cv2.circle(out, (int(mark[0] * ww), int(mark[1] * hh)), max(4, min(hh, ww) // 16), (0, 90, 255),
                   max(1, ww // 150))
    return out


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 RGB -> PNG bytes."""
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(np.asarray(image)[..., ::-1]))
    if not ok:  # pragma: no cover - cv2 encodes any uint8 image
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def png_base64(image: np.ndarray) -> str:
    """uint8 RGB -> base64 PNG (for JSON answers)."""
    return base64.b64encode(png_bytes(image)).decode("ascii")


def map_json(ev: EvidenceMap, class_names: list[str], digits: int = 4) -> dict[str, Any]:
    """One image's map as JSON: method, class, grid, share per cell (row-major), and for
    additive maps the logit and bias."""
    out: dict[str, Any] = {"method": ev.method, "class": class_names[int(ev.target[0])],
                           "grid": list(ev.grid),
                           "share": np.round(ev.share[0], digits).tolist()}
    if ev.logit is not None:
        out["logit"] = float(ev.logit[0])
        out["bias"] = float(ev.bias[0])
    return out


__all__ = ["EvidenceMap", "gradcam", "explain", "upsample", "peak", "overlay", "png_bytes", "png_base64",
           "map_json"]
