"""report.html: one page with the tables (best rows highlighted), every figure (relative
``<img src>`` to PNGs beside it), the config and the data summary. No scripts, no network.

Two layouts: :func:`render_html` (tables first, then figures) and :func:`render_page`, the
page a lab reads: a headline block (:class:`Headline`: the selected configuration with its
test metrics as mean ± std, the baseline beside it, the referral rate and its guarantee, a
plain warning when the model is not better than chance, see :func:`chance_warnings`), a
short plain-language explanation, the key figures, and the wide tables last, key columns
first, folded in ``<details>`` and scrollable.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from raycyto.analysis.load import Experiment

CSS = """.cards{display:flex;flex-wrap:wrap;gap:10px}
.case{margin:0;width:172px;font-size:11px;line-height:1.3}
.case img{border:1px solid #bbb;display:block}

body{font-family:system-ui,sans-serif;margin:24px;max-width:1400px;color:#222}
h1{font-size:22px} h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ccc}
div.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:12px;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:right}
th{background:#f2f2f2} td.s{text-align:left}
tr.best td{background:#fff3b0;font-weight:600}
figure{display:inline-table;margin:8px;vertical-align:top}
figcaption{display:table-caption;caption-side:bottom;font-size:12px;color:#555}
pre{background:#f7f7f7;padding:8px;font-size:12px;overflow:auto}
.note{font-size:12px;color:#555}
img{max-width:100%;height:auto}
section.headline{border:1px solid #bbb;border-radius:6px;padding:12px 18px;background:#fafafa}
section.headline h2{margin-top:4px;border:none}
section.headline p,section.headline li{font-size:15px;margin:6px 0}
table.kpi{font-size:15px} table.kpi td,table.kpi th{padding:4px 12px}
div.warn{border-left:6px solid #c0392b;background:#fdecea;padding:8px 12px;margin:10px 0;
font-size:15px}
div.ok{border-left:6px solid #2e7d32;background:#edf7ed;padding:8px 12px;margin:10px 0}
details{margin:8px 0} details>summary{cursor:pointer;font-size:15px;font-weight:600}
div.explain p{max-width:900px;font-size:14px;line-height:1.45}
"""


@dataclass(frozen=True)
class Section:
    """A titled table in the page; ``best`` is a boolean mask of highlighted rows."""

    title: str
    table: pd.DataFrame
    best: np.ndarray | None = None
    note: str = ""
    max_rows: int = 200
    key_columns: tuple[str, ...] = ()      # shown first (render_page)
    open: bool = False                     # unfolded (render_page)


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


def data_summary_html(exp: Experiment) -> str:
    """Task, classes, counts, folds and bad files of one experiment as HTML."""
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
    body.append("<h2>data</h2>" + data_summary_html(exp))
    body.append(f"<h2>config.yaml</h2><pre>{html.escape(exp.config_text)}</pre>")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>"
            f"<body>{''.join(body)}</body></html>\n")


# --- the page a lab reads --------------------------------------------------------------

MeanStd = tuple[float, float]

EXPLANATION = (
    "Every number comes from test folds: images the model never saw while it was trained "
    "or chosen. The configuration was chosen on validation data only. \u00b1 is the spread "
    "(standard deviation) over the folds.",
    "Referral: a case is sent to a person instead of being decided by the model when the "
    "model is unsure. The referral rate is the share of cases sent on.",
    "Prediction set: instead of one answer the model may name every class it cannot rule "
    "out. At level 90% the set holds the true class for 90% of cases (conformal prediction, "
    "calibrated on out-of-fold rows: images that the model predicting them never trained "
    "or was chosen on). A set of one class is a confident answer; "
    "a set of several classes means: refer.",
    "Guarantee: a recall guarantee (for example 'abnormal recall \u2265 95% with 90% "
    "confidence') is a statement about the cases the model decides alone, calibrated on "
    "out-of-fold rows with a method (learn-then-test) that accounts for the chance of an "
    "unlucky calibration sample.",
    "Risk-coverage: for each way of scoring the model's confidence, how the error rate "
    "falls as more of the least confident cases are referred. Lower curves, and a lower "
    "AURC (area under the curve), are better.",
)


@dataclass(frozen=True)
class Headline:
    """The top of the page: what was selected, how good it is, what it refers.

    Attributes:
        config: the selected configuration.
        metrics: {metric: (mean, std)} on test folds, in display order.
        folds: number of test folds.
        selected_on: how it was selected, e.g. "validation recall".
        baseline_name: e.g. "linear probe" or "majority class (normal)"; "" = none.
        baseline: {metric: (mean, std)} of the baseline (missing metrics shown as "-").
        referral: one sentence on the referral rate and the rule (or several: a list).
        guarantee: one sentence with the guarantee that comes with it (or several: a list).
        warnings: plain sentences, shown in red (see :func:`chance_warnings`).
    """

    config: str
    metrics: dict[str, MeanStd]
    folds: int
    selected_on: str = ""
    baseline_name: str = ""
    baseline: dict[str, MeanStd] = field(default_factory=dict)
    referral: str | tuple[str, ...] = ""
    guarantee: str | tuple[str, ...] = ""
    warnings: tuple[str, ...] = ()


def _t975(df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def _fmt(ms: MeanStd | None) -> str:
    if ms is None or ms[0] is None or (isinstance(ms[0], float) and math.isnan(ms[0])):
        return "\u2013"
    mean, std = ms
    return f"{mean:.3f}" if std is None or math.isnan(std) else f"{mean:.3f} \u00b1 {std:.3f}"


def chance_warnings(metrics: dict[str, MeanStd], folds: int,
                    baseline: dict[str, MeanStd] | None = None, baseline_name: str = "baseline",
                    majority_share: float | None = None, majority_name: str = "") -> list[str]:
    """Plain warnings when the model is not better than chance or than its baseline.

    Rules: the 95% t-interval of the fold-mean AUC (mean ± t * std / sqrt(folds)) includes
    or lies below 0.5; the baseline's AUC (or, without AUC, accuracy) is as high or the
    difference is within that fold noise; accuracy does not beat always answering the
    majority class.

    Args:
        metrics: {metric: (mean, std)} on test folds (``auc``, ``accuracy`` used).
        folds: number of folds behind the means.
        baseline: the baseline's metrics; majority_share: share of the majority class.

    Returns:
        Sentences (empty when none applies).
    """
    out: list[str] = []
    auc = metrics.get("auc")
    if auc is not None and not math.isnan(auc[0]):
        mean, std = auc
        if folds >= 2 and std is not None and not math.isnan(std):
            half = _t975(folds - 1) * std / math.sqrt(folds)
            lo, hi = mean - half, mean + half
            if lo <= 0.5:
                worse = " It is below 0.5: worse than guessing." if hi < 0.5 else ""
                out.append(f"This model is not better than chance: its test AUC is {mean:.2f} "
                           f"\u00b1 {std:.2f} over {folds} folds, and the 95% interval "
                           f"{lo:.2f}\u2013{hi:.2f} includes or lies below 0.5, which is what "
                           f"guessing gives.{worse} Do not use it to decide cases.")
        elif mean <= 0.5:
            out.append(f"This model is not better than chance: its test AUC is {mean:.2f} "
                       "(0.5 is what guessing gives). Do not use it to decide cases.")
    if baseline:
        key = "auc" if "auc" in metrics and "auc" in baseline else "accuracy"
        m, b = metrics.get(key), baseline.get(key)
        if m is not None and b is not None and not (math.isnan(m[0]) or math.isnan(b[0])):
            diff = m[0] - b[0]
            se = math.sqrt((np.nan_to_num(m[1]) ** 2 + np.nan_to_num(b[1]) ** 2) / max(folds, 1))
            noise = _t975(folds - 1) * se if folds >= 2 else 0.0
            if diff <= noise:
                shown = "AUC" if key == "auc" else key
                out.append(f"The {baseline_name} does as well: {shown} {b[0]:.2f} against "
                           f"{m[0]:.2f} for the selected model (difference {diff:+.2f}, within "
                           "fold-to-fold noise or worse). The extra model buys nothing here.")
    acc = metrics.get("accuracy")
    if majority_share is not None and acc is not None and not math.isnan(acc[0]) \
            and acc[0] <= majority_share:
        out.append(f"Accuracy {acc[0]:.2f} is no better than always answering "
                   f"'{majority_name or 'the majority class'}' ({majority_share:.2f}).")
    return out


def headline_html(h: Headline) -> str:
    """The headline block (a ``<section class="headline">``)."""
    names = list(h.metrics)
    head = "<tr><th></th><th>selected model</th>" + \
        (f"<th>{html.escape(h.baseline_name)}</th>" if h.baseline_name else "") + "</tr>"
    rows = "".join(
        f"<tr><td class=s>{html.escape(m)}</td><td>{_fmt(h.metrics[m])}</td>" +
        (f"<td>{_fmt(h.baseline.get(m))}</td>" if h.baseline_name else "") + "</tr>"
        for m in names)
    sel = f" (chosen on {html.escape(h.selected_on)})" if h.selected_on else ""
    parts = ['<section class="headline"><h2>Result</h2>',
             f"<p>Selected configuration: <b>{html.escape(h.config)}</b>{sel}. Test metrics "
             f"over {h.folds} fold{'s' if h.folds != 1 else ''} (mean \u00b1 std):</p>",
             f'<table class="kpi"><thead>{head}</thead><tbody>{rows}</tbody></table>']
    for title, text in (("Referral", h.referral), ("Guarantee", h.guarantee)):
        items = [text] if isinstance(text, str) else list(text)
        items = [t for t in items if t]
        if len(items) == 1:
            parts.append(f"<p><b>{title}:</b> {html.escape(items[0])}</p>")
        elif items:
            parts.append(f"<p><b>{title}:</b></p><ul>" +
                         "".join(f"<li>{html.escape(t)}</li>" for t in items) + "</ul>")
    parts += [f'<div class="warn"><b>Warning.</b> {html.escape(w)}</div>' for w in h.warnings]
    parts.append("</section>")
    return "".join(parts)


def key_columns_first(df: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """``df`` with the present ``keys`` columns first, the rest in their order."""
    first = [k for k in keys if k in df.columns]
    return df[first + [c for c in df.columns if c not in first]]


def folded_table_html(section: Section) -> str:
    """A section as ``<details>``: title and row count as the summary, key columns first."""
    df = key_columns_first(section.table, section.key_columns)
    note = f'<p class="note">{html.escape(section.note)}</p>' if section.note else ""
    body = table_html(df, section.best, section.max_rows) if len(df) else "<p>no rows</p>"
    return (f"<details{' open' if section.open else ''}><summary>{html.escape(section.title)} "
            f"({len(df)} row{'s' if len(df) != 1 else ''})</summary>{note}{body}</details>")


def figures_html(figures: Sequence[tuple[str, str]]) -> str:
    """``<figure>`` elements for (src relative to the page, caption)."""
    return "".join(f'<figure><img src="{html.escape(src)}" alt="{html.escape(cap)}">'
                   f"<figcaption>{html.escape(cap)}</figcaption></figure>" for src, cap in figures)


def render_page(title: str, headline: Headline | None, figures: Sequence[tuple[str, str]],
                sections: Sequence[Section], notes: Sequence[str] = (),
                explanation: Sequence[str] = EXPLANATION,
                more_figures: Sequence[tuple[str, str]] = (),
                appendix: str = "", gallery: str = "") -> str:
    """The report page a lab reads, top to bottom: headline, explanation, key figures,
    wide tables (folded), further figures, appendix (data summary, config).

    Args:
        title: page heading; notes: small lines under it (experiment path...).
        headline: the headline block (None: left out).
        figures: key figures (src, caption), in order.
        sections: tables, folded unless ``Section.open``.
        explanation: plain-language paragraphs.
        more_figures: figures shown after the tables (per-fold confusion matrices...).
        appendix: raw HTML at the end, e.g. :func:`data_summary_html` and the config.
        gallery: raw HTML right after the headline (the case gallery,
            :func:`raycyto.analysis.evidence.write_gallery`).
    """
    body = [f"<h1>{html.escape(title)}</h1>"]
    body += [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    if headline is not None:
        body.append(headline_html(headline))
    if gallery:
        body.append(gallery)
    if explanation:
        body.append('<details open><summary>How to read this page</summary><div class="explain">' +
                    "".join(f"<p>{html.escape(p)}</p>" for p in explanation) + "</div></details>")
    if figures:
        body.append("<h2>Key figures</h2>" + figures_html(figures))
    if sections:
        body.append("<h2>Tables</h2>" + "".join(folded_table_html(s) for s in sections))
    if more_figures:
        body.append("<h2>More figures</h2>" + figures_html(more_figures))
    if appendix:
        body.append(appendix)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>"
            f"<body>{''.join(body)}</body></html>\n")


def config_html(config_text: str) -> str:
    """The resolved config as a folded ``<pre>``."""
    return (f"<details><summary>config.yaml</summary><pre>{html.escape(config_text)}</pre>"
            "</details>")
