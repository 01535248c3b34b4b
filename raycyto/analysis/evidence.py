"""The report's evidence: evidence.csv (pointing accuracy, white-cell hits, deletion test per
subtype / class), evidence_cases.csv (one row per abnormal test image) and the case gallery.

The gallery shows, right after the headline, thumbnails with the evidence painted over them:
the referred cases, the misclassified ones, and a few confident correct ones per class or
subtype, each with its true label, the answer, the MC confidence, the prediction set and the
top evidence; every thumbnail links to the full-size overlay (and the caption to the original).
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from raycyto.evidence.evaluation import Explained, evidence_tables, fine_peak
from raycyto.evidence.layout import top
from raycyto.evidence.maps import overlay

GALLERY_DIR = "gallery"
THUMB = 168
MAX_REFERRED, MAX_WRONG, PER_GROUP = 8, 8, 2


def gallery_rows(test: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Which test rows the gallery shows: referred, misclassified (MC answer wrong, not referred),
    confident correct (the most confident, ``PER_GROUP`` per subtype or class)."""
    wrong = test["mc_label"] != test["label"]
    referred = test[test["refer"].astype(bool)].sort_values("mc_confidence").head(MAX_REFERRED)
    missed = test[wrong & ~test["refer"].astype(bool)].sort_values("mc_confidence", ascending=False).head(MAX_WRONG)
    by = "subtype" if "subtype" in test and test["subtype"].notna().any() else "label"
    right = test[~wrong & ~test["refer"].astype(bool)].sort_values("mc_confidence", ascending=False)
    confident = right.groupby(by, sort=True).head(PER_GROUP).sort_values(by)
    return {"referred": referred, "misclassified": missed, "confident correct": confident}


def _sets(exp: Any, test: pd.DataFrame, level: float, score: str) -> dict[Any, list[str]]:
    """Each test row's conformal prediction set, cross-fitted: calibrated on the other folds' test rows."""
    from raycyto.referral.conformal import calibrate_conformal, prediction_sets

    cols = exp.prob_columns
    out: dict[Any, list[str]] = {}
    for fold, g in test.groupby("fold"):
        cal_rows = test[test["fold"] != fold]
        if cal_rows.empty:
            continue
        cal = calibrate_conformal(cal_rows[cols].to_numpy(float), cal_rows["label"].to_numpy(), [level], [score])
        member = prediction_sets(g[cols].to_numpy(float), cal, score, level)
        for idx, m in zip(g.index, member):
            out[idx] = [exp.class_names[k] for k in np.flatnonzero(m)]
    return out


def _caption(exp: Any, e: Explained, pset: Optional[list[str]], level: float) -> str:
    r, names = e.row, exp.class_names
    truth = names[int(r["label"])]
    detail = [str(r[c]) for c in ("subtype", "karyotype") if c in r and pd.notna(r[c]) and str(r[c]) != truth]
    if e.scores is not None:
        ev = ", ".join(f"{t['chromosome']} {t['score']:.2f}" for t in top(e.scores, 3))
        ev = f"chromosomes: {ev}"
    else:
        x, y = fine_peak(e.ev.share[0])
        ev = f"{e.ev.method} peak at ({x:.2f}, {y:.2f})"
    lines = [f"true: {truth}" + (f" ({', '.join(detail)})" if detail else ""),
             f"answer: {names[int(r['mc_label'])]}, confidence {float(r['mc_confidence']):.2f}"
             + (" \u2192 referred" if bool(r["refer"]) else ""),
             f"set ({level:.0%}): {{{', '.join(pset)}}}" if pset is not None else "set: -",
             f"fold {int(r['fold'])} (test); evidence for {names[e.target]}: {ev}"]
    return "<br>".join(html.escape(s) for s in lines)


def write_gallery(exp: Any, cases: list[Explained], picks: dict[str, pd.DataFrame], out: Path,
                  level: float, score: str) -> str:
    """Write the overlays (full size and thumbnails) under ``out/gallery`` and return the HTML."""
    import cv2

    from raycyto.evidence.maps import png_bytes

    gdir = out / GALLERY_DIR
    gdir.mkdir(parents=True, exist_ok=True)
    for old in gdir.glob("*.png"):
        old.unlink()
    by_index = {e.row.name: e for e in cases}
    test = exp.predictions.loc[sorted({i for df in picks.values() for i in df.index})]
    sets = _sets(exp, exp.predictions[(exp.predictions["trial_id"] == test["trial_id"].iloc[0])
                                      & (exp.predictions["split"] == "test")], level, score) if len(test) else {}
    named = any(e.layout is not None for e in cases)
    parts = ['<section class="gallery"><h2>Case gallery</h2><p class="note">The evidence painted over each '
             "test image (red: where the answer comes from; blue "
             + ("box: the top chromosome's slot" if named else "ring: the map's peak")
             + "), by the fold's own model. Click a thumbnail for the full-size image.</p>"]
    for title, df in picks.items():
        parts.append(f"<h3>{html.escape(title)} ({len(df)})</h3>")
        if df.empty:
            parts.append("<p>none</p>")
            continue
        parts.append('<div class="cards">')
        for idx in df.index:
            e = by_index.get(idx)
            if e is None:
                continue
            boxes = dict(e.layout.boxes) if e.layout is not None else None
            hl = [top(e.scores, 1)[0]["chromosome"]] if e.scores is not None else []
            full = overlay(e.image, e.ev.share[0], boxes, hl, None if boxes else fine_peak(e.ev.share[0]))
            stem = f"f{int(e.row['fold'])}_{Path(str(e.row['path'])).stem}"
            (gdir / f"{stem}.png").write_bytes(png_bytes(full))
            thumb = cv2.resize(full, (THUMB, THUMB), interpolation=cv2.INTER_AREA)
            (gdir / f"{stem}_thumb.png").write_bytes(png_bytes(thumb))
            original = os.path.relpath(str(e.row["path"]), str(out))
            parts.append(f'<figure class="case"><a href="{GALLERY_DIR}/{stem}.png">'
                         f'<img src="{GALLERY_DIR}/{stem}_thumb.png" width="{THUMB}" height="{THUMB}" '
                         f'alt="{html.escape(stem)}"></a><figcaption>{_caption(exp, e, sets.get(idx), level)}'
                         f'<br><a href="{html.escape(original)}">original</a></figcaption></figure>')
        parts.append("</div>")
    parts.append("</section>")
    return "".join(parts)


GALLERY_CSS = (".cards{display:flex;flex-wrap:wrap;gap:10px}"
               ".case{margin:0;width:172px;font-size:11px;line-height:1.3}"
               ".case img{border:1px solid #bbb;display:block}")


def evidence_section(exp: Any, trial_id: str, out: Path, level: float, score: str,
                     seed: int = 0, layout_file: Optional[str | Path] = None
                     ) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """evidence.csv table, per-image table and gallery HTML for the selected configuration."""
    test = exp.predictions[(exp.predictions["trial_id"] == trial_id) & (exp.predictions["split"] == "test")]
    picks = gallery_rows(test)
    extra = pd.concat(list(picks.values()))
    extra = extra[~extra.index.duplicated()]
    summary, per, cases = evidence_tables(exp, trial_id, seed=seed, extra=extra, layout_file=layout_file)
    return summary, per, write_gallery(exp, cases, picks, out, level, score)
