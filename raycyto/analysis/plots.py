"""PNG figures for the report. Each function draws one figure into ``path`` and returns it.

Uses ``matplotlib.figure.Figure`` directly (Agg canvas, no pyplot global state), small
figures at a modest dpi so a report renders in seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

DPI = 80
CURVE_METRICS = ("loss", "accuracy", "precision", "recall", "auc")


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes.ravel()


def _save(fig, path: Path) -> Path:
    path = Path(path)
    fig.savefig(path, format="png", dpi=DPI)
    return path


def confusion_plot(counts: np.ndarray, class_names: list[str], title: str, path: Path) -> Path:
    """Counts and row-normalised confusion matrix side by side.

    Args:
        counts: [C, C] int, rows = actual, columns = predicted.
    """
    rows = counts.sum(axis=1, keepdims=True)
    norm = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=float), where=rows > 0)
    c = len(class_names)
    fig, axes = _figure(3.2 * 2 + 0.4 * c, 2.6 + 0.3 * c, ncols=2)
    for ax, mat, sub, fmt in ((axes[0], counts, "counts", "d"),
                              (axes[1], norm, "row-normalised", ".2f")):
        ax.imshow(mat, cmap="Blues", vmin=0, vmax=mat.max() if mat.max() > 0 else 1)
        for i in range(c):
            for j in range(c):
                ax.text(j, i, format(mat[i, j], fmt), ha="center", va="center", fontsize=8,
                        color="white" if mat[i, j] > 0.6 * mat.max() else "black")
        ax.set_xticks(range(c), class_names, rotation=45, fontsize=8)
        ax.set_yticks(range(c), class_names, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        ax.set_title(sub, fontsize=9)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def roc_plot(y_true: np.ndarray, probs: np.ndarray, class_names: list[str], positive: int | None,
             title: str, path: Path, folds: np.ndarray | None = None) -> Path:
    """ROC curves: binary (pooled + one thin line per fold) or one-vs-rest per class.

    Args:
        y_true: [N] ints; probs: [N, C]; folds: [N] fold of each case (binary per-fold lines).
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, (ax,) = _figure(4.6, 4.0)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    if len(class_names) == 2:
        targets = [(positive, "pooled", 2.0)]
        if folds is not None:
            targets += [(positive, f"fold {k}", 0.8) for k in np.unique(folds)]
    else:
        targets = [(k, f"{name} vs rest", 1.5) for k, name in enumerate(class_names)]
    for k, label, lw in targets:
        mask = np.ones(len(y_true), bool) if not label.startswith("fold") else \
            folds == int(label.split()[1])
        y = y_true[mask] == k
        if y.all() or not y.any():
            ax.plot([], [], label=f"{label} (AUC n/a: one class)")
            continue
        fpr, tpr, _ = roc_curve(y, probs[mask, k])
        ax.plot(fpr, tpr, lw=lw, label=f"{label} (AUC {roc_auc_score(y, probs[mask, k]):.3f})")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def training_curves_plot(histories: dict[int, pd.DataFrame], title: str, path: Path) -> Path:
    """Per-epoch train (solid) and validation (dashed) curves, one colour per fold."""
    fig, axes = _figure(13, 2.8, ncols=len(CURVE_METRICS))
    for ax, m in zip(axes, CURVE_METRICS):
        for i, (fold, h) in enumerate(sorted(histories.items())):
            x = h["epoch"] if "epoch" in h else np.arange(1, len(h) + 1)
            for split, ls in (("train", "-"), ("val", "--")):
                if f"{split}_{m}" in h:
                    ax.plot(x, h[f"{split}_{m}"], ls=ls, color=f"C{i}",
                            label=f"{split} fold {fold}")
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize=6)
    fig.suptitle(f"{title} (solid: train, dashed: validation)", fontsize=10)
    return _save(fig, path)


def hpo_scatter_plot(hpo: pd.DataFrame, path: Path) -> Path:
    """Validation loss against learning rate (log x) and batch size, coloured by val accuracy."""
    fig, axes = _figure(9, 3.6, ncols=2)
    color = pd.to_numeric(hpo.get("val_accuracy", pd.Series(np.nan, index=hpo.index)),
                          errors="coerce")
    loss = pd.to_numeric(hpo.get("val_loss", pd.Series(np.nan, index=hpo.index)), errors="coerce")
    for ax, col in zip(axes, ("lr", "batch_size")):
        sc = ax.scatter(pd.to_numeric(hpo[col], errors="coerce"), loss, c=color, cmap="viridis",
                        edgecolors="k", linewidths=0.4, s=30)
        if col == "lr":
            ax.set_xscale("log")
        ax.set_xlabel("learning rate" if col == "lr" else "batch size")
        ax.set_ylabel("validation loss")
    fig.colorbar(sc, ax=axes[1], label="validation accuracy")
    fig.suptitle("search samples", fontsize=10)
    return _save(fig, path)


def reliability_plot(curves: dict[str, tuple[pd.DataFrame, float]], title: str, path: Path) -> Path:
    """Reliability diagram: accuracy against confidence per bin; ECE in the legend.

    Args:
        curves: {name: (bins from uncertainty.reliability_bins, ece)}.
    """
    fig, (ax,) = _figure(4.6, 4.0)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8, label="perfect calibration")
    for name, (bins, ece) in curves.items():
        ax.plot(bins["confidence"], bins["accuracy"], marker="o", label=f"{name} (ECE {ece:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence (probability of the predicted class)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def referral_plot(curve: pd.DataFrame, threshold: float, at_threshold: dict[str, float],
                  recall_name: str, title: str, path: Path,
                  marks: list[tuple[str, float]] | None = None) -> Path:
    """Accuracy and recall on kept cases against the share kept; configured threshold marked.

    Args:
        curve: uncertainty.referral_curve output.
        at_threshold: {"kept_share", "accuracy_kept", "recall_kept"} at the configured threshold.
        marks: further operating points (label, share kept), e.g. the risk-controlled threshold.
    """
    fig, (ax,) = _figure(5.0, 4.0)
    ax.plot(curve["kept_share"], curve["accuracy_kept"], marker=".", label="accuracy on kept")
    ax.plot(curve["kept_share"], curve["recall_kept"], marker=".", label=f"{recall_name} on kept")
    x = at_threshold["kept_share"]
    ax.axvline(x, color="red", ls=":", lw=1.2,
               label=f"threshold {threshold:g}: {1 - x:.0%} referred")
    for key in ("accuracy_kept", "recall_kept"):
        ax.plot([x], [at_threshold[key]], "o", color="red", ms=5)
    for i, (label, kept) in enumerate(marks or []):
        if np.isfinite(kept):
            ax.axvline(kept, color=f"C{i + 2}", ls="--", lw=1.2, label=f"{label}: {1 - kept:.0%} referred")
    if curve["kept_share"].nunique() <= 1:  # every pass agreed on every case: nothing to trade off
        ax.text(0.5, 0.5, "all MC passes agree on every case (confidence 1):\n"
                "this configuration has no dropout, so nothing is referred",
                transform=ax.transAxes, ha="center", va="center", fontsize=8, color="dimgrey")
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("share of cases kept (not referred)")
    ax.set_ylabel("score on kept cases")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    return _save(fig, path)


def comparison_plot(summary: pd.DataFrame, metrics: tuple[str, ...], path: Path) -> Path:
    """Grouped bars: test fold mean per configuration and metric, std as error bars."""
    n = len(summary)
    fig, (ax,) = _figure(max(6.0, 1.2 * len(metrics) * max(n, 1) * 0.45 + 2), 4.0)
    width = 0.8 / max(n, 1)
    x = np.arange(len(metrics))
    for i, row in enumerate(summary.itertuples(index=False)):
        means = [getattr(row, f"{m}_mean") for m in metrics]
        stds = np.nan_to_num([getattr(row, f"{m}_std") for m in metrics])
        ax.bar(x + (i - (n - 1) / 2) * width, means, width, yerr=stds, capsize=2,
               label=row.config + (" (selected)" if row.best else ""))
    ax.set_xticks(x, metrics)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test fold mean ± std")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("configurations compared", fontsize=9)
    return _save(fig, path)


def risk_coverage_plot(curves: pd.DataFrame, summary: pd.DataFrame, title: str, path: Path) -> Path:
    """Risk-coverage curves, one per confidence score, AURC in the legend (best first).

    Args:
        curves: selective.selective_curves output (score, coverage, risk).
        summary: selective.selective_summary output (score, aurc).
    """
    fig, (ax,) = _figure(5.6, 5.0)
    order = summary.sort_values("aurc")["score"].tolist() if len(summary) else []
    order += [s for s in curves["score"].unique() if s not in order]
    aurcs = dict(zip(summary["score"], summary["aurc"])) if len(summary) else {}
    for i, name in enumerate(order):
        c = curves[curves["score"] == name].sort_values("coverage")
        a = aurcs.get(name, np.nan)
        # one point per reachable threshold; a tie group is one point, joined by lines
        ax.plot(c["coverage"], c["risk"], lw=1.8 if i == 0 else 1.1, color=f"C{i}",
                marker="." if len(c) < 30 else None,
                label=f"{name} (AURC {a:.3f})" if np.isfinite(a) else name)
    if len(curves):
        full = curves.loc[curves["coverage"] == curves["coverage"].max(), "risk"]
        if len(full):
            ax.axhline(float(full.iloc[0]), color="grey", ls=":", lw=0.8,
                       label="error rate with nothing referred")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("coverage (share of cases the model decides; the rest are referred)")
    ax.set_ylabel("error rate on the cases it decides")
    ax.set_title(f"{title} (lower is better)", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    return _save(fig, path)


def _short(label: str, width: int = 38) -> str:
    return label if len(label) <= width else "…" + label[-(width - 1):]


def comparison_dot_plot(summary: pd.DataFrame, metrics: tuple[str, ...], path: Path,
                        label: str = "config", chance: dict[str, float] | None = None) -> Path:
    """Configurations compared: one panel per metric, one row per configuration, the
    test-fold mean as a dot and ± std as a bar; rows sorted by the first metric.

    Args:
        summary: one row per configuration with ``<m>_mean`` / ``<m>_std`` columns, the
            ``label`` column, optional ``best`` (bool: the selected one, drawn red and bold)
            and ``head`` (``"probe"`` rows are baselines, drawn as grey diamonds).
        metrics: metric names, e.g. ("auc", "recall", "accuracy").
        chance: {metric: value} drawn as a dashed line (e.g. {"auc": 0.5}).
    """
    chance = chance or {}
    key = f"{metrics[0]}_mean"
    df = summary.sort_values(key, ascending=True, na_position="first").reset_index(drop=True)
    n = max(len(df), 1)
    fig, axes = _figure(1.6 + 2.6 * len(metrics), 1.0 + 0.26 * n, ncols=len(metrics))
    best = df["best"].to_numpy(dtype=bool) if "best" in df else np.zeros(len(df), bool)
    probe = (df["head"].astype(str) == "probe").to_numpy() if "head" in df \
        else np.zeros(len(df), bool)

    def column(name: str) -> np.ndarray:
        if name not in df:
            return np.full(len(df), np.nan)
        return pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=float)

    y = np.arange(len(df))
    for j, (ax, m) in enumerate(zip(axes, metrics)):
        mean, std = column(f"{m}_mean"), np.nan_to_num(column(f"{m}_std"))
        for kind, mask, style in (("model", ~best & ~probe, dict(fmt="o", color="C0")),
                                  ("baseline", probe, dict(fmt="D", color="grey")),
                                  ("selected", best, dict(fmt="o", color="red"))):
            if mask.any():
                ax.errorbar(mean[mask], y[mask], xerr=std[mask], capsize=2, ms=5, lw=1,
                            label=kind, **style)
        if m in chance:
            ax.axvline(chance[m], color="grey", ls="--", lw=0.8)
        ax.set_xlim(0, 1.02)
        ax.set_title(f"{m} (test folds, mean ± std)", fontsize=9)
        ax.grid(axis="x", lw=0.3)
        ax.set_yticks(y, [_short(str(s)) for s in df[label]] if j == 0 else [""] * len(df),
                      fontsize=8)
        if j == 0:
            for tick, b in zip(ax.get_yticklabels(), best):
                if b:
                    tick.set_fontweight("bold")
                    tick.set_color("red")
    axes[-1].legend(fontsize=7, loc="lower left")
    return _save(fig, path)


def conformal_coverage_plot(table: pd.DataFrame, title: str, path: Path,
                            tolerance: float = 0.05) -> Path:
    """Empirical test coverage against the nominal level per conformal score (left) and
    mean set size (right).

    Args:
        table: rows of one configuration: score, level, coverage_mean, coverage_std,
            set_size_mean (conformal.conformal_summary).
        tolerance: the band drawn around the diagonal.
    """
    fig, (ax, ax2) = _figure(8.4, 3.8, ncols=2)
    levels = np.sort(table["level"].unique()) if len(table) else np.array([0.9])
    low = (table["coverage_mean"] - np.nan_to_num(table["coverage_std"])).min() if len(table) else 1.0
    lo, hi = max(0.0, min(levels.min() - 0.1, float(low) - 0.02)), 1.0
    grid = np.linspace(lo, hi, 10)
    ax.plot(grid, grid, ls="--", color="grey", lw=0.8, label="nominal")
    ax.fill_between(grid, grid - tolerance, np.minimum(grid + tolerance, 1), color="grey",
                    alpha=0.15, label=f"± {tolerance:g}")
    for i, (score, g) in enumerate(table.groupby("score", sort=True)):
        g = g.sort_values("level")
        dx = (i - 0.5) * 0.004
        ax.errorbar(g["level"] + dx, g["coverage_mean"], yerr=np.nan_to_num(g["coverage_std"]),
                    fmt="o-", capsize=3, color=f"C{i}", label=score)
        ax2.plot(g["level"], g["set_size_mean"], "o-", color=f"C{i}", label=score)
    ax.set_xlim(lo, hi + 0.01)
    ax.set_ylim(lo, 1.01)
    ax.set_xlabel("nominal level")
    ax.set_ylabel("coverage on test folds (mean ± std)")
    ax.legend(fontsize=7, loc="upper left")
    ax2.set_xlabel("nominal level")
    ax2.set_ylabel("mean prediction-set size (classes)")
    ax2.set_ylim(bottom=0)
    ax2.legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def strata_plot(table: pd.DataFrame, metric: str, title: str, path: Path,
                label: str = "value") -> Path:
    """One row per stratum (e.g. karyogram subtype): the test-fold mean of ``metric`` as a dot,
    ± std as a bar, the number of test cases beside the label; sorted by the mean.

    Args:
        table: rows of strata.csv for one configuration and one column (``value``, ``n``,
            ``<metric>_mean``, ``<metric>_std``).
        metric: e.g. ``accuracy`` (for binary strata: recall of abnormal subtypes,
            specificity of the normal one) or ``recall``.
    """
    df = table.sort_values(f"{metric}_mean", ascending=True, na_position="first").reset_index(drop=True)
    fig, (ax,) = _figure(6.4, 1.2 + 0.32 * max(len(df), 1))
    y = np.arange(len(df))
    mean = pd.to_numeric(df[f"{metric}_mean"], errors="coerce").to_numpy(dtype=float)
    std = np.nan_to_num(pd.to_numeric(df[f"{metric}_std"], errors="coerce").to_numpy(dtype=float))
    ax.errorbar(mean, y, xerr=std, fmt="o", color="C0", capsize=2, ms=5, lw=1)
    low = mean < 0.5
    if low.any():
        ax.errorbar(mean[low], y[low], xerr=std[low], fmt="o", color="red", capsize=2, ms=5, lw=1)
    ax.set_yticks(y, [f"{_short(str(v), 28)} (n={int(n)})" for v, n in zip(df[label], df["n"])], fontsize=8)
    ax.axvline(0.5, color="grey", ls="--", lw=0.8)
    ax.set_xlim(0, 1.02)
    ax.grid(axis="x", lw=0.3)
    ax.set_xlabel(f"{metric} on test folds (mean ± std over folds; red: below 0.5)")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)
