"""Synthetic G-banded karyograms (normal vs abnormal).

A patient gets one karyotype (sex, and for abnormal patients one of ``ABNORMALITIES``);
every image of that patient is a new realisation: chromosome bend and tilt, band jitter,
stain, width, condensation, position jitter, blur and noise all change.

Each chromosome is a tuple of pieces ``(type, t0, t1)`` (fractions of that type's length,
p-terminal = 0), so deletions and translocations are just different piece lists; the
centromere is the one of the first piece's type.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable

import numpy as np

from raycyto.errors import ConfigError
from raycyto.synth.base import SynthTask, patient_rng

TYPES: tuple[str, ...] = tuple([str(i) for i in range(1, 23)] + ["X", "Y"])
# Approximate human chromosome lengths (Mb, GRCh38) and centromere position (p-arm fraction).
LENGTH_MB: dict[str, float] = dict(zip(TYPES, (
    249, 242, 198, 190, 181, 171, 159, 145, 138, 134, 135, 133,
    114, 107, 102, 90, 83, 80, 59, 64, 47, 51, 156, 57)))
CENTROMERE: dict[str, float] = dict(zip(TYPES, (
    0.50, 0.39, 0.46, 0.29, 0.27, 0.36, 0.38, 0.31, 0.34, 0.30, 0.39, 0.27,
    0.15, 0.15, 0.16, 0.41, 0.32, 0.25, 0.45, 0.45, 0.25, 0.27, 0.39, 0.20)))
# Standard karyogram rows: 1-5, 6-12, 13-18, 19-22 + sex chromosomes.
ROWS: tuple[tuple[str, ...], ...] = (TYPES[0:5], TYPES[5:12], TYPES[12:18], TYPES[18:24])
BASE_SIZE = 416
_LARGE = TYPES[:12]  # chromosomes 1-12: big enough that a structural change is visible

Piece = tuple[str, float, float]
Chromosome = tuple[Piece, ...]


def _whole(ctype: str) -> Chromosome:
    return ((ctype, 0.0, 1.0),)


@lru_cache(maxsize=None)
def band_template(ctype: str) -> tuple[np.ndarray, np.ndarray]:
    """Fixed G-band template of a chromosome type.

    Returns:
        (edges [n+1] in [0, 1] from p-ter to q-ter, darkness [n] in [0, 1]); n is odd so both
        telomeric bands are pale, dark and pale bands alternate.
    """
    rng = np.random.default_rng([20261122, TYPES.index(ctype)])
    n = int(round(5 + LENGTH_MB[ctype] / 11)) | 1
    widths = rng.uniform(0.5, 1.7, n)
    edges = np.concatenate([[0.0], np.cumsum(widths)]) / widths.sum()
    dark = np.where(np.arange(n) % 2 == 1, rng.uniform(0.45, 1.0, n), rng.uniform(0.0, 0.15, n))
    return edges, dark


# ---------------------------------------------------------------- karyotypes (patient level)

def _normal(slots: dict[str, list[Chromosome]], rng: np.random.Generator) -> str:
    return ""


def _trisomy(ctype: str) -> Callable[[dict, np.random.Generator], str]:
    def apply(slots: dict[str, list[Chromosome]], rng: np.random.Generator) -> str:
        slots[ctype].append(_whole(ctype))
        return f"+{ctype}"
    return apply


def _monosomy_x(slots: dict[str, list[Chromosome]], rng: np.random.Generator) -> str:
    slots["X"], slots["Y"] = [_whole("X")], []
    return ""


def _deletion(slots: dict[str, list[Chromosome]], rng: np.random.Generator) -> str:
    """Terminal q-arm deletion removing 30-45 % of one large chromosome."""
    ctype = str(rng.choice(_LARGE))
    keep = 1.0 - rng.uniform(0.30, 0.45)
    slots[ctype][0] = ((ctype, 0.0, keep),)
    return f"del({ctype})(q)"


def _translocation(slots: dict[str, list[Chromosome]], rng: np.random.Generator) -> str:
    """Balanced reciprocal translocation of distal q-arm segments between two large types.

    The partners differ by >= 40 Mb and the swapped segments by >= 35 % in length, so both
    derivatives visibly change length as well as band pattern.
    """
    while True:
        a, b = (str(t) for t in rng.choice(_LARGE, size=2, replace=False))
        ta = rng.uniform(max(CENTROMERE[a] + 0.12, 0.45), 0.72)
        tb = rng.uniform(max(CENTROMERE[b] + 0.12, 0.45), 0.72)
        seg_a, seg_b = (1 - ta) * LENGTH_MB[a], (1 - tb) * LENGTH_MB[b]
        if (abs(LENGTH_MB[a] - LENGTH_MB[b]) >= 40
                and abs(seg_a - seg_b) >= 0.35 * max(seg_a, seg_b)):
            break
    slots[a][0] = ((a, 0.0, ta), (b, tb, 1.0))
    slots[b][0] = ((b, 0.0, tb), (a, ta, 1.0))
    a, b = sorted((a, b), key=TYPES.index)
    return f"t({a};{b})(q;q)"


KARYOTYPES: dict[str, Callable[[dict[str, list[Chromosome]], np.random.Generator], str]] = {
    "normal": _normal,
    "trisomy13": _trisomy("13"),
    "trisomy18": _trisomy("18"),
    "trisomy21": _trisomy("21"),
    "monosomyX": _monosomy_x,
    "deletion": _deletion,
    "translocation": _translocation,
}
ABNORMALITIES: tuple[str, ...] = tuple(k for k in KARYOTYPES if k != "normal")


def make_karyotype(kind: str, rng: np.random.Generator) -> dict[str, Any]:
    """Draw one patient's karyotype.

    Args:
        kind: a key of ``KARYOTYPES``.
        rng: the patient RNG.
    Returns:
        {"slots": {type: [Chromosome]}, "karyotype": ISCN-like string such as "47,XY,+21"}.
    """
    sex = "XX" if rng.random() < 0.5 else "XY"
    slots: dict[str, list[Chromosome]] = {t: [_whole(t), _whole(t)] for t in TYPES[:22]}
    slots["X"] = [_whole("X")] * (2 if sex == "XX" else 1)
    slots["Y"] = [] if sex == "XX" else [_whole("Y")]
    change = KARYOTYPES[kind](slots, rng)
    count = sum(len(v) for v in slots.values())
    sex_str = "X" * len(slots["X"]) + "Y" * len(slots["Y"])
    return {"slots": slots, "karyotype": ",".join(p for p in (str(count), sex_str, change) if p)}


def check_options(options: dict[str, Any]) -> None:
    """Validate ``abnormal_fraction`` (0 <= f <= 1)."""
    f = options["abnormal_fraction"]
    if not isinstance(f, (int, float)) or not 0.0 <= float(f) <= 1.0:
        raise ConfigError("abnormal_fraction", f"must be a number in [0, 1], got {f!r}")


def plan(seed: int, patients: int, abnormal_fraction: float = 0.5) -> list[dict[str, Any]]:
    """Assign each patient a label and karyotype.

    Exactly ``round(patients * abnormal_fraction)`` patients are abnormal (positions
    shuffled by ``seed``); abnormality kinds are dealt round-robin in shuffled order, so
    every kind appears once there are at least ``len(ABNORMALITIES)`` abnormal patients.

    Returns:
        one dict per patient: label, subtype, karyotype, slots.
    """
    cohort = np.random.default_rng([seed, patients, 2, 0])
    n_abnormal = int(round(patients * float(abnormal_fraction)))
    abnormal = np.zeros(patients, dtype=bool)
    abnormal[cohort.permutation(patients)[:n_abnormal]] = True
    kinds = [ABNORMALITIES[j % len(ABNORMALITIES)] for j in range(n_abnormal)]
    kinds = [kinds[j] for j in cohort.permutation(n_abnormal)]
    out = []
    for p in range(patients):
        kind = kinds.pop() if abnormal[p] else "normal"
        k = make_karyotype(kind, patient_rng(seed, p))
        out.append({"label": "abnormal" if abnormal[p] else "normal", "subtype": kind, **k})
    return out


# ---------------------------------------------------------------- drawing (image level)

def _jittered_templates(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-image band templates: edges shifted by ~20 % of a band, darkness scaled +-20 %."""
    out = {}
    for t in TYPES:
        edges, dark = band_template(t)
        e = edges.copy()
        e[1:-1] += rng.normal(0.0, 0.2 / len(dark), len(e) - 2)
        e = np.clip(np.sort(e), 0.0, 1.0)
        out[t] = (e, np.clip(dark * rng.uniform(0.8, 1.2, len(dark)), 0.0, 1.0))
    return out


def _profile(chrom: Chromosome, pos_mb: np.ndarray, templates: dict) -> np.ndarray:
    """Band darkness along a chromosome at positions ``pos_mb`` (Mb from p-ter). [M]"""
    dark = np.zeros_like(pos_mb)
    start = 0.0
    for ctype, t0, t1 in chrom:
        length = (t1 - t0) * LENGTH_MB[ctype]
        sel = (pos_mb >= start) & (pos_mb <= start + length)
        t = t0 + (pos_mb[sel] - start) / LENGTH_MB[ctype]
        edges, d = templates[ctype]
        dark[sel] = d[np.clip(np.searchsorted(edges, t, side="right") - 1, 0, len(d) - 1)]
        start += length
    return dark


def _draw_chromosome(canvas: np.ndarray, chrom: Chromosome, cx: float, cy: float,
                     mb_px: float, width: float, style: dict, templates: dict,
                     rng: np.random.Generator) -> None:
    """Draw one chromosome with its centromere at (cx, cy), in place on ``canvas`` [H, W]."""
    length_mb = sum((t1 - t0) * LENGTH_MB[c] for c, t0, t1 in chrom)
    length = length_mb * mb_px * rng.uniform(0.97, 1.03)
    m = max(int(length) + 1, 6)
    s = np.linspace(0.0, length, m, dtype=np.float32)  # arc length [M]
    theta = rng.normal(0.0, 0.06) + rng.normal(0.0, 0.35) * (s / length - 0.5)
    ds = length / (m - 1)
    x = np.concatenate([[0.0], np.cumsum(np.sin(theta[:-1]) * ds)])
    y = np.concatenate([[0.0], np.cumsum(np.cos(theta[:-1]) * ds)])
    first = chrom[0][0]
    s_cen = CENTROMERE[first] * LENGTH_MB[first] / length_mb * length  # centromere arc length
    j_cen = int(round(s_cen / ds))
    x = (x - x[j_cen] + cx).astype(np.float32)
    y = (y - y[j_cen] + cy).astype(np.float32)

    h, w = canvas.shape
    x0, x1 = max(int(x.min() - width), 0), min(int(x.max() + width) + 2, w)
    y0, y1 = max(int(y.min() - width), 0), min(int(y.max() + width) + 2, h)
    if x0 >= x1 or y0 >= y1:
        return
    py, px = np.mgrid[y0:y1, x0:x1].astype(np.float32)  # [h, w]
    d2 = (px[..., None] - x) ** 2 + (py[..., None] - y) ** 2  # [h, w, M]
    j = d2.argmin(axis=-1)  # nearest centre-line sample per pixel
    d = np.sqrt(np.take_along_axis(d2, j[..., None], axis=-1)[..., 0])
    sj = s[j]
    radius = 0.5 * width * (1.0 - 0.38 * np.exp(-((sj - s_cen) / (0.45 * width)) ** 2))
    alpha = np.clip(radius - d + 0.5, 0.0, 1.0)

    prof = _profile(chrom, s / length * length_mb, templates)
    sigma = style["band_blur"]
    k = np.exp(-0.5 * (np.arange(-3 * int(sigma + 1), 3 * int(sigma + 1) + 1) / sigma) ** 2)
    prof = np.convolve(np.pad(prof, len(k) // 2, mode="edge"), k / k.sum(), mode="valid")
    pale, darkest = style["pale"], style["dark"]
    value = pale - (pale - darkest) * style["contrast"] * prof[j]
    value = value - 0.10 * (d / np.maximum(radius, 1e-3)) ** 2  # rounded rod: darker rim
    region = canvas[y0:y1, x0:x1]
    canvas[y0:y1, x0:x1] = region * (1 - alpha) + np.minimum(value, region) * alpha


def render(patient: dict[str, Any], rng: np.random.Generator, side: int) -> np.ndarray:
    """Draw one karyogram realisation of ``patient``. Returns uint8 RGB [side, side, 3]."""
    import cv2

    r = float(side)
    bg = rng.uniform(0.86, 0.98)
    style = {
        "pale": bg - rng.uniform(0.16, 0.32),
        "dark": rng.uniform(0.06, 0.28),
        "contrast": rng.uniform(0.75, 1.0),
        "band_blur": rng.uniform(0.6, 1.6) * r / BASE_SIZE,
    }
    canvas = np.full((side, side), bg, dtype=np.float32)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / r
    canvas += rng.normal(0, 0.02) * (xx - 0.5) + rng.normal(0, 0.02) * (yy - 0.5)
    templates = _jittered_templates(rng)

    top, bottom, label_h, gap = 0.04 * r, 0.02 * r, 0.035 * r, 0.02 * r
    extents = [(max(CENTROMERE[t] * LENGTH_MB[t] for t in row),
                max((1 - CENTROMERE[t]) * LENGTH_MB[t] for t in row)) for row in ROWS]
    mb_px = (r - top - bottom - len(ROWS) * (label_h + gap)) / sum(p + q for p, q in extents)
    mb_px *= rng.uniform(0.92, 1.03)  # condensation
    width = 0.024 * r * rng.uniform(0.85, 1.15)
    font = cv2.FONT_HERSHEY_SIMPLEX
    font_scale = 0.32 * r / BASE_SIZE
    thick = max(1, int(round(r / BASE_SIZE)))
    text_val = float(rng.uniform(0.15, 0.4))
    text = np.zeros((side, side), np.uint8)  # label ink (cv2 text needs uint8)

    y = top
    for row, (p_ext, q_ext) in zip(ROWS, extents):
        cy_row = y + p_ext * mb_px
        slot_w = 0.9 * r / len(row)
        for i, ctype in enumerate(row):
            cx = 0.05 * r + (i + 0.5) * slot_w + rng.normal(0, 0.01 * r)
            cy = cy_row + rng.normal(0, 0.006 * r)
            chroms = list(patient["slots"][ctype])
            order = rng.permutation(len(chroms))
            spacing = 1.8 * width  # homologues side by side with a small gap
            for k_, idx in enumerate(order):
                offset = (k_ - (len(chroms) - 1) / 2) * spacing + rng.normal(0, 0.08 * width)
                _draw_chromosome(canvas, chroms[idx], cx + offset, cy, mb_px,
                                 width * rng.uniform(0.95, 1.05), style, templates, rng)
            (tw, th), _ = cv2.getTextSize(ctype, font, font_scale, thick)
            org = (int(round(cx - tw / 2)), int(round(y + (p_ext + q_ext) * mb_px + label_h * 0.8)))
            cv2.putText(text, ctype, org, font, font_scale, 255, thick, cv2.LINE_AA)
        y += (p_ext + q_ext) * mb_px + label_h + gap
    ink = text.astype(np.float32) / 255.0
    canvas = canvas * (1.0 - ink) + text_val * ink

    canvas = cv2.GaussianBlur(canvas, (0, 0), rng.uniform(0.3, 0.7) * r / BASE_SIZE)
    canvas += rng.normal(0, rng.uniform(0.004, 0.015), canvas.shape).astype(np.float32)
    rgb = canvas[..., None] * (1.0 + rng.uniform(-0.05, 0.05, 3)).astype(np.float32)
    return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# ---------------------------------------------------------------- truth for evidence maps

def layout() -> dict[str, tuple[float, float, float, float]]:
    """Where :func:`render` puts each chromosome type: ``{type: (x0, y0, x1, y1)}`` in
    normalised image coordinates (any ``side``), at the nominal condensation.

    The boxes tile the picture: a slot is its column of its row (``0.9 / len(row)`` wide from
    x = 0.05, the outer slots reaching the image border) and its row band, from the row's top
    to the next row's top (label included); so the ~1 % position jitter and the +-5 %
    condensation move a chromosome inside its box.
    """
    top, bottom, label_h, gap = 0.04, 0.02, 0.035, 0.02
    extents = [(max(CENTROMERE[t] * LENGTH_MB[t] for t in row),
                max((1 - CENTROMERE[t]) * LENGTH_MB[t] for t in row)) for row in ROWS]
    mb = (1.0 - top - bottom - len(ROWS) * (label_h + gap)) / sum(p + q for p, q in extents)
    mb *= 0.975  # the middle of render's condensation range (0.92 - 1.03)
    boxes, y = {}, 0.0
    for k, (row, (p_ext, q_ext)) in enumerate(zip(ROWS, extents)):
        y_next = (top if k == 0 else y) + (p_ext + q_ext) * mb + label_h + gap
        y_end = 1.0 if k == len(ROWS) - 1 else y_next
        slot_w = 0.9 / len(row)
        for i, ctype in enumerate(row):
            x0 = 0.0 if i == 0 else 0.05 + i * slot_w
            x1 = 1.0 if i == len(row) - 1 else 0.05 + (i + 1) * slot_w
            boxes[ctype] = (x0, y, x1, y_end)
        y = y_end
    return boxes


def abnormal_chromosomes(karyotype: str) -> tuple[str, ...]:
    """The chromosome types an ISCN-like karyotype string of :func:`make_karyotype` changes:
    ``47,XY,+21`` -> (21,), ``46,XX,del(10)(q)`` -> (10,), ``46,XY,t(1;7)(q;q)`` -> (1, 7),
    ``45,X`` -> (X, Y) (one X and no Y: both sex slots differ from either normal), normal -> ()."""
    import re

    parts = [p.strip() for p in str(karyotype).split(",")]
    if len(parts) >= 2 and parts[0] == "45" and parts[1] == "X":
        return ("X", "Y")
    out: list[str] = []
    for p in parts[2:]:
        m = re.fullmatch(r"\+(\w+)", p) or re.match(r"del\((\w+)\)", p)
        if m:
            out.append(m.group(1))
        m = re.match(r"t\((\w+);(\w+)\)", p)
        if m:
            out += [m.group(1), m.group(2)]
    return tuple(out)


TASK = SynthTask(
    name="karyogram",
    labels=("abnormal", "normal"),
    base_size=BASE_SIZE,
    plan=plan,
    render=render,
    options={"abnormal_fraction": 0.5},
    extra_columns=("subtype", "karyotype"),
    check=check_options,
)
