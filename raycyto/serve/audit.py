"""Optional JSONL audit log of what the endpoint answered (never the image).

One line per image answered, from ``/predict`` and from OIP v2 infer alike (both answer
through ``raycyto.serve.api._run_one``, which makes the one :meth:`AuditLog.write` call)::

    {"time": "2026-01-01T12:00:00.123Z", "route": "/predict", "model": "leukemia-...",
     "version": "3f2a9c...", "model_sha256": "...", "input_sha256": "...", "label": "ALL",
     "confidence": 0.93, "prediction_set": ["ALL"], "refer": true,
     "refer_reason": "out_of_distribution", "out_of_distribution": true, "ood_score": 41.2,
     "rule": "confidence < 0.8", "passes": 100, "latency_ms": 12.5}

Every record has every field (:data:`FIELDS`): ``prediction_set`` is null for a model without a
conformal calibration, ``out_of_distribution`` / ``ood_score`` are null for one without a
guard, ``refer_reason`` is null when the answer is not referred (else the rule's name, or
``out_of_distribution``). ``rule`` is the referral rule in words, ``latency_ms`` the time from
the request's arrival at the ingress to this image's answer. The image is never written:
``input_sha256`` identifies it.

Files rotate by size (``path``, ``path.1`` ... ``path.<backups>``). With several ingress
replicas, put ``{replica}`` in the path so each writes its own file.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from raycyto.serve.api import ServedModel


FIELDS = ("time", "route", "model", "version", "model_sha256", "input_sha256", "label", "confidence",
          "prediction_set", "refer", "refer_reason", "out_of_distribution", "ood_score", "rule", "passes",
          "latency_ms")
"""The keys of every audit record, in the order written."""


def referral_rule(result: dict[str, Any]) -> str:
    """The rule that decided ``refer`` (build_result's own, when it names one)."""
    return str(result.get("refer_rule") or f"confidence < {result['threshold']:g}")


class AuditLog:
    """Append-only JSONL records with size-based rotation.

    Args:
        path: the log file (parent folders are created); ``{replica}`` is replaced by ``replica``.
        max_bytes: rotate when the file would grow past this.
        backups: rotated files kept.
        replica: id substituted for ``{replica}``.
    """

    def __init__(self, path: str, max_bytes: int = 10 * 1024 * 1024, backups: int = 5,
                 replica: str = "local") -> None:
        self.path = Path(path.replace("{replica}", replica)).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(self.path, maxBytes=max_bytes, backupCount=backups,
                                                       encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))
        # a private logger object: not registered globally, never propagates to root handlers
        self._log = logging.Logger(f"raycyto.audit:{self.path}", level=logging.INFO)
        self._log.addHandler(handler)

    def write(self, model: "ServedModel", input_sha256: str, result: dict[str, Any], route: str = "",
              latency_ms: float | None = None) -> None:
        """Record one answer (``result``: the ``build_result`` JSON given to the client).

        Args:
            model: the model version that answered.
            input_sha256: SHA-256 of the encoded image as received.
            result: the answer.
            route: the route template that answered (``/predict``, ``/v2/models/{name}/infer``...).
            latency_ms: request arrival to this answer, in milliseconds.
        """
        ood_score = result.get("ood_score")
        record = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "route": route, "model": model.name, "version": model.version, "model_sha256": model.sha256,
            "input_sha256": input_sha256, "label": result["label"], "confidence": result["confidence"],
            "prediction_set": result.get("prediction_set"), "refer": result["refer"],
            "refer_reason": result.get("refer_reason"), "out_of_distribution": result.get("out_of_distribution"),
            "ood_score": None if ood_score is None else float(ood_score),
            "rule": referral_rule(result), "passes": result["passes"],
            "latency_ms": None if latency_ms is None else round(float(latency_ms), 3),
        }
        self._log.info(json.dumps(record))

    def close(self) -> None:
        for h in list(self._log.handlers):
            h.close()
            self._log.removeHandler(h)
