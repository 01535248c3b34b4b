"""raycyto.data: sources, safe decoding, augmentation policies, splits, Ray Data pipeline.

Public names are imported lazily (PEP 562) so that ``raycyto --help`` does not pull in
pandas or numpy through the CLI's import of ``raycyto.data.cli``.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "SourceTable": "sources", "read_source": "sources",
    "MAX_PIXELS": "decode", "DecodeError": "decode", "decode_image": "decode", "load_image": "decode",
    "POLICIES": "augment", "AugmentPolicy": "augment",  # the function: raycyto.data.augment.augment
    "Split": "splits", "kfold_splits": "splits", "equalize": "splits", "class_weights": "splits",
    "image_dataset": "pipeline", "split_errors": "pipeline", "load_arrays": "pipeline",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"raycyto.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'raycyto.data' has no attribute {name!r}")
