"""Chromosome layouts of ordered karyograms: evidence maps -> chromosomes.

A layout names boxes in normalised image coordinates (``x0, y0, x1, y1`` in [0, 1], origin top
left): one per chromosome slot, named as in a karyotype (``1`` ... ``22``, ``X``, ``Y``). An
ordered karyogram puts each chromosome pair in its slot, so the evidence a map puts inside a
box is evidence about that chromosome.

The report names chromosomes with it, and it travels with the model: ``raycyto export`` writes
it into the bundle as ``layout.json`` (listed, with its SHA-256, in model.json ``files``;
:func:`write_to_bundle`). :func:`config_layout` chooses it, for both:

- a lab's own layout file (``raycyto report/export --layout FILE``), else
- the sweep config's ``data.layout`` file (set once for sweep, report and export), else
- the built-in layout of the synthetic karyograms (:func:`raycyto.synth.karyogram.layout`) when
  the sweep trained on them (:func:`builtin_layout`: ``data.source: synthetic`` with
  ``synthetic.task: karyogram``, or a data folder whose ``synth.json`` says ``karyogram``), else
- none: the bundle gives the evidence map only.

:func:`bundle_layout` reads it back (``LoadedModel``: ``raycyto predict``, ``/predict``, OIP); a
bundle exported before layouts travelled falls back to :func:`builtin_layout` of its config.

A lab's own layout is a small JSON or CSV file (:func:`load_layout`)::

    {"boxes": {"1": [0.0, 0.0, 0.23, 0.36], "2": [0.23, 0.0, 0.41, 0.36], ...}}

    name,x0,y0,x1,y1
    1,0.0,0.0,0.23,0.36

Attribution (:func:`attribute`): each map cell's evidence share is split over the boxes by the
fraction of the cell each box covers; a chromosome's score is the share of the image's
evidence that falls in its slot (scores sum to at most 1; cells outside every box count for none).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from raycyto.errors import ConfigError
from raycyto.synth.core import MARKER
from raycyto.synth.karyogram import layout as synth_karyogram_layout

LAYOUT_FILE = "layout.json"
#: names a karyogram layout may use (the karyotype's)
CHROMOSOMES: tuple[str, ...] = tuple([str(i) for i in range(1, 23)] + ["X", "Y"])


@dataclass(frozen=True)
class Layout:
    """Named boxes ``{name: (x0, y0, x1, y1)}`` in normalised image coordinates.

    Attributes:
        boxes: the slots, in display order.
        source: where the layout came from (``builtin:karyogram``, a file path, ``bundle``).
    """

    boxes: Mapping[str, tuple[float, float, float, float]]
    source: str = ""

    @property
    def names(self) -> list[str]:
        return list(self.boxes)

    def to_dict(self) -> dict[str, Any]:
        return {"boxes": {k: [float(v) for v in b] for k, b in self.boxes.items()}, "source": self.source}

    def cell_weights(self, grid: tuple[int, int]) -> np.ndarray:
        """``[boxes, h*w]``: the fraction of each map cell that each box covers."""
        h, w = int(grid[0]), int(grid[1])
        ys, xs = np.arange(h + 1) / h, np.arange(w + 1) / w
        out = np.zeros((len(self.boxes), h * w))
        for k, (x0, y0, x1, y1) in enumerate(self.boxes.values()):
            fy = np.clip(np.minimum(ys[1:], y1) - np.maximum(ys[:-1], y0), 0, None) * h  # [h]
            fx = np.clip(np.minimum(xs[1:], x1) - np.maximum(xs[:-1], x0), 0, None) * w  # [w]
            out[k] = np.outer(fy, fx).ravel()
        return out

    def box_of(self, x: float, y: float) -> Optional[str]:
        """The box holding point ``(x, y)`` (normalised), or None."""
        for name, (x0, y0, x1, y1) in self.boxes.items():
            if x0 <= x < x1 and y0 <= y < y1:
                return name
        return None


def _check(boxes: Mapping[str, Any], source: str) -> Layout:
    if not isinstance(boxes, Mapping) or not boxes:
        raise ConfigError("layout", f"{source}: expected boxes {{name: [x0, y0, x1, y1]}}, got {boxes!r}")
    out = {}
    for name, box in boxes.items():
        name = str(name).strip()
        if name not in CHROMOSOMES:
            raise ConfigError("layout", f"{source}: box {name!r} is not a chromosome name ({', '.join(CHROMOSOMES)})")
        try:
            x0, y0, x1, y1 = (float(v) for v in box)
        except (TypeError, ValueError):
            raise ConfigError("layout", f"{source}: box {name!r} must be four numbers x0, y0, x1, y1; "
                                        f"got {box!r}") from None
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise ConfigError("layout", f"{source}: box {name!r} = {box!r}: need 0 <= x0 < x1 <= 1 and "
                                        "0 <= y0 < y1 <= 1 (normalised image coordinates)")
        out[name] = (x0, y0, x1, y1)
    return Layout(out, source)


def parse_layout(text: str, source: str = "layout") -> Layout:
    """A layout from JSON (``{"boxes": {...}}`` or the boxes mapping itself) or CSV
    (``name,x0,y0,x1,y1`` header) text."""
    s = text.strip()
    if s.startswith("{"):
        try:
            doc = json.loads(s)
        except json.JSONDecodeError as e:
            raise ConfigError("layout", f"{source}: not valid JSON: {e}") from None
        return _check(doc.get("boxes", doc) if isinstance(doc, dict) else doc, source)
    rows = list(csv.DictReader(io.StringIO(s)))
    need = {"name", "x0", "y0", "x1", "y1"}
    if not rows or not need <= set(rows[0]):
        raise ConfigError("layout", f"{source}: expected JSON or a CSV with columns {sorted(need)}")
    return _check({r["name"]: [r["x0"], r["y0"], r["x1"], r["y1"]] for r in rows}, source)


def load_layout(path: str | Path) -> Layout:
    """Read a layout file (JSON or CSV)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError("layout", f"cannot read layout file {p}: {e}") from None
    return parse_layout(text, str(p))


def karyogram_layout() -> Layout:
    """The built-in layout of the synthetic karyograms."""
    return Layout(synth_karyogram_layout(), "builtin:karyogram")


def synthetic_task(config: Mapping[str, Any]) -> Optional[str]:
    """The raycyto.synth task a sweep config's data come from: ``data.synthetic.task`` when
    ``data.source`` is ``synthetic``, the ``task`` of a local data folder's ``synth.json``
    (what ``raycyto synth`` and the main jobs write), else None (a lab's own images)."""
    data = (config or {}).get("data") or {}
    source = str(data.get("source") or "")
    if source == "synthetic":
        return str((data.get("synthetic") or {}).get("task") or "karyogram")
    if not source or "://" in source:
        return None
    try:
        return json.loads((Path(source) / MARKER).read_text()).get("task")
    except (OSError, ValueError, AttributeError):
        return None


def builtin_layout(config: Mapping[str, Any]) -> Optional[Layout]:
    """The built-in karyogram layout when the sweep config's data are raycyto.synth karyograms
    (:func:`synthetic_task`), else None."""
    return karyogram_layout() if synthetic_task(config) == "karyogram" else None


def config_layout(config: Mapping[str, Any], path: str | Path | None = None) -> Optional[Layout]:
    """The layout of an experiment: the file ``path`` (``raycyto export/report --layout``) when
    given, else the sweep config's ``data.layout`` file, else :func:`builtin_layout`, else None.

    Raises:
        ConfigError: the file is unreadable or not a layout (field ``--layout`` or ``data.layout``).
    """
    field = "--layout"
    if path is None:
        field, path = "data.layout", ((config or {}).get("data") or {}).get("layout")
    if path is None:
        return builtin_layout(config)
    try:
        return load_layout(path)
    except ConfigError as e:
        raise ConfigError(field, e.message) from None


def bundle_layout(model_dir: str | Path, meta: Mapping[str, Any]) -> Optional[Layout]:
    """The layout of a bundle: its ``layout.json`` (checksum verified by ``load_bundle``), else
    (bundles exported before layouts travelled) :func:`builtin_layout` of its config, else None
    (map only)."""
    if LAYOUT_FILE in (meta.get("files") or {}):
        doc = json.loads((Path(model_dir) / LAYOUT_FILE).read_text())
        return _check(doc.get("boxes"), f"bundle layout ({doc.get('source') or LAYOUT_FILE})")
    return builtin_layout(meta.get("config") or {})


def write_to_bundle(model_dir: str | Path, layout: Layout) -> Path:
    """Store ``layout`` in a bundle as layout.json and list it (SHA-256) in model.json."""
    from raycyto.models.weights import sha256_file

    d = Path(model_dir)
    doc = json.loads((d / "model.json").read_text())
    (d / LAYOUT_FILE).write_text(json.dumps(layout.to_dict(), indent=2))
    doc.setdefault("files", {})[LAYOUT_FILE] = sha256_file(d / LAYOUT_FILE)
    (d / "model.json").write_text(json.dumps(doc, indent=2, sort_keys=True, default=str))
    return d / LAYOUT_FILE


def attribute(share: np.ndarray, layout: Layout) -> dict[str, float]:
    """``{name: share of the evidence in that box}`` for one map ``share [h, w]`` (non-negative,
    summing to one)."""
    wts = layout.cell_weights(share.shape)
    return dict(zip(layout.names, (wts @ np.asarray(share, np.float64).ravel()).tolist()))


def top(scores: Mapping[str, float], k: int = 3, digits: int = 4) -> list[dict[str, Any]]:
    """The ``k`` highest: ``[{"chromosome": "21", "score": 0.83}, ...]``."""
    best = sorted(scores.items(), key=lambda kv: -kv[1])[:k]
    return [{"chromosome": name, "score": round(float(v), digits)} for name, v in best]
