"""Optional JSONL audit log of what the endpoint answered (never the image).

One line per image answered::

    {"time": "2026-01-01T12:00:00.123Z", "route": "/predict", "model": "leukemia-...",
     "version": "3f2a9c...", "model_sha256": "...", "input_sha256": "...", "label": "ALL",
     "confidence": 0.93, "refer": false, "rule": "confidence < 0.8", "passes": 100}

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

    def write(self, model: "ServedModel", input_sha256: str, result: dict[str, Any], route: str = "") -> None:
        """Record one answer: time, model identity, input hash, label, confidence, refer, rule."""
        record = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "route": route, "model": model.name, "version": model.version, "model_sha256": model.sha256,
            "input_sha256": input_sha256, "label": result["label"], "confidence": result["confidence"],
            "refer": result["refer"], "rule": referral_rule(result), "passes": result["passes"],
        }
        self._log.info(json.dumps(record))

    def close(self) -> None:
        for h in list(self._log.handlers):
            h.close()
            self._log.removeHandler(h)
