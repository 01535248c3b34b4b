"""Synthetic peripheral blood-smear fields: ALL, AML, CLL, CML and healthy (HLT).

Drawn in optical density (absorbance) space: each object adds stain absorbance on a local
patch, white cells replace what lies under them, and the field is lit with a pinkish
illuminant (RGB = light * exp(-OD)), so overlapping red cells darken like real ones.

A patient gets a class, a cell mix (perturbed around the class recipe) and a stain bias;
every image is a new field: cell positions, counts, zoom, stain jitter, focus and noise.
Stain and brightness are drawn independently of the class, so colour alone does not give
the label away; the class lives in the white-cell morphology.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from raycyto.synth.base import (SynthTask, coverage, patch_grid, patient_rng, segment_distance,
                                smooth_noise, wobbly_radius)

CLASSES: tuple[str, ...] = ("ALL", "AML", "CLL", "CML", "HLT")
BASE_SIZE = 224
RBC_RADIUS = 13.0  # pixels at BASE_SIZE


def _od(rgb: tuple[int, int, int]) -> np.ndarray:
    """Optical density of a colour seen at unit stain density under white light. [3]"""
    return (-np.log(np.asarray(rgb, dtype=np.float64) / 255.0)).astype(np.float32)


# Stain colours (absorbance at unit density); scaled per patient and image.
STAINS: dict[str, np.ndarray] = {
    "eosin": _od((222, 135, 150)),       # red cells, plasma tint
    "nucleus": _od((95, 55, 135)),       # haematoxylin / azure on chromatin
    "blue": _od((170, 182, 228)),        # basophilic cytoplasm (blasts, lymphocytes)
    "pale": _od((230, 212, 222)),        # neutrophil cytoplasm
    "granule": _od((190, 120, 170)),     # neutrophilic / azurophilic granules
    "baso": _od((50, 28, 85)),           # basophil granules
    "auer": _od((150, 35, 85)),          # Auer rods
}


@dataclass
class _Field:
    """What one cell painter needs: the OD canvas, stains, pixel scale and its RNG."""

    od: np.ndarray                 # [H, W, 3] float32 absorbance
    stains: dict[str, np.ndarray]  # name -> [3]
    px: float                      # pixels per BASE_SIZE pixel
    rbc: float                     # red-cell radius in pixels
    rng: np.random.Generator


# ---------------------------------------------------------------- shape helpers

def _polar(dx: np.ndarray, dy: np.ndarray, ox: float = 0.0, oy: float = 0.0):
    x, y = dx - ox, dy - oy
    return np.hypot(x, y), np.arctan2(y, x)


def _blob_sdf(f: _Field, dx, dy, radius, wobble, ox=0.0, oy=0.0) -> np.ndarray:
    """Signed distance (pixels) of a wobbly disc of ``radius`` centred at (ox, oy). [h, w]"""
    rho, theta = _polar(dx, dy, ox, oy)
    return rho - wobbly_radius(f.rng, theta, radius, wobble)


def _dots(f: _Field, shape, mask: np.ndarray, count: int, sigma: float) -> np.ndarray:
    """Density map of ``count`` round granules of size ``sigma`` placed where ``mask`` > 0.5."""
    import cv2

    ys, xs = np.nonzero(mask > 0.5)
    out = np.zeros(shape, np.float32)
    if len(ys) == 0 or count <= 0:
        return out
    pick = f.rng.integers(0, len(ys), count)
    np.add.at(out, (ys[pick], xs[pick]), f.rng.uniform(0.6, 1.0, count).astype(np.float32))
    out = cv2.GaussianBlur(out, (0, 0), sigma)
    return np.minimum(out * np.float32(2 * np.pi * sigma * sigma), 1.5)


def _chromatin(f: _Field, shape, clumped: bool) -> np.ndarray:
    """Multiplicative chromatin texture around 1: fine (blasts) or coarse clumps (mature)."""
    if clumped:
        n = smooth_noise(f.rng, shape, 1.4 * f.px)
        return 0.85 + 0.35 * np.clip(n, -0.6, 2.0)
    return 1.0 + 0.10 * smooth_noise(f.rng, shape, 0.6 * f.px)


def _paint(f: _Field, cx: float, cy: float, extent: float,
           layers: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]) -> None:
    """Composite an object: ``layers(dx, dy) -> (od [h,w,3] premultiplied, alpha [h,w])``."""
    h, w = f.od.shape[:2]
    grid = patch_grid(cx, cy, extent, h, w)
    if grid is None:
        return
    sl, dx, dy = grid
    od, alpha = layers(dx, dy)
    f.od[sl] = f.od[sl] * (1.0 - alpha[..., None]) + od


# ---------------------------------------------------------------- cells

def _white_cell(f: _Field, cx: float, cy: float, radius: float, cyto: str, cyto_density: float,
                nucleus_sdf: Callable[[np.ndarray, np.ndarray], np.ndarray],
                nucleus_density: float, clumped: bool, granules: tuple[str, float] | None = None,
                nucleoli: tuple[int, float, float, float, float] | None = None,
                extra: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None,
                wobble: float = 0.05) -> None:
    """Generic leukocyte: wobbly cytoplasm, a nucleus, optional granules / nucleoli / extras.

    Args:
        granules: (stain, granules per BASE_SIZE-pixel^2 of cell area).
        nucleoli: (count, radius, strength, nucleus centre x, y) — pale spots in the nucleus.
        extra: ``(dx, dy, od) -> od`` drawn on top (Auer rods, basophil granules).
    """
    def layers(dx, dy):
        a_cell = coverage(_blob_sdf(f, dx, dy, radius, wobble))
        od = (a_cell * cyto_density)[..., None] * f.stains[cyto]
        if granules is not None:
            stain, per_px = granules
            n = int(per_px * np.pi * (radius / f.px) ** 2)
            g = _dots(f, dx.shape, a_cell, n, 0.55 * f.px)
            od = od + (0.45 * g * a_cell)[..., None] * f.stains[stain]
        a_nuc = coverage(nucleus_sdf(dx, dy)) * a_cell
        dens = nucleus_density * _chromatin(f, dx.shape, clumped)
        if nucleoli is not None:
            count, rad, strength, nx, ny = nucleoli
            for _ in range(count):
                ang, dist = f.rng.uniform(0, 2 * np.pi), f.rng.uniform(0, 2.2 * rad)
                sx, sy = nx + dist * np.cos(ang), ny + dist * np.sin(ang)
                spot = coverage(np.hypot(dx - sx, dy - sy) - rad * f.rng.uniform(0.8, 1.2), 1.5)
                dens = dens * (1.0 - strength * spot)
        od = od * (1.0 - a_nuc[..., None]) + (a_nuc * dens)[..., None] * f.stains["nucleus"]
        if extra is not None:
            od = extra(dx, dy, od)
        return od, a_cell

    _paint(f, cx, cy, radius * 1.3 + 2, layers)


def _round_nucleus(f: _Field, radius: float, offset: float, wobble: float):
    ang = f.rng.uniform(0, 2 * np.pi)
    ox, oy = offset * np.cos(ang), offset * np.sin(ang)
    return ox, oy, (lambda dx, dy: _blob_sdf(f, dx, dy, radius, wobble, ox, oy))


def _lobed_nucleus(f: _Field, r: float, lobes: int):
    """3-5 lobes on a curved chain joined by thin strands (segmented neutrophil)."""
    start = f.rng.uniform(0, 2 * np.pi)
    step = f.rng.uniform(0.9, 1.35)
    ring = 0.42 * r
    centres = [(ring * np.cos(start + k * step), ring * np.sin(start + k * step))
               for k in range(lobes)]
    radii = [r * f.rng.uniform(0.22, 0.29) for _ in range(lobes)]
    strand = max(0.05 * r, 0.7 * f.px)

    def sdf(dx, dy):
        d = np.min([np.hypot(dx - x, dy - y) - rl for (x, y), rl in zip(centres, radii)], axis=0)
        for (ax, ay), (bx, by) in zip(centres[:-1], centres[1:]):
            d = np.minimum(d, segment_distance(dx, dy, ax, ay, bx, by) - strand)
        return d
    return sdf


def _band_nucleus(f: _Field, r: float):
    """C-shaped (band) nucleus: a thick arc."""
    a, half = 0.42 * r, 0.15 * r * f.rng.uniform(0.9, 1.2)
    start, span = f.rng.uniform(-np.pi, np.pi), f.rng.uniform(3.0, 4.3)

    def sdf(dx, dy):
        rho, theta = _polar(dx, dy)
        rel = np.mod(theta - start, 2 * np.pi)
        inside = rel <= span
        ends = [(a * np.cos(start + t), a * np.sin(start + t)) for t in (0.0, span)]
        d_end = np.min([np.hypot(dx - x, dy - y) for x, y in ends], axis=0)
        return np.where(inside, np.abs(rho - a), d_end) - half
    return sdf


def _kidney_nucleus(f: _Field, r: float):
    """Indented (metamyelocyte) nucleus: a disc minus an offset disc."""
    ang = f.rng.uniform(0, 2 * np.pi)
    ox, oy, disc = _round_nucleus(f, 0.55 * r, 0.12 * r, 0.04)
    ix, iy = ox + 0.62 * r * np.cos(ang), oy + 0.62 * r * np.sin(ang)
    return lambda dx, dy: np.maximum(disc(dx, dy), 0.3 * r - np.hypot(dx - ix, dy - iy))


def neutrophil(f: _Field, cx: float, cy: float) -> float:
    """Segmented neutrophil: 3-5 nuclear lobes, pale granular cytoplasm. Returns its radius."""
    r = f.rbc * f.rng.uniform(1.35, 1.6)
    _white_cell(f, cx, cy, r, "pale", 1.0, _lobed_nucleus(f, r, int(f.rng.integers(3, 6))),
                1.0, True, granules=("granule", 0.35))
    return r


def band_cell(f: _Field, cx: float, cy: float) -> float:
    """Band neutrophil: unsegmented C-shaped nucleus."""
    r = f.rbc * f.rng.uniform(1.35, 1.6)
    _white_cell(f, cx, cy, r, "pale", 1.0, _band_nucleus(f, r), 0.95, True,
                granules=("granule", 0.35))
    return r


def metamyelocyte(f: _Field, cx: float, cy: float) -> float:
    """Metamyelocyte: kidney-shaped (indented) nucleus, granular cytoplasm."""
    r = f.rbc * f.rng.uniform(1.45, 1.7)
    _white_cell(f, cx, cy, r, "pale", 1.1, _kidney_nucleus(f, r), 0.9, True,
                granules=("granule", 0.4))
    return r


def myelocyte(f: _Field, cx: float, cy: float) -> float:
    """Myelocyte: round eccentric nucleus, abundant granular cytoplasm."""
    r = f.rbc * f.rng.uniform(1.5, 1.85)
    _, _, sdf = _round_nucleus(f, 0.55 * r, 0.25 * r, 0.05)
    _white_cell(f, cx, cy, r, "pale", 1.25, sdf, 0.85, True, granules=("granule", 0.55))
    return r


def basophil(f: _Field, cx: float, cy: float) -> float:
    """Basophil: bilobed nucleus obscured by coarse dark granules."""
    r = f.rbc * f.rng.uniform(1.2, 1.45)

    def granules(dx, dy, od):
        cell = coverage(np.hypot(dx, dy) - 0.92 * r)
        n = int(0.5 * np.pi * (r / f.px) ** 2)
        g = _dots(f, dx.shape, cell, n, 0.8 * f.px)
        return od + (g * cell)[..., None] * f.stains["baso"]

    _white_cell(f, cx, cy, r, "pale", 0.9, _lobed_nucleus(f, r, 2), 0.7, True, extra=granules)
    return r


def lymphocyte(f: _Field, cx: float, cy: float) -> float:
    """Small mature lymphocyte: dense clumped round nucleus, thin blue rim."""
    r = f.rbc * f.rng.uniform(0.95, 1.2)
    _, _, sdf = _round_nucleus(f, r * f.rng.uniform(0.8, 0.9), 0.06 * r, 0.04)
    _white_cell(f, cx, cy, r, "blue", 0.9, sdf, 1.15, True)
    return r


def lymphoblast(f: _Field, cx: float, cy: float) -> float:
    """Large cell, nucleus fills most of it (high N:C), fine chromatin, faint nucleolus."""
    r = f.rbc * f.rng.uniform(1.5, 2.1)
    rn = r * f.rng.uniform(0.82, 0.9)
    ox, oy, sdf = _round_nucleus(f, rn, 0.05 * r, 0.05)
    if f.rng.random() < 0.3:  # nuclear cleft
        ang = f.rng.uniform(0, 2 * np.pi)
        kx, ky = ox + 1.05 * rn * np.cos(ang), oy + 1.05 * rn * np.sin(ang)
        base = sdf
        sdf = lambda dx, dy: np.maximum(base(dx, dy), 0.25 * rn - np.hypot(dx - kx, dy - ky))  # noqa: E731
    nucleoli = (int(f.rng.integers(0, 2)), 0.1 * rn, 0.15, ox, oy)
    _white_cell(f, cx, cy, r, "blue", 1.2, sdf, 0.75, False, nucleoli=nucleoli)
    return r


def myeloblast(f: _Field, cx: float, cy: float) -> float:
    """Large blast, round nucleus with 2-4 distinct nucleoli; Auer rod in ~40 %."""
    r = f.rbc * f.rng.uniform(1.6, 2.2)
    rn = r * f.rng.uniform(0.66, 0.76)
    ox, oy, sdf = _round_nucleus(f, rn, 0.12 * r, 0.05)
    nucleoli = (int(f.rng.integers(2, 5)), rn * f.rng.uniform(0.1, 0.14), 0.5, ox, oy)
    extra = None
    if f.rng.random() < 0.4:
        ang = np.arctan2(-oy, -ox) + f.rng.normal(0, 0.5)  # cytoplasm is widest opposite the offset
        dist = 0.5 * (rn + r) + 0.5 * np.hypot(ox, oy)
        mx, my = dist * np.cos(ang), dist * np.sin(ang)
        half, tang = 0.25 * r * f.rng.uniform(0.8, 1.2), ang + np.pi / 2 + f.rng.normal(0, 0.3)
        ax, ay = mx - half * np.cos(tang), my - half * np.sin(tang)
        bx, by = mx + half * np.cos(tang), my + half * np.sin(tang)
        width = 0.6 * f.px

        def auer_rod(dx, dy, od):
            rod = coverage(segment_distance(dx, dy, ax, ay, bx, by) - width, 0.8)
            return od * (1.0 - rod[..., None]) + (1.6 * rod)[..., None] * f.stains["auer"]
        extra = auer_rod
    _white_cell(f, cx, cy, r, "blue", 1.0, sdf, 0.7, False, granules=("granule", 0.06),
                nucleoli=nucleoli, extra=extra)
    return r


def smudge(f: _Field, cx: float, cy: float) -> float:
    """Smudge (basket) cell: a ruptured, smeared pale nucleus with streaks, no cytoplasm."""
    import cv2

    r = f.rbc * f.rng.uniform(1.3, 2.0)
    ang, squash = f.rng.uniform(0, np.pi), f.rng.uniform(0.55, 0.8)

    def layers(dx, dy):
        c, s = np.cos(ang), np.sin(ang)
        u, v = dx * c + dy * s, (-dx * s + dy * c) / squash
        alpha = coverage(_blob_sdf(f, u, v, r, 0.3), 2.5 * f.px)
        h, w = dx.shape
        streak = cv2.GaussianBlur(f.rng.standard_normal((h, w)).astype(np.float32), (0, 0),
                                  sigmaX=3.0 * f.px, sigmaY=0.6 * f.px)
        m = cv2.getRotationMatrix2D((w / 2, h / 2), -np.degrees(ang), 1.0)
        streak = cv2.warpAffine(streak, m, (w, h), borderMode=cv2.BORDER_REFLECT)
        streak /= max(float(streak.std()), 1e-6)
        dens = np.clip(0.45 + 0.1 * streak, 0.1, 1.0) * alpha
        return dens[..., None] * f.stains["nucleus"], alpha

    _paint(f, cx, cy, r * 1.6 + 2, layers)
    return r


def red_cell(f: _Field, cx: float, cy: float, strength: float) -> None:
    """Biconcave red cell: pale disc with central pallor and a denser rim (adds OD)."""
    r = f.rbc * f.rng.uniform(0.88, 1.12)
    aspect, ang = f.rng.uniform(0.88, 1.0), f.rng.uniform(0, np.pi)
    pallor = f.rng.uniform(0.45, 0.75)
    h, w = f.od.shape[:2]
    grid = patch_grid(cx, cy, r + 2, h, w)
    if grid is None:
        return
    sl, dx, dy = grid
    c, s = np.cos(ang), np.sin(ang)
    u, v = dx * c + dy * s, (-dx * s + dy * c) / aspect
    rho = np.hypot(u, v) / r
    alpha = coverage((rho - 1.0) * r)
    dens = 1.0 - pallor * np.exp(-(rho / 0.5) ** 2) + 0.15 * np.exp(-((rho - 0.88) / 0.12) ** 2)
    f.od[sl] += (alpha * dens * strength)[..., None] * f.stains["eosin"]


def platelet(f: _Field, cx: float, cy: float) -> None:
    """Small purple platelet clump (class-independent)."""
    r = f.rbc * f.rng.uniform(0.15, 0.28)

    def layers(dx, dy):
        a = coverage(_blob_sdf(f, dx, dy, r, 0.25))
        return (a * 0.6)[..., None] * f.stains["nucleus"], a

    _paint(f, cx, cy, r + 2, layers)


WHITE_CELLS: dict[str, Callable[[_Field, float, float], float]] = {
    "neutrophil": neutrophil, "band": band_cell, "metamyelocyte": metamyelocyte,
    "myelocyte": myelocyte, "basophil": basophil, "lymphocyte": lymphocyte,
    "lymphoblast": lymphoblast, "myeloblast": myeloblast, "smudge": smudge,
}

# class -> (white-cell mix, range of the field area the white cells cover)
RECIPES: dict[str, tuple[dict[str, float], tuple[float, float]]] = {
    "HLT": ({"neutrophil": 0.6, "lymphocyte": 0.35, "band": 0.05}, (0.05, 0.17)),
    "ALL": ({"lymphoblast": 0.85, "lymphocyte": 0.1, "neutrophil": 0.05}, (0.06, 0.2)),
    "AML": ({"myeloblast": 0.85, "neutrophil": 0.1, "lymphocyte": 0.05}, (0.06, 0.2)),
    "CLL": ({"lymphocyte": 0.78, "smudge": 0.22}, (0.05, 0.18)),
    "CML": ({"neutrophil": 0.25, "band": 0.18, "metamyelocyte": 0.17, "myelocyte": 0.2,
             "basophil": 0.12, "myeloblast": 0.05, "lymphocyte": 0.03}, (0.06, 0.2)),
}


# ---------------------------------------------------------------- patients and fields

def plan(seed: int, patients: int, labels: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Class assignment plus per-patient mix and stain bias.

    Args:
        labels: one class per patient (``raycyto.synth.generate``'s ``class_counts``); None:
            balanced classes, shuffled by ``seed``. Everything else is drawn the same way.
    Returns:
        one dict per patient: label, mix {cell: probability}, stain {name: scale [3]},
        light [3], rbc_density.
    """
    if labels is None:
        cohort = np.random.default_rng([seed, patients, 2, 0])
        labels = [CLASSES[i % len(CLASSES)] for i in cohort.permutation(patients)]
    elif len(labels) != patients:
        raise ValueError(f"{len(labels)} labels for {patients} patients")
    out = []
    for p, label in enumerate(labels):
        rng = patient_rng(seed, p)
        names, probs = zip(*RECIPES[label][0].items())
        mix = rng.dirichlet(np.asarray(probs) * 40.0)
        out.append({
            "label": label,
            "mix": dict(zip(names, mix.tolist())),
            # stain bias: overall strength and a per-channel hue shift, same for every class
            "stain": {k: rng.uniform(0.7, 1.3) * (1 + rng.normal(0, 0.06, 3)) for k in STAINS},
            "light": rng.uniform(0.8, 1.04) * (1 + rng.normal(0, 0.025, 3)),
            "rbc_density": rng.uniform(0.35, 0.8),
            "cell_scale": rng.uniform(0.92, 1.08),
        })
    return out


def render(patient: dict[str, Any], rng: np.random.Generator, side: int) -> np.ndarray:
    """Draw one blood-smear field of ``patient``. Returns uint8 RGB [side, side, 3]."""
    return render_with_cells(patient, rng, side)[0]


def render_with_cells(patient: dict[str, Any], rng: np.random.Generator, side: int
                      ) -> tuple[np.ndarray, list[tuple[float, float, float, str]]]:
    """:func:`render`, plus where the white cells are (the truth evidence maps are checked
    against): ``(image, [(x, y, radius, kind), ...])`` with x, y, radius in normalised image
    coordinates (fractions of ``side``). Same random draws as :func:`render`, same image."""
    import cv2

    px = side / BASE_SIZE
    zoom = rng.uniform(0.85, 1.2)
    stains = {k: (STAINS[k] * patient["stain"][k] * rng.uniform(0.9, 1.1)
                  * (1 + rng.normal(0, 0.03, 3))).astype(np.float32) for k in STAINS}
    f = _Field(od=np.zeros((side, side, 3), np.float32), stains=stains, px=px,
               rbc=RBC_RADIUS * px * zoom * patient["cell_scale"], rng=rng)
    # plasma: faint eosin tint with slow variation
    plasma = rng.uniform(0.04, 0.14) * (1 + 0.3 * smooth_noise(rng, (side, side), 20 * px))
    f.od += plasma[..., None] * stains["eosin"]

    area = float(side * side)
    n_rbc = int(patient["rbc_density"] * rng.uniform(0.85, 1.15) * area / (np.pi * f.rbc ** 2))
    strength = rng.uniform(0.35, 0.6)
    for x, y in rng.uniform(-0.05 * side, 1.05 * side, (n_rbc, 2)):
        red_cell(f, x, y, strength)
    for x, y in rng.uniform(0, side, (int(rng.integers(0, 5)), 2)):
        platelet(f, x, y)

    names = list(patient["mix"])
    probs = np.asarray([patient["mix"][n] for n in names])
    lo, hi = RECIPES[patient["label"]][1]
    target, covered, placed, kinds = rng.uniform(lo, hi) * area, 0.0, [], []
    while covered < target and len(placed) < 40:
        kind = names[int(rng.choice(len(names), p=probs / probs.sum()))]
        for _ in range(20):  # avoid stacking white cells on each other
            x, y = rng.uniform(0.06 * side, 0.94 * side, 2)
            if all(np.hypot(x - a, y - b) > 1.1 * (rb + 1.5 * f.rbc) for a, b, rb in placed):
                break
        r = WHITE_CELLS[kind](f, float(x), float(y))
        placed.append((x, y, r))
        kinds.append(kind)
        covered += np.pi * r * r

    light = (np.asarray((244, 232, 236), np.float32) / 255.0 * patient["light"]
             * rng.uniform(0.93, 1.05)).astype(np.float32)
    rgb = light * np.exp(-f.od)
    rgb = cv2.GaussianBlur(rgb, (0, 0), rng.uniform(0.4, 1.0) * px)
    rgb += rng.normal(0, rng.uniform(0.004, 0.015), rgb.shape).astype(np.float32)
    cells = [(float(x) / side, float(y) / side, float(r) / side, k) for (x, y, r), k in zip(placed, kinds)]
    return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), cells


TASK = SynthTask(name="leukemia", labels=CLASSES, base_size=BASE_SIZE, plan=plan, render=render)
