"""The page a lab reads: headline first, warnings when not better than chance, key figures,
folded wide tables; the new figures are readable PNGs."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
from PIL import Image

from raycyto.analysis import plots
from raycyto.analysis.html import (Headline, Section, chance_warnings, headline_html,
                                   key_columns_first, render_page)
from raycyto.analysis.selective import selective_curves, selective_scores, selective_summary

PNG = b"\x89PNG\r\n\x1a\n"


def _png_size(path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG
    with Image.open(path) as im:
        im.load()
        return im.size


def summary_frame(n: int = 15, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        head = "probe" if i == 0 else "abcdk"[i % 5]
        rows.append({"config": f"efficientnet_lite{i % 3}/{['frozen', 'last1', 'full'][i % 3]}/{head}",
                     "head": head, "best": i == 7,
                     **{f"{m}_mean": rng.uniform(0.4, 0.95) for m in ("auc", "recall", "accuracy")},
                     **{f"{m}_std": rng.uniform(0.01, 0.1) for m in ("auc", "recall", "accuracy")}})
    return pd.DataFrame(rows)


def test_comparison_dot_plot_is_readable_for_15_configurations(tmp_path):
    path = plots.comparison_dot_plot(summary_frame(15), ("auc", "recall", "accuracy"),
                                     tmp_path / "comparison.png", chance={"auc": 0.5})
    w, h = _png_size(path)
    assert w <= 1000 and 250 <= h <= 700, (w, h)          # not 3400 x 320
    w3, h3 = _png_size(plots.comparison_dot_plot(summary_frame(3), ("auc",), tmp_path / "c3.png"))
    assert h3 < h and w3 < w


def test_risk_coverage_and_conformal_plots_draw(tmp_path):
    rng = np.random.default_rng(1)
    n = 300
    p1 = rng.uniform(size=n)
    probs = np.stack([1 - p1, p1], 1)
    y = (rng.uniform(size=n) < p1).astype(int)
    s = selective_scores(y, probs.argmax(1), probs, mc_label=probs.argmax(1),
                         mc_confidence=np.round(np.abs(p1 - 0.5) + 0.5, 2), mc_mean=probs,
                         temperature=1.5, set_size=rng.integers(1, 3, n))
    w, h = _png_size(plots.risk_coverage_plot(selective_curves(s), selective_summary(s),
                                              "cfg: risk-coverage, test", tmp_path / "rc.png"))
    assert w > 300 and h > 250
    table = pd.DataFrame({"score": ["lac", "lac", "aps", "aps"], "level": [0.9, 0.95, 0.9, 0.95],
                          "coverage_mean": [0.91, 0.95, 0.94, 0.97],
                          "coverage_std": [0.02, 0.01, np.nan, 0.01],
                          "set_size_mean": [1.2, 1.5, 1.6, 1.9]})
    _png_size(plots.conformal_coverage_plot(table, "cfg: conformal coverage", tmp_path / "cov.png"))


def test_chance_warnings_fire_only_when_they_should():
    good = {"auc": (0.93, 0.02), "accuracy": (0.88, 0.03)}
    assert chance_warnings(good, 5, {"auc": (0.80, 0.03)}, "linear probe", 0.6) == []
    bad = chance_warnings({"auc": (0.39, 0.10)}, 5)
    assert len(bad) == 1 and "not better than chance" in bad[0] and "0.39" in bad[0]
    # mean above 0.5 but the fold spread puts 0.5 inside the interval
    assert chance_warnings({"auc": (0.58, 0.10)}, 5)
    assert not chance_warnings({"auc": (0.58, 0.02)}, 5)
    probe = chance_warnings(good, 5, {"auc": (0.92, 0.02)}, "linear probe")
    assert len(probe) == 1 and probe[0].startswith("The linear probe does as well")
    assert "majority" not in " ".join(chance_warnings(good, 5, majority_share=0.6))
    assert "'normal'" in chance_warnings({"accuracy": (0.60, 0.02)}, 5, majority_share=0.7,
                                         majority_name="normal")[0]
    assert chance_warnings({"auc": (0.45, float("nan"))}, 1)      # one fold: mean alone


def test_page_opens_with_the_headline_then_figures_then_folded_tables():
    wide = pd.DataFrame({f"col{i}": np.arange(3) for i in range(30)})
    wide["config"] = ["a/frozen/d", "b/<x>/a", "c/full/probe"]
    headline = Headline(
        config="efficientnet_lite0/frozen/d", selected_on="validation recall", folds=5,
        metrics={"auc": (0.39, 0.08), "recall": (0.5, 0.2)},
        baseline_name="linear probe", baseline={"auc": (0.41, 0.05)},
        referral="refers 23% of test cases (MC vote below 0.8)",
        guarantee="Among cases not referred (confidence >= 0.9), abnormal recall is >= 95% "
                  "with 90% confidence",
        warnings=tuple(chance_warnings({"auc": (0.39, 0.08)}, 5)))
    page = render_page("raycyto report: karyogram", headline,
                       [("risk_coverage.png", "risk-coverage"), ("comparison.png", "compared")],
                       [Section("summary", wide, np.array([True, False, False]),
                                key_columns=("config", "col29"))],
                       notes=["experiment: runs/k"], appendix="<h2>data</h2>")
    i_head = page.index('<section class="headline">')
    i_warn = page.index('class="warn"')
    i_fig = page.index("Key figures")
    i_tab = page.index("<h2>Tables</h2>")
    assert i_head < i_warn < i_fig < i_tab < page.index("<h2>data</h2>")
    assert page.index("<img") > i_fig and page.index("<table><thead>") > i_tab
    assert "0.390 \u00b1 0.080" in page and "0.410 \u00b1 0.050" in page
    assert "not better than chance" in page and "abnormal recall is &gt;= 95%" in page
    assert re.search(r"<details><summary>summary \(3 rows\)</summary>", page)   # folded
    header = re.search(r"<table><thead><tr>(.*?)</tr>", page).group(1)
    assert re.findall(r"<th>(.*?)</th>", header)[:3] == ["config", "col29", "col0"]
    assert "b/&lt;x&gt;/a" in page and "<x>" not in page
    assert 'class="best"' in page


def test_headline_without_baseline_or_referral_and_key_columns_first():
    h = headline_html(Headline("cfg", {"accuracy": (0.9, float("nan"))}, 1))
    assert "<th>selected model</th></tr>" in h and "0.900" in h and "Referral" not in h
    df = pd.DataFrame({"b": [1], "a": [2], "c": [3]})
    assert list(key_columns_first(df, ["c", "missing", "a"]).columns) == ["c", "a", "b"]
