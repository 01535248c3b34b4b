"""The prediction core shared by the Serve deployments and offline ``raycyto predict``.

One request = embed once (the bundle's :class:`~raycyto.models.preprocessing.Preprocess`, and
the backbone when the MC scope is "head") -> T stochastic passes, optionally split into
chunks of consecutive pass indices -> concatenate ``[T, C]`` ->
:func:`raycyto.models.mc.summarize` -> JSON. Pass ``t`` is seeded from (seed, t) alone
(:class:`raycyto.models.mc.MCState`), so the answer does not depend on the chunking or on
the replicas. The default seed is the one the sweep used for the exported fold's
predictions (``model.json["mc"]["seed"]``), so an exported model reproduces
predictions.parquet's MC columns as well as its probabilities.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

DEFAULT_MC_REPLICAS = 2


# ----------------------------------------------------------------------------- scopes


def _embed_head(model: Any, x: Any) -> Any:
    return model.features(x)  # [N, 3, S, S] -> [N, D]; backbone deterministic


def _embed_full(model: Any, x: Any) -> Any:
    return x  # [N, 3, S, S]: every MC pass runs the whole network


def _passes_head(model: Any, x: Any, chunk: "Chunk") -> np.ndarray:
    from raycyto.models.mc import mc_predict

    # features given: the passes run feature dropout + head only (classify_features)
    return mc_predict(model, None, passes=chunk.count, scope="head", seed=chunk.seed, features=x,
                      first=chunk.first)  # [N, n, C]


def _passes_full(model: Any, x: Any, chunk: "Chunk") -> np.ndarray:
    from raycyto.models.mc import mc_predict

    return mc_predict(model, x, passes=chunk.count, scope="full", seed=chunk.seed, first=chunk.first)  # [N, n, C]


@dataclass(frozen=True)
class ScopeOps:
    """What the backbone deployment sends on, and how an MC replica runs its chunk."""

    embed: Callable[[Any, Any], Any]                   # (model, [N,3,S,S]) -> [N, ...]
    passes: Callable[[Any, Any, "Chunk"], np.ndarray]  # (model, [N, ...], chunk) -> [N, n, C]
    default_fan_out: Callable[[int], int]               # mc replicas -> chunks per request


# Head-scope passes are a vectorised MLP (microseconds for T=100): one chunk beats any
# fan-out, whose RPC costs milliseconds. Full-scope passes each run the whole network,
# so spreading them over the MC replicas pays (see benchmarks/serve_latency.py).
SCOPES: dict[str, ScopeOps] = {
    "head": ScopeOps(_embed_head, _passes_head, lambda replicas: 1),
    "full": ScopeOps(_embed_full, _passes_full, lambda replicas: max(1, replicas)),
}


def resolve_fan_out(fan_out: int | None, scope: str, mc_replicas: int = DEFAULT_MC_REPLICAS) -> int:
    """Chunks per request: ``fan_out`` if given, else the scope's benchmark-chosen default."""
    return int(fan_out) if fan_out else SCOPES[scope].default_fan_out(mc_replicas)


class Chunk(NamedTuple):
    """Passes ``first .. first + count - 1`` of a request seeded ``seed``."""

    first: int
    count: int
    seed: int


def chunk_plan(passes: int, chunks: int, seed: int) -> list[Chunk]:
    """Split ``passes`` into at most ``chunks`` near-equal runs of consecutive pass indices.

    Args:
        passes: T, total stochastic passes (>= 1).
        chunks: requested number of chunks (>= 1); capped at T.
        seed: request seed, shared by every chunk (pass ``t`` is seeded from (seed, t)).
    Returns:
        ``[Chunk(first, count, seed), ...]`` covering passes 0..T-1 in order.
    """
    k = max(1, min(int(chunks), int(passes)))
    parts = np.array_split(np.arange(int(passes)), k)
    return [Chunk(int(p[0]), len(p), int(seed)) for p in parts]


# ----------------------------------------------------------------------------- model


class LoadedModel:
    """A verified bundle ready to embed images and run MC chunks.

    Args:
        model_dir: folder written by ``raycyto export`` (or ``save_bundle``), or an
            object-store URI of one (copied to a local temporary folder first); its
            checksums are verified on load and a mismatch is refused.
        device: torch device string.
    """

    def __init__(self, model_dir: str | Path, device: str = "cpu") -> None:
        from contextlib import ExitStack

        from raycyto.errors import ConfigError
        from raycyto.models.bundle import load_bundle
        from raycyto.storage import local_copy

        self.model_dir = str(model_dir)  # where the bundle came from: a folder or a URI
        with ExitStack() as stack:
            try:
                local = stack.enter_context(local_copy(self.model_dir))
            except (OSError, ValueError) as exc:  # the copy from object storage failed
                raise ConfigError("model_dir", f"cannot copy the bundle from {model_dir} ({exc})") from None
            model, meta = load_bundle(local)
            self.sha256: str = hashlib.sha256((local / "model.json").read_bytes()).hexdigest()
            self.name: str = str(meta.get("name") or local.resolve().name)
        self.model = model.to(device).eval()
        self.meta = meta
        self.device = device
        mc = meta.get("mc") or {}
        self.scope: str = mc.get("scope", "head")
        if self.scope not in SCOPES:
            from raycyto.errors import WeightsError

            raise WeightsError(f"{self.model_dir}/model.json: mc.scope {self.scope!r} unknown; "
                               f"expected one of {sorted(SCOPES)}")
        self.ops = SCOPES[self.scope]
        self.default_passes: int = int(mc.get("passes", 100))
        self.default_threshold: float = float(mc.get("threshold", 0.8))
        self.default_seed: int = int(mc.get("seed", 0))
        self.class_names: list[str] = list(meta["class_names"])
        from raycyto.models.preprocessing import Preprocess

        self.preprocess = Preprocess.from_bundle(meta, model.spec)

    @property
    def info(self) -> dict[str, str]:
        """``{"name", "sha256"}`` of the bundle (sha256 of model.json, which pins every weight file)."""
        return {"name": self.name, "sha256": self.sha256}

    def embed(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Preprocess a batch of decoded images (the bundle's contract) and embed them.

        Args:
            images: uint8 RGB arrays ``[H_i, W_i, 3]`` (sizes may differ).
        Returns:
            one float32 array per image: features ``[D]`` (head scope) or pixels ``[3, S, S]`` (full).
        """
        import torch

        x = self.preprocess(images)  # [N, 3, S, S]
        with torch.no_grad():
            out = self.ops.embed(self.model, x.to(self.device))
        return [np.ascontiguousarray(o, dtype=np.float32) for o in out.detach().cpu().numpy()]

    def run_chunk(self, x: np.ndarray, chunk: Chunk) -> np.ndarray:
        """Run one chunk of seeded stochastic passes on one embedded image; returns probs ``[n, C]``."""
        import torch

        xt = torch.from_numpy(np.array(x, dtype=np.float32))[None].to(self.device)  # [1, ...]; writable copy
        with torch.no_grad():
            probs = self.ops.passes(self.model, xt, chunk)  # [1, n, C]
        return np.asarray(probs, dtype=np.float64)[0]


def build_result(probs: np.ndarray, threshold: float, class_names: Sequence[str],
                 model_info: dict[str, str], replicas: dict[str, Any]) -> dict[str, Any]:
    """Summarise the passes of one image into the /predict JSON.

    Args:
        probs: ``[T, C]`` softmax probabilities of the T passes.
        threshold: confidence below which the case is referred to a human.
        class_names: label names, index = class.
        model_info: ``{"name", "sha256"}``.
        replicas: ``{"count", "chunks", "ids"}`` describing who ran the passes.
    Returns:
        JSON-ready dict (label, confidence, refer, threshold, passes, probabilities, std,
        entropy, mutual_information, model, replicas).
    """
    from raycyto.models.mc import summarize

    s = summarize(np.asarray(probs)[None], threshold=threshold)  # every value [1, ...]
    names = list(class_names)
    return {
        "label": names[int(s["vote"][0])],
        "confidence": float(s["confidence"][0]),
        "refer": bool(s["refer"][0]),
        "threshold": float(threshold),
        "passes": int(np.asarray(probs).shape[0]),
        "probabilities": {c: float(v) for c, v in zip(names, s["mean"][0])},
        "std": {c: float(v) for c, v in zip(names, s["std"][0])},
        "entropy": float(s["entropy"][0]),
        "mutual_information": float(s["mutual_information"][0]),
        "model": dict(model_info),
        "replicas": replicas,
    }


class LocalPredictor:
    """In-process predictions with exactly the endpoint's chunking, seeds and JSON.

    Args:
        model_dir: exported model bundle.
        fan_out: chunks per request (None = the scope default, as the app uses).
        mc_replicas: MC-head replicas the app would run (decides the full-scope default).
        seed: default request seed (None: the bundle's, ``model.json["mc"]["seed"]``).
        max_pixels: decompression-bomb limit.
    """

    def __init__(self, model_dir: str | Path, fan_out: int | None = None,
                 mc_replicas: int = DEFAULT_MC_REPLICAS, seed: int | None = None,
                 max_pixels: int | None = None) -> None:
        self.model = LoadedModel(model_dir)
        self.fan_out = resolve_fan_out(fan_out, self.model.scope, mc_replicas)
        self.seed = self.model.default_seed if seed is None else int(seed)
        self.max_pixels = max_pixels

    def predict_image(self, image: np.ndarray, passes: int | None = None,
                      threshold: float | None = None, seed: int | None = None,
                      fan_out: int | None = None) -> dict[str, Any]:
        """Predict one decoded uint8 image ``[H, W, 3]``; returns the /predict JSON."""
        m = self.model
        passes = passes or m.default_passes
        threshold = m.default_threshold if threshold is None else threshold
        x = m.embed([image])[0]
        plan = chunk_plan(passes, fan_out or self.fan_out, self.seed if seed is None else seed)
        probs = np.concatenate([m.run_chunk(x, c) for c in plan])  # [T, C]
        return build_result(probs, threshold, m.class_names, m.info,
                            {"count": 1, "chunks": len(plan), "ids": ["in-process"]})

    def predict_bytes(self, data: bytes, **kw: Any) -> dict[str, Any]:
        """Validate, decode and predict one encoded image (raises ClientError on bad input)."""
        from raycyto.serve.validation import decode_upload

        return self.predict_image(decode_upload(data, self.max_pixels), **kw)
