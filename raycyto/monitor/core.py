"""``raycyto monitor``'s work: read audit logs, keep one model's answers, test each window.

:func:`read_audit` reads JSONL audit files (:mod:`raycyto.serve.audit`), reporting each
malformed line by file and line number and going on; :func:`monitor_log` keeps the answers of
the bundle given (its model.json SHA-256, optionally a name and a version label), in time
order, cuts them into windows and compares each with the bundle's validation reference
(:mod:`raycyto.monitor.drift`) under one Bonferroni bound over every test run.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from raycyto.data.decode import is_uri
from raycyto.errors import RaycytoError
from raycyto.monitor.drift import (
    DEFAULT_ALPHA,
    DEFAULT_MIN_WINDOW,
    DEFAULT_WINDOW,
    STATISTICS,
    Check,
    BundleReferenceError,
    Sample,
    bound,
    compare,
    reference_of,
    window_slices,
)
from raycyto.storage import read_bytes

MAX_PROBLEMS_SHOWN = 20


class MonitorInputError(RaycytoError):
    """Input ``raycyto monitor`` cannot judge: a missing file, a bundle without reference, no answers."""


@dataclass(frozen=True)
class Record:
    """One audit record: where it was read and its fields."""

    source: str
    line: int
    data: dict[str, Any]


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def record_problem(d: Any) -> Optional[str]:
    """Why ``d`` is not an audit record the monitor can read (None: it is)."""
    if not isinstance(d, dict):
        return f"not a JSON object but {type(d).__name__}"
    for k in ("time", "model", "version", "model_sha256", "label", "rule"):
        if not isinstance(d.get(k), str):
            return f"field '{k}' missing or not a string ({d.get(k)!r})"
    if not _number(d.get("confidence")) or not 0 <= d["confidence"] <= 1:
        return f"field 'confidence' must be a number in [0, 1] ({d.get('confidence')!r})"
    if not isinstance(d.get("refer"), bool):
        return f"field 'refer' must be true or false ({d.get('refer')!r})"
    if not isinstance(d.get("passes"), int) or isinstance(d.get("passes"), bool) or d["passes"] < 1:
        return f"field 'passes' must be a positive integer ({d.get('passes')!r})"
    if d.get("out_of_distribution") is not None and not isinstance(d["out_of_distribution"], bool):
        return f"field 'out_of_distribution' must be true, false or null ({d['out_of_distribution']!r})"
    if d.get("ood_score") is not None and not _number(d["ood_score"]):
        return f"field 'ood_score' must be a finite number or null ({d['ood_score']!r})"
    return None


def read_audit(paths: Sequence[str | Path]) -> tuple[list[Record], list[str]]:
    """Read audit JSONL files (rotated ones too: ``audit.jsonl.1``...), in time order.

    Returns:
        ``(records sorted by time (stable), problems: "FILE:LINE: why" per malformed line)``.

    Raises:
        MonitorInputError: a file that does not exist or cannot be read.
    """
    records, problems = [], []
    for path in paths:
        p = Path(path)
        try:
            lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            raise MonitorInputError(f"audit log {p} does not exist") from None
        except OSError as e:
            raise MonitorInputError(f"audit log {p} cannot be read ({e.strerror or e})") from None
        for i, text in enumerate(lines, 1):
            if not text.strip():
                continue
            try:
                d = json.loads(text)
            except json.JSONDecodeError as e:
                problems.append(f"{p}:{i}: not JSON ({e.msg} at column {e.colno})")
                continue
            why = record_problem(d)
            if why:
                problems.append(f"{p}:{i}: {why}")
                continue
            records.append(Record(str(p), i, d))
    records.sort(key=lambda r: r.data["time"])
    return records, problems


@dataclass(frozen=True)
class Bundle:
    """The monitored bundle: where, its name, SHA-256 of model.json, and its reference."""

    path: str
    name: str
    sha256: str
    class_names: list[str]
    reference: Sample
    reference_source: str


def load_monitored(model_dir: str | Path) -> Bundle:
    """The bundle's identity and validation reference (a folder, a main-job folder, or a URI).

    Raises:
        MonitorInputError: no model.json there, or no usable reference in it (re-export).
    """
    from raycyto.models.bundle import find_bundle_dir

    where = str(model_dir) if is_uri(str(model_dir)) else str(find_bundle_dir(model_dir))
    try:
        raw = read_bytes(f"{where.rstrip('/')}/model.json")
    except (OSError, ValueError) as e:
        raise MonitorInputError(f"--model {model_dir}: no readable model.json there ({e}); give the folder "
                                "`raycyto export` wrote") from None
    try:
        meta = json.loads(raw)
        reference = reference_of(meta, f"{where}/model.json")
    except json.JSONDecodeError as e:
        raise MonitorInputError(f"--model {model_dir}: model.json is not valid JSON ({e})") from None
    except BundleReferenceError as e:
        raise MonitorInputError(f"--model {model_dir}: {e}") from None
    return Bundle(where, str(meta.get("name") or Path(where).name), hashlib.sha256(raw).hexdigest(),
                  list(meta.get("class_names") or []), reference, str(meta["reference"].get("source", "")))


@dataclass(frozen=True)
class Window:
    """One window of answers and its checks."""

    index: int            # 1-based
    first: int            # 1-based position among the kept answers
    last: int
    start: str            # time of its first / last answer
    end: str
    checks: list[Check]

    @property
    def n(self) -> int:
        return self.last - self.first + 1


@dataclass
class MonitorReport:
    """What ``raycyto monitor`` found."""

    bundle: Bundle
    windows: list[Window]
    alpha: float
    bound: float
    tests: int
    kept: int
    skipped: dict[str, int]
    problems: list[str]
    window: int
    min_window: int
    left_out: int = 0                 # answers after the last window (a partial one under min_window)
    notes: list[str] = field(default_factory=list)

    def alarms(self, w: Window) -> list[Check]:
        """The checks of ``w`` beyond the bound."""
        return [c for c in w.checks if c.alarm(self.bound)]

    @property
    def drifted(self) -> list[Window]:
        return [w for w in self.windows if self.alarms(w)]

    def to_json(self) -> dict[str, Any]:
        return {"model": self.bundle.name, "sha256": self.bundle.sha256, "reference": self.bundle.reference_source,
                "alpha": self.alpha, "bound": self.bound, "tests": self.tests, "answers": self.kept,
                "skipped": self.skipped, "malformed": self.problems, "left_out": self.left_out,
                "drift": bool(self.drifted),
                "windows": [{"window": w.index, "first": w.first, "last": w.last, "start": w.start, "end": w.end,
                             "drift": [c.statistic for c in self.alarms(w)],
                             "checks": [{"statistic": c.statistic, "value": c.value, "reference": c.reference,
                                         "test": c.test, "effect": None if math.isnan(c.effect) else c.effect,
                                         "p": c.p, "alarm": c.alarm(self.bound), "note": c.note}
                                        for c in w.checks]}
                            for w in self.windows]}


def _identity(d: dict[str, Any]) -> str:
    return f"{d['model']} version {d['version']} (sha256 {d['model_sha256'][:12]})"


def monitor_records(records: Sequence[Record], bundle: Bundle, window: int = DEFAULT_WINDOW,
                    min_window: int = DEFAULT_MIN_WINDOW, alpha: float = DEFAULT_ALPHA,
                    model_name: Optional[str] = None, version: Optional[str] = None,
                    problems: Sequence[str] = ()) -> MonitorReport:
    """Compare each window of ``bundle``'s answers in ``records`` with its reference.

    Args:
        records: audit records in time order (:func:`read_audit`).
        bundle: :func:`load_monitored`.
        window: answers per window; min_window: the smallest last, partial window tested.
        alpha: family-wise false-alarm rate (Bonferroni over every test of every window).
        model_name, version: keep only answers under this name / version label too.
        problems: malformed lines, carried into the report.

    Raises:
        MonitorInputError: no answer of this bundle, or too few for one window.
    """
    if window < 1 or not 1 <= min_window:
        raise MonitorInputError(f"--window {window} and --min-window {min_window} must be >= 1")
    if not 0 < alpha < 1:
        raise MonitorInputError(f"--alpha {alpha}: must be in (0, 1), e.g. 0.05")
    kept, skipped = [], {}
    for r in records:
        d = r.data
        if (d["model_sha256"] == bundle.sha256 and (model_name is None or d["model"] == model_name)
                and (version is None or d["version"] == version)):
            kept.append(r)
        else:
            skipped[_identity(d)] = skipped.get(_identity(d), 0) + 1
    wanted = f"{bundle.name} (model.json sha256 {bundle.sha256[:12]}" + (
        f", name {model_name}" if model_name else "") + (f", version {version}" if version else "") + ")"
    if not kept:
        seen = "; ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) or "no readable records"
        raise MonitorInputError(f"no answers of {wanted} in the audit log; it holds {seen}")
    unknown = sorted({r.data["label"] for r in kept} - set(bundle.class_names)) if bundle.class_names else []
    if unknown:
        raise MonitorInputError(f"answers of {wanted} name labels the bundle does not have: {unknown}")
    slices = window_slices(len(kept), window, min_window)
    if not slices:
        raise MonitorInputError(f"{len(kept)} answers of {wanted}: fewer than --min-window {min_window}; "
                                "nothing to test yet")
    rows = [[k.data for k in kept[s]] for s in slices]
    checks = [compare(Sample.from_answers(r), bundle.reference) for r in rows]
    tests = sum(c.tested for cs in checks for c in cs)
    out = MonitorReport(bundle, [Window(i + 1, s.start + 1, s.stop, rows[i][0]["time"], rows[i][-1]["time"], checks[i])
                                 for i, s in enumerate(slices)],
                        alpha, bound(alpha, tests), tests, len(kept), skipped, list(problems), window, min_window,
                        left_out=len(kept) - slices[-1].stop)
    untested = {c.statistic: c.note for cs in checks for c in cs if not c.tested}
    out.notes = [f"{k} not tested: {v}" for k, v in untested.items()]
    return out


def monitor_log(paths: Sequence[str | Path], model_dir: str | Path, **kw: Any) -> MonitorReport:
    """:func:`read_audit` + :func:`load_monitored` + :func:`monitor_records` (keywords as there)."""
    bundle = load_monitored(model_dir)
    records, problems = read_audit(paths)
    return monitor_records(records, bundle, problems=problems, **kw)


__all__ = ["STATISTICS", "MonitorInputError", "MonitorReport", "Record", "Window", "load_monitored",
           "monitor_log", "monitor_records", "read_audit", "record_problem"]
