"""Which selection rule exports a model worth exporting? Rules compared on the test folds.

For each experiment (e.g. the main job of three seeds) and each rule, side by side:
the configuration the rule exports, its test accuracy (fold mean), the best linear probe's
and the median trained configuration's test accuracy on the same folds, and the exported
one's margin over each. The rule that never falls below the probe and the median, on average
over seeds, is the default (:data:`raycyto.analysis.selection.DEFAULT_RULE`).

    .venv/bin/python benchmarks/selection_rules.py runs/leukemia runs/leukemia_s1 runs/leukemia_s2
"""

from __future__ import annotations

import argparse

import pandas as pd

from raycyto.analysis.load import load_experiment, resolve_experiment_dir
from raycyto.analysis.tables import selection_table

RULES = ("accuracy", "loss", "brier", "accuracy+1se", "loss+1se", "brier+1se")


def compare(exp_dir: str, rules=RULES) -> pd.DataFrame:
    """One row per rule: the exported configuration and its test accuracy (fold mean, results.csv),
    the best probe's, and the median over the trained configurations (each cell's trial that
    the same rule picks)."""
    exp = load_experiment(resolve_experiment_dir(exp_dir))
    acc = dict(zip(exp.results["trial_id"].astype(str), pd.to_numeric(exp.results["test_accuracy"])))
    rows = []
    for rule in rules:
        sel = selection_table(exp, rule)
        test = sel["trial_id"].astype(str).map(acc)
        base = sel["baseline"].astype(bool)
        best = sel[sel["best"]].iloc[0]
        a, probe, median = acc[str(best["trial_id"])], float(test[base].max()), float(test[~base].median())
        rows.append({"experiment": str(exp_dir), "rule": rule, "exported": best["config"],
                     "test_accuracy": a, "best_probe": probe, "median_trained": median,
                     "vs_probe": a - probe, "vs_median": a - median, "oracle": float(test[~base].max())})
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiments", nargs="+", help="experiment folders or main-job folders (runs/leukemia)")
    args = ap.parse_args()
    table = pd.concat([compare(e) for e in args.experiments], ignore_index=True)
    pd.set_option("display.width", 200)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    mean = table.groupby("rule", sort=False)[["test_accuracy", "best_probe", "median_trained", "vs_probe",
                                              "vs_median"]].mean()
    print("\nmean over experiments (the target: vs_probe >= -0.01 and vs_median >= 0):")
    print(mean.to_string(float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
