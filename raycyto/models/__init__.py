"""raycyto.models: backbone registry + verified weights, heads, fine-tuning, MC dropout, bundles.

Names are imported lazily (``raycyto.models.cli`` is imported by ``raycyto --help`` and
must not pull in torch).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "registry": ("BackboneSpec", "WeightsSource", "BACKBONES", "get_spec", "build_backbone",
                 "preprocess"),
    "weights": ("load_state_dict", "load_into", "locate", "resolve", "verify_sha256",
                "hub_checkpoint_dir"),
    "heads": ("HEADS", "build_head", "MLPHead", "SVMHead", "StudyAHead"),
    "finetune": ("FINETUNE_MODES", "trainable_groups", "apply_finetune"),
    "classifier": ("Classifier", "build_classifier"),
    "mc": ("MCDropout", "mc_mode", "mc_predict", "mc_head_predict", "summarize", "has_mc_dropout"),
    "bundle": ("save_bundle", "load_bundle"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"raycyto.models.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'raycyto.models' has no attribute {name!r}")
