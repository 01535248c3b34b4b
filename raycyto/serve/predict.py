"""The prediction core shared by the Serve deployments and offline ``raycyto predict``.

One request = embed once (the bundle's :class:`~raycyto.models.preprocessing.Preprocess`, and
the backbone when the MC scope is "head"; the out-of-distribution guard scores the pooled
features there) -> T stochastic passes, optionally split into chunks of consecutive pass
indices -> concatenate ``[T, C]`` -> :func:`raycyto.models.mc.summarize` -> JSON, with the
bundle's referral rule (:class:`ReferralPolicy`) applied by :func:`build_result`. Pass ``t`` is seeded from (seed, t) alone
(:class:`raycyto.models.mc.MCState`), so the answer does not depend on the chunking or on
the replicas. The default seed is the one the sweep used for the exported fold's
predictions (``model.json["mc"]["seed"]``), so an exported model reproduces
predictions.parquet's MC columns as well as its probabilities.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np

from raycyto.referral.conformal import image_uniform
from raycyto.referral.policy import OOD_REASON, ReferralPolicy

DEFAULT_MC_REPLICAS = 2


def pooled_features(features: np.ndarray) -> np.ndarray:
    """``[N, D]`` as they are; ``[N, C, H, W]`` maps averaged over positions -> ``[N, C]`` (the
    pooling the sweep fits the out-of-distribution guard on: ``raycyto.tune.trainable.pooled``)."""
    f = np.asarray(features, dtype=np.float32)
    return f.mean(axis=(2, 3)) if f.ndim == 4 else f


# ----------------------------------------------------------------------------- referral


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
        refer_rule: overrides the bundle's referral rule (``vote``, ``set``, ``risk``).

    Attributes:
        guard: the bundle's out-of-distribution guard (``ood.npz``), or None.
        policy: its :class:`ReferralPolicy`.
    """

    def __init__(self, model_dir: str | Path, device: str = "cpu", refer_rule: Optional[str] = None) -> None:
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
            from raycyto.models.bundle import load_guard

            guard = load_guard(local, meta)  # MahalanobisGuard or None (checksum verified)
            from raycyto.evidence.layout import bundle_layout

            self.layout: Any = bundle_layout(local, meta)  # chromosome slots, or None (map only)
            # an uncalibrated guard (threshold inf) flags nothing: served as no guard
            self.guard: Any = guard if guard is not None and np.isfinite(guard.threshold) else None
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
        self.policy = ReferralPolicy.from_meta(meta, refer_rule)
        from raycyto.models.heads import head_spec

        #: "additive" (every answer carries it: one trunk pass on the embedding) or "gradcam" (explain only)
        self.evidence_method: str = head_spec(meta["head"]).evidence

    def evidence(self, x: np.ndarray, image: Optional[np.ndarray] = None, explain: bool = False
                 ) -> Optional[dict[str, Any]]:
        """The answer's evidence fields for one image, computed once from its embedding (not per
        MC pass): ``evidence`` (top 3 chromosomes, with a layout), ``evidence_map`` (method,
        class, grid, share per cell; additive maps also logit and bias) and, with ``explain``,
        ``overlay_png`` (base64 PNG of the image with the map painted over it).

        Args:
            x: the image's embedding (:meth:`embed`: features / maps in head scope, pixels in full scope).
            image: the decoded uint8 image (needed for Grad-CAM and the overlay).
            explain: also the overlay; pooled heads (Grad-CAM, a backward pass) give evidence only then.
        Returns:
            the fields, or None (a Grad-CAM head without ``explain``).
        """
        import torch

        from raycyto.evidence.layout import attribute, top
        from raycyto.evidence.maps import explain as explain_map, map_json, overlay, png_base64

        if self.evidence_method != "additive" and not explain:
            return None
        xt = torch.from_numpy(np.array(x, dtype=np.float32))[None].to(self.device)
        if self.evidence_method == "additive" and self.scope == "head":
            ev = explain_map(self.model, None, None, embedding=xt)
        else:
            pixels = xt if self.scope == "full" else self.preprocess([image]).to(self.device)
            ev = explain_map(self.model, pixels, None)
        out: dict[str, Any] = {}
        boxes, hl = None, []
        if self.layout is not None:
            out["evidence"] = top(attribute(ev.share[0], self.layout), 3)
            boxes, hl = dict(self.layout.boxes), [out["evidence"][0]["chromosome"]]
        out["evidence_map"] = map_json(ev, self.class_names)
        if explain and image is not None:
            out["overlay_png"] = png_base64(overlay(image, ev.share[0], boxes, hl))
        return out

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
        return [x for x, _ in self.embed_scored(images)]

    def embed_scored(self, images: Sequence[np.ndarray]) -> list[tuple[np.ndarray, Optional[float]]]:
        """:meth:`embed`, plus each image's out-of-distribution score (None without a guard).

        The guard scores the pooled backbone features (head scope: the embedding itself; full
        scope: one deterministic backbone forward, dropout off), as the sweep fitted it.

        Returns:
            ``(embedding, ood score)`` per image.
        """
        import torch

        x = self.preprocess(images).to(self.device)  # [N, 3, S, S]
        with torch.no_grad():
            out = self.ops.embed(self.model, x)
            scores: list[Optional[float]] = [None] * len(images)
            if self.guard is not None:
                feats = out if self.scope == "head" else self.model.features(x)  # [N, D] or [N, C, h, w]
                scores = [float(v) for v in self.guard.score(pooled_features(feats.detach().cpu().numpy()))]
        emb = [np.ascontiguousarray(o, dtype=np.float32) for o in out.detach().cpu().numpy()]
        return list(zip(emb, scores))

    @property
    def ood_threshold(self) -> Optional[float]:
        """The guard's calibrated threshold (None without a guard)."""
        return None if self.guard is None else float(self.guard.threshold)

    def run_chunk(self, x: np.ndarray, chunk: Chunk) -> np.ndarray:
        """Run one chunk of seeded stochastic passes on one embedded image; returns probs ``[n, C]``."""
        import torch

        xt = torch.from_numpy(np.array(x, dtype=np.float32))[None].to(self.device)  # [1, ...]; writable copy
        with torch.no_grad():
            probs = self.ops.passes(self.model, xt, chunk)  # [1, n, C]
        return np.asarray(probs, dtype=np.float64)[0]


def build_result(probs: np.ndarray, threshold: float, class_names: Sequence[str],
                 model_info: dict[str, str], replicas: dict[str, Any],
                 policy: Optional[ReferralPolicy] = None, ood_score: Optional[float] = None,
                 ood_threshold: Optional[float] = None, u: Optional[float] = None,
                 evidence: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Summarise the passes of one image into the /predict JSON.

    Args:
        probs: ``[T, C]`` softmax probabilities of the T passes.
        threshold: vote confidence below which the case is referred (rule ``vote``).
        class_names: label names, index = class.
        model_info: ``{"name", "sha256"}``.
        replicas: ``{"count", "chunks", "ids"}`` describing who ran the passes.
        policy: the bundle's :class:`ReferralPolicy` (None: the vote rule, no prediction set).
        ood_score, ood_threshold: the out-of-distribution guard's score of this image and its
            threshold (None: the bundle has no guard; the fields are omitted).
        u: the image's uniform (``image_uniform`` of its bytes) for randomized APS sets.
        evidence: :meth:`LoadedModel.evidence`'s fields (``evidence``, ``evidence_map``,
            ``overlay_png``), added as they are; None: none.
    Returns:
        JSON-ready dict: label, confidence, refer, threshold, passes, probabilities, std,
        entropy, mutual_information, model, replicas, rule (``vote``/``set``/``risk``),
        refer_reason (None, the rule's name, or ``out_of_distribution``), refer_rule (the rule
        in words); with a conformal calibration: prediction_set (class names, most probable
        first) and coverage (its level); with a risk-controlled threshold: risk_threshold (None
        when none was certified) and guarantee; with a guard: out_of_distribution, ood_score,
        ood_threshold.
    """
    from raycyto.models.mc import summarize

    policy = policy or ReferralPolicy()
    s = summarize(np.asarray(probs)[None], threshold=threshold)  # every value [1, ...]
    names = list(class_names)
    confidence, mean = float(s["confidence"][0]), np.asarray(s["mean"][0], dtype=np.float64)
    members = policy.prediction_set(mean, u)
    by_rule = policy.refers(members, confidence, bool(s["refer"][0]))
    ood = None if ood_score is None or ood_threshold is None else bool(ood_score > ood_threshold)
    reason = OOD_REASON if ood else (policy.rule if by_rule else None)
    out: dict[str, Any] = {
        "label": names[int(s["vote"][0])],
        "confidence": confidence,
        "refer": bool(ood or by_rule),
        "threshold": float(threshold),
        "passes": int(np.asarray(probs).shape[0]),
        "probabilities": {c: float(v) for c, v in zip(names, mean)},
        "std": {c: float(v) for c, v in zip(names, s["std"][0])},
        "entropy": float(s["entropy"][0]),
        "mutual_information": float(s["mutual_information"][0]),
        "rule": policy.rule,
        "refer_reason": reason,
        "refer_rule": policy.describe(threshold),
    }
    if members is not None:
        out["prediction_set"] = [names[k] for k in members]
        out["coverage"] = float(policy.level)
    if policy.risk_threshold is not None:
        t = policy.risk_threshold
        out["risk_threshold"] = None if np.isnan(t) else float(t)
        out["guarantee"] = policy.guarantee
    if ood is not None:
        out["out_of_distribution"] = ood
        out["ood_score"] = float(ood_score)
        out["ood_threshold"] = float(ood_threshold)
    out.update(evidence or {})
    out["model"] = dict(model_info)
    out["replicas"] = replicas
    return out


class LocalPredictor:
    """In-process predictions with exactly the endpoint's chunking, seeds and JSON.

    Args:
        model_dir: exported model bundle.
        fan_out: chunks per request (None = the scope default, as the app uses).
        mc_replicas: MC-head replicas the app would run (decides the full-scope default).
        seed: default request seed (None: the bundle's, ``model.json["mc"]["seed"]``).
        max_pixels: decompression-bomb limit.
        refer_rule: overrides the bundle's referral rule (``vote``, ``set``, ``risk``).
    """

    def __init__(self, model_dir: str | Path, fan_out: int | None = None,
                 mc_replicas: int = DEFAULT_MC_REPLICAS, seed: int | None = None,
                 max_pixels: int | None = None, refer_rule: str | None = None) -> None:
        self.model = LoadedModel(model_dir, refer_rule=refer_rule)
        self.fan_out = resolve_fan_out(fan_out, self.model.scope, mc_replicas)
        self.seed = self.model.default_seed if seed is None else int(seed)
        self.max_pixels = max_pixels

    def predict_image(self, image: np.ndarray, passes: int | None = None,
                      threshold: float | None = None, seed: int | None = None,
                      fan_out: int | None = None, u: float | None = None, explain: bool = False) -> dict[str, Any]:
        """Predict one decoded uint8 image ``[H, W, 3]``; returns the /predict JSON.

        ``u``: the APS randomisation (``image_uniform`` of the encoded bytes, as
        :meth:`predict_bytes` and the endpoint pass); None: drawn from the array's bytes.
        ``explain``: add the overlay PNG (and Grad-CAM evidence for pooled heads)."""
        m = self.model
        passes = passes or m.default_passes
        threshold = m.default_threshold if threshold is None else threshold
        x, ood = m.embed_scored([image])[0]
        plan = chunk_plan(passes, fan_out or self.fan_out, self.seed if seed is None else seed)
        probs = np.concatenate([m.run_chunk(x, c) for c in plan])  # [T, C]
        return build_result(probs, threshold, m.class_names, m.info,
                            {"count": 1, "chunks": len(plan), "ids": ["in-process"]},
                            m.policy, ood, m.ood_threshold,
                            image_uniform(np.ascontiguousarray(image).tobytes()) if u is None else u,
                            m.evidence(x, image, explain))

    def predict_bytes(self, data: bytes, **kw: Any) -> dict[str, Any]:
        """Validate, decode and predict one encoded image (raises ClientError on bad input)."""
        from raycyto.serve.validation import decode_upload

        return self.predict_image(decode_upload(data, self.max_pixels), u=image_uniform(data), **kw)
