"""Learning curve of the main job's karyogram classifier: test balanced accuracy against the
number of training patients, for head s on the cached feature map and the linear probe on the
pooled features, on the same folds and the same (fixed) test patients.

The data, splits, feature cache and training are the sweep's own (``build_context``,
``train_head``, ``fit_probe``) with the config's head s settings and learning rate; only the
training rows of each fold are cut down to a seeded subset of its patients (validation and
test stay whole). Prints one row per training-set size: patients, head s and probe test
balanced accuracy (mean ± std over the folds), and head s recall per subtype.

Example (the main job's data, folds 0 and 1, ~12 minutes on 2 cores):
    .venv/bin/python benchmarks/learning_curve.py --config jobs/configs/demo.yaml --folds 0,1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd


def _subset(groups: np.ndarray, rows: np.ndarray, n_patients: int, seed: int) -> np.ndarray:
    """The rows of ``n_patients`` of the patients in ``rows`` (seeded, nested across sizes)."""
    patients = np.unique(groups[rows])
    keep = set(np.random.default_rng(seed).permutation(patients)[:n_patients])
    return rows[np.isin(groups[rows], list(keep))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="jobs/configs/demo.yaml")
    p.add_argument("--fractions", default="0.25,0.5,1", help="of each fold's training patients")
    p.add_argument("--folds", default="0,1")
    p.add_argument("--lr", type=float, default=None, help="head s learning rate (default: the middle of search.lr)")
    p.add_argument("--out", default=None, help="experiment folder (default: a temporary one)")
    a = p.parse_args()

    import ray
    import torch
    from sklearn.metrics import balanced_accuracy_score

    from raycyto.config import load_config
    from raycyto.models.registry import get_spec
    from raycyto.tune.features import POOLED, feature_key
    from raycyto.tune.probe import fit_probe
    from raycyto.tune.sweep import build_context
    from raycyto.tune.train import HeadData, HParams, train_head
    from raycyto.tune.trainable import mc_seed

    cfg = load_config(a.config)
    backbone = cfg.grid.backbones[0]
    lr = a.lr or float(np.sqrt(np.prod(cfg.search.lr)))  # geometric middle of the searched range
    hp = HParams(lr=lr, batch_size=int(cfg.search.batch_size[0]))
    out = Path(a.out or tempfile.mkdtemp(prefix="learning_curve_"))
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    t0 = time.time()
    ctx, _ = build_context(cfg, out, progress=True)
    maps = ray.get(ctx.feature_refs[feature_key(backbone, get_spec(backbone).feature_map.layer)])
    pooled = ray.get(ctx.feature_refs[feature_key(backbone, POOLED)])
    print(f"data + features: {time.time() - t0:.0f} s")
    subtype = ctx.table.df.set_index(ctx.table.df["path"].astype(str))["subtype"] if "subtype" in ctx.table.df else None
    kw = dict(cfg.grid.head_kwargs.get("s", {}), grid=[int(v) for v in maps.features.shape[2:]])
    if ctx.positive is not None:
        kw["reference"] = 1 - int(ctx.positive)

    paths = ctx.table.df["path"].astype(str).to_numpy()
    groups = ctx.table.df["group"].astype(str).to_numpy()
    results = []
    for fold in [int(f) for f in a.folds.split(",")]:
        split = ctx.splits[fold]
        n_all = len(np.unique(groups[split.train]))
        for frac in sorted(float(f) for f in a.fractions.split(",")):
            n = max(2, int(round(frac * n_all)))
            train_idx = _subset(groups, np.asarray(split.train), n, seed=1000 + fold)
            row = {"fold": fold, "patients": n}
            for name, fs in (("s", maps), ("probe", pooled)):
                tr = fs.rows(paths[train_idx], copies=True)  # every copy for training, copy 0 to evaluate
                va, te = fs.rows(paths[split.val], copies=False), fs.rows(paths[split.test], copies=False)
                data = HeadData(fs.features[tr], fs.label[tr], fs.eval_features(va), fs.label[va],
                                groups_train=fs.group[tr])
                t1 = time.time()
                if name == "s":
                    model = train_head("s", data, task=ctx.task, train=cfg.train, hp=hp,
                                       seed=mc_seed(cfg, fold), head_kwargs=kw).model
                else:
                    model = fit_probe(data, ctx.task, cfg.train, seed=mc_seed(cfg, fold))[0]
                with torch.no_grad():
                    pred = model(torch.from_numpy(fs.eval_features(te))).argmax(1).numpy()
                y = fs.label[te]
                row[name] = balanced_accuracy_score(y, pred)
                row[f"{name}_s"] = time.time() - t1
                if name == "s" and subtype is not None:
                    sub = subtype.loc[fs.path[te]].to_numpy()
                    for st in np.unique(sub):
                        m = sub == st
                        row[f"recall {st}"] = float((pred[m] == y[m]).mean())
            print(f"fold {fold}, {n} training patients: head s {row['s']:.3f} ({row['s_s']:.0f} s), "
                  f"probe {row['probe']:.3f}", flush=True)
            results.append(row)
    ray.shutdown()
    df = pd.DataFrame(results)
    agg = df.groupby("patients").agg(["mean", "std"])
    print(f"\nLearning curve ({backbone}, {cfg.data.input_size} px, folds {a.folds}; test balanced accuracy, "
          "mean ± std over folds; recall per subtype for head s)")
    cols = [c for c in df.columns if c.startswith("recall ")]
    print(f"{'patients':>8}  {'head s':>13}  {'probe':>13}  " + "  ".join(f"{c[7:]:>13}" for c in cols))
    for n, r in agg.iterrows():
        print(f"{n:>8}  {r[('s', 'mean')]:.3f} ± {r[('s', 'std')]:.3f}  {r[('probe', 'mean')]:.3f} ± "
              f"{r[('probe', 'std')]:.3f}  " + "  ".join(f"{r[(c, 'mean')]:>13.2f}" for c in cols))


if __name__ == "__main__":
    main()
