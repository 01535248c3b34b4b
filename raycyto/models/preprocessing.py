"""The one preprocessing contract: decoded image -> the tensor a backbone sees.

The eval transform travels with the weights (as torchvision's ``weights.transforms()`` and
timm's ``pretrained_cfg`` do): a :class:`Preprocess` is built once from the data config and
the backbone spec, saved in every bundle's ``model.json`` and restored by the loader, and it
is the only path from a decoded image to a backbone input in feature extraction,
fine-tuning, ``raycyto predict`` and the Serve replicas::

    decoded uint8 [H, W, 3] (any size)
      -> resize to image_size x image_size  (cv2: area when shrinking, bilinear otherwise;
                                             the data pipeline's decode size, data.image_size)
      -> [augmentation: training copies only]
      -> scale to [0, 1], resize to input_size x input_size (torch, spec interpolation,
         antialiased), normalise with the spec's mean / std -> float [N, 3, S, S]

Skipping the first resize (as Serve once did) changes the features of a 427x640 photograph
by ~10 %: both steps always run, in this order, everywhere.

Example::

    pre = Preprocess.build(get_spec("efficientnet_lite0"), image_size=416, input_size=128)
    x = pre([decoded_a, decoded_b])          # [2, 3, 128, 128]
    Preprocess.from_dict(pre.to_dict()) == pre
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import numpy as np

from raycyto.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from raycyto.models.registry import BackboneSpec

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class Preprocess:
    """Decoded image -> normalised backbone input.

    Attributes:
        image_size: side of the first (cv2) resize; None keeps the decoded size.
        input_size: side of the backbone input.
        mean, std: per-channel normalisation of [0, 1] pixels.
        interpolation: torch interpolation of the second resize.
    """

    image_size: Optional[int]
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise DataError(f"preprocess.interpolation {self.interpolation!r}: expected one of {INTERPOLATIONS}")
        if self.input_size < 1 or (self.image_size is not None and self.image_size < 1):
            raise DataError(f"preprocess sizes must be positive, got image_size={self.image_size} "
                            f"input_size={self.input_size}")

    @classmethod
    def build(cls, spec: "BackboneSpec | str", image_size: Optional[int],
              input_size: Optional[int] = None) -> "Preprocess":
        """The contract of one backbone under a data config.

        Args:
            spec: backbone spec or registry name (mean, std, interpolation, native size).
            image_size: ``data.image_size`` (the decode size).
            input_size: ``data.input_size``; None = the backbone's native size.
        """
        from raycyto.models.registry import get_spec

        spec = get_spec(spec) if isinstance(spec, str) else spec
        return cls(image_size=None if image_size is None else int(image_size),
                   input_size=int(input_size or spec.input_size),
                   mean=tuple(float(v) for v in spec.mean), std=tuple(float(v) for v in spec.std),
                   interpolation=spec.interpolation)

    # ------------------------------------------------------------------ steps
    def resize(self, image: np.ndarray) -> np.ndarray:
        """First step: uint8 ``[H, W, 3]`` -> ``[image_size, image_size, 3]`` (the data pipeline's)."""
        from raycyto.data.decode import resize

        return resize(image, self.image_size) if self.image_size else image

    def to_tensor(self, images: np.ndarray) -> "torch.Tensor":
        """Second step: uint8 ``[N, S, S, 3]`` (or one ``[S, S, 3]``) -> float ``[N, 3, I, I]``.

        Scaled to [0, 1], resized to ``input_size`` (antialiased, clamped to [0, 1]), then
        ``(x - mean) / std``.

        Raises:
            DataError: wrong dtype or shape (the message gives what was received).
        """
        import torch
        import torch.nn.functional as F

        arr = np.asarray(images)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            raise DataError(f"preprocess expects uint8 images [N, H, W, 3]; got dtype {arr.dtype} "
                            f"shape {tuple(np.shape(images))}")
        s = self.input_size
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-2:] != (s, s):  # [N, 3, H, W] -> [N, 3, S, S]
            x = F.interpolate(x, size=(s, s), mode=self.interpolation, antialias=self.interpolation != "nearest",
                              align_corners=False if self.interpolation != "nearest" else None).clamp_(0.0, 1.0)
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def __call__(self, images: Sequence[np.ndarray]) -> "torch.Tensor":
        """Both steps on decoded images of any sizes: list of uint8 ``[H_i, W_i, 3]`` -> ``[N, 3, I, I]``."""
        return self.to_tensor(np.stack([self.resize(np.asarray(im)) for im in images]))

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (``model.json["preprocess"]``)."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Preprocess":
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(image_size=None if d.get("image_size") is None else int(d["image_size"]),
                       input_size=int(d["input_size"]), mean=tuple(float(v) for v in d["mean"]),
                       std=tuple(float(v) for v in d["std"]), interpolation=str(d.get("interpolation", "bilinear")))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"preprocess {dict(d)!r} is incomplete or invalid: {e}") from None

    @classmethod
    def from_bundle(cls, meta: Mapping[str, Any], spec: "BackboneSpec") -> "Preprocess":
        """The contract stored in a bundle's model.json (older bundles: rebuilt from its fields)."""
        if meta.get("preprocess"):
            return cls.from_dict(meta["preprocess"])
        return cls.build(spec, meta.get("image_size"), meta.get("input_size"))
