"""A trained model on disk: ``model.json`` + state-dict files, every file SHA-256 checked.

Layout of a bundle directory::

    model.json     build arguments, preprocessing (``preprocess``: the
                   :class:`~raycyto.models.preprocessing.Preprocess` contract), MC settings,
                   files {name: sha256}, + meta
    head.pt        head state dict
    backbone.pt    backbone state dict -- only when it cannot be rebuilt from the registry:
                   fine-tuned backbones, or random (pretrained=False) ones
    ood.npz        optional out-of-distribution guard (:class:`raycyto.referral.ood.MahalanobisGuard`
                   fitted on the fold's training features; arrays + JSON meta, no pickle)

A frozen pretrained backbone is not copied: ``model.json["backbone_weights"]`` names the
registry checkpoint and its SHA-256, and loading rebuilds it through the verified,
offline weights loader.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from raycyto.errors import WeightsError
from raycyto.models.classifier import Classifier, build_classifier
from raycyto.models.preprocessing import Preprocess
from raycyto.models.weights import sha256_file

MODEL_JSON = "model.json"
_MC_DEFAULT = {"passes": 100, "threshold": 0.8, "scope": "head"}


def _backbone_saved(cfg: dict) -> bool:
    return cfg["finetune"] != "frozen" or not cfg["pretrained"]


GUARD_FILE = "ood.npz"


def save_bundle(out_dir: Path, model: Classifier, meta: dict | None = None, guard: object | None = None) -> Path:
    """Write ``model`` as a bundle.

    Args:
        out_dir: directory (created).
        model: a :class:`Classifier` from :func:`build_classifier`.
        meta: extra keys for model.json (``class_names``, ``positive_class``, ``mc``,
            config, metrics...); they may not override the keys written here.
        guard: optional :class:`~raycyto.referral.ood.MahalanobisGuard` (written as ood.npz,
            its settings under model.json ``ood``).
    Returns:
        path of model.json.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(model.config)
    if not cfg:
        raise WeightsError("save_bundle needs a Classifier built by build_classifier (no config)")
    meta = dict(meta or {})
    files = {"head.pt": model.head.state_dict()}
    if _backbone_saved(cfg):
        files["backbone.pt"] = model.backbone.state_dict()
    digests = {}
    for name, state in files.items():
        torch.save(state, out / name)
        digests[name] = sha256_file(out / name)
    if guard is not None:
        guard.save(out / GUARD_FILE)
        digests[GUARD_FILE] = sha256_file(out / GUARD_FILE)
        meta["ood"] = guard.meta()
    spec = model.spec
    c = cfg["num_classes"]
    pre = Preprocess.from_bundle(meta, spec)
    doc = {
        **meta,
        **{k: cfg[k] for k in ("backbone", "finetune", "head", "head_kwargs", "num_classes",
                               "pretrained", "backbone_dropout")},
        "class_names": list(meta.get("class_names", [str(i) for i in range(c)])),
        "positive_class": meta.get("positive_class"),
        "preprocess": pre.to_dict(),
        "image_size": pre.image_size, "input_size": pre.input_size,
        "mean": list(pre.mean), "std": list(pre.std), "interpolation": pre.interpolation,
        "mc": {**_MC_DEFAULT, **meta.get("mc", {})},
        "backbone_weights": (None if _backbone_saved(cfg)
                             else {"file": spec.weights.filename, "sha256": spec.weights.sha256}),
        "files": digests,
    }
    if len(doc["class_names"]) != c:
        raise WeightsError(f"meta class_names has {len(doc['class_names'])} names for {c} classes")
    (out / MODEL_JSON).write_text(json.dumps(doc, indent=2, sort_keys=True, default=str))
    return out / MODEL_JSON


def find_bundle_dir(path: str | Path) -> Path:
    """A bundle folder, or a main-job folder (``runs/demo``) holding one in ``model/``."""
    p = Path(path)
    if not (p / MODEL_JSON).is_file() and (p / "model" / MODEL_JSON).is_file():
        return p / "model"
    return p


def _verify(path: Path, expected: str) -> Path:
    if not path.is_file():
        raise WeightsError(f"bundle file {path} is missing")
    actual = sha256_file(path)
    if actual != expected:
        raise WeightsError(f"SHA-256 mismatch for {path}: expected {expected}, got {actual}; "
                           "the bundle was modified or corrupted")
    return path


def _load_state(path: Path, expected: str) -> dict:
    return torch.load(_verify(path, expected), map_location="cpu", weights_only=True)


def load_guard(model_dir: Path, doc: dict) -> object | None:
    """The bundle's out-of-distribution guard (checksum verified), or None when it has none."""
    sha = (doc.get("files") or {}).get(GUARD_FILE)
    if sha is None:
        return None
    from raycyto.referral.ood import MahalanobisGuard

    return MahalanobisGuard.load(_verify(Path(model_dir) / GUARD_FILE, sha))


def load_bundle(model_dir: Path) -> tuple[Classifier, dict]:
    """Load a bundle written by :func:`save_bundle`.

    Args:
        model_dir: the bundle directory (or its model.json).
    Returns:
        ``(model in eval mode, model.json dict)``.
    Raises:
        WeightsError: missing file, SHA-256 mismatch (bundle or registry weights).
    """
    d = Path(model_dir)
    d = d.parent if d.name == MODEL_JSON else d
    try:
        doc = json.loads((d / MODEL_JSON).read_text())
    except FileNotFoundError:
        raise WeightsError(f"no {MODEL_JSON} in {d}") from None
    except json.JSONDecodeError as e:
        raise WeightsError(f"{d / MODEL_JSON} is not valid JSON: {e}") from e
    files = doc.get("files", {})
    states = {name: _load_state(d / name, sha) for name, sha in files.items() if name.endswith(".pt")}
    for name, sha in files.items():  # other files (ood.npz) are verified here, read by their loaders
        if not name.endswith(".pt"):
            _verify(d / name, sha)
    rebuild = "backbone.pt" not in states
    if rebuild:
        from raycyto.models.registry import get_spec

        ref, src = doc.get("backbone_weights") or {}, get_spec(doc["backbone"]).weights
        if ref.get("file") != src.filename or ref.get("sha256") != src.sha256:
            raise WeightsError(f"bundle {d} expects backbone weights {ref}, the registry has "
                               f"{src.filename} ({src.sha256})")
    model = build_classifier(doc["backbone"], doc["head"], doc["num_classes"], doc["finetune"],
                             pretrained=rebuild, head_kwargs=doc.get("head_kwargs") or {},
                             backbone_dropout=doc.get("backbone_dropout", 0.0))
    model.config["pretrained"] = doc["pretrained"]
    if not rebuild:
        model.backbone.load_state_dict(states["backbone.pt"], strict=True)
    model.head.load_state_dict(states["head.pt"], strict=True)
    return model.eval(), doc
