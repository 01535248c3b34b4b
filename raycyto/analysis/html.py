"""report.html: one page with the tables (best rows highlighted), every figure (relative
``<img src>`` to PNGs beside it), the config and the data summary. No scripts, no network."""

from __future__ import annotations

import html
from dataclasses import dataclass

import numpy as np
import pandas as pd

from raycyto.analysis.load import Experiment

CSS = """
body{font-family:system-ui,sans-serif;margin:24px;max-width:1400px;color:#222}
h1{font-size:22px} h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ccc}
div.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:12px;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:right}
th{background:#f2f2f2} td.s{text-align:left}
tr.best td{background:#fff3b0;font-weight:600}
figure{display:inline-block;margin:8px;vertical-align:top}
figcaption{font-size:12px;color:#555}
pre{background:#f7f7f7;padding:8px;font-size:12px;overflow:auto}
.note{font-size:12px;color:#555}
"""


@dataclass(frozen=True)
class Section:
    """A titled table in the page; ``best`` is a boolean mask of highlighted rows."""

    title: str
    table: pd.DataFrame
    best: np.ndarray | None = None
    note: str = ""
    max_rows: int = 200


def _cell(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else ""
    if isinstance(value, (float, np.floating)):
        return "" if np.isnan(value) else f"{value:.4g}"
    return html.escape(str(value))


def table_html(df: pd.DataFrame, best: np.ndarray | None = None, max_rows: int = 200) -> str:
    """An HTML table; rows where ``best`` is true get class ``best``."""
    cols = list(df.columns)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    rows = []
    for i, row in enumerate(df.head(max_rows).itertuples(index=False)):
        cls = ' class="best"' if best is not None and bool(best[i]) else ""
        cells = "".join(
            f'<td{" class=s" if isinstance(v, str) else ""}>{_cell(v)}</td>' for v in row)
        rows.append(f"<tr{cls}>{cells}</tr>")
    more = f'<p class="note">first {max_rows} of {len(df)} rows; all in the CSV</p>' \
        if len(df) > max_rows else ""
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>{more}")


def _data_summary(exp: Experiment) -> str:
    data = exp.meta.get("data") or {}
    parts = [f"<p>task: {html.escape(str(exp.meta.get('task', '')))}; classes: "
             f"{html.escape(', '.join(exp.class_names))}; positive class: "
             f"{html.escape(exp.class_names[exp.positive]) if exp.positive is not None else 'none (macro averages)'}; "
             f"MC passes: {html.escape(str((exp.meta.get('mc') or {}).get('passes', '')))}, "
             f"threshold: {exp.threshold:g}</p>",
             f"<p>images: {html.escape(str(data.get('n_images', '')))}; groups (patients): "
             f"{html.escape(str(data.get('n_groups', '')))}; started "
             f"{html.escape(str(exp.meta.get('started', '')))}, finished "
             f"{html.escape(str(exp.meta.get('finished', '')))}</p>"]
    counts = data.get("class_counts") or {}
    if counts:
        parts.append("<h3>class counts</h3>" + table_html(
            pd.DataFrame({"class": list(counts), "images": list(counts.values())})))
    folds = data.get("folds") or []
    if folds:
        rows = [{k: (len(v) if isinstance(v, list) else v) for k, v in f.items()} for f in folds]
        parts.append("<h3>folds (images per split)</h3>" + table_html(pd.DataFrame(rows)))
    bad = data.get("bad_files") or []
    parts.append(f"<h3>bad files ({len(bad)})</h3>" +
                 (table_html(pd.DataFrame(bad)) if bad else "<p>none</p>"))
    return "".join(parts)


def render_html(exp: Experiment, title: str, sections: list[Section],
                figures: list[tuple[str, str]], notes: list[str]) -> str:
    """The report page.

    Args:
        exp: the experiment (config and data summary).
        title: page heading.
        sections: tables in order.
        figures: (file name relative to the page, caption).
        notes: lines shown under the heading.
    """
    body = [f"<h1>{html.escape(title)}</h1>"]
    body += [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    for s in sections:
        body.append(f"<h2>{html.escape(s.title)}</h2>")
        if s.note:
            body.append(f'<p class="note">{html.escape(s.note)}</p>')
        body.append(table_html(s.table, s.best, s.max_rows) if len(s.table) else "<p>no rows</p>")
    body.append("<h2>figures</h2>")
    body += [f'<figure><img src="{html.escape(src)}" alt="{html.escape(cap)}">'
             f"<figcaption>{html.escape(cap)}</figcaption></figure>" for src, cap in figures]
    body.append("<h2>data</h2>" + _data_summary(exp))
    body.append(f"<h2>config.yaml</h2><pre>{html.escape(exp.config_text)}</pre>")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>"
            f"<body>{''.join(body)}</body></html>\n")
