"""Blood smears: a finer map from the model itself -- a larger input, or the spatial head ``s``.

``benchmarks/smear_gradcam_knobs.py`` reads the 8 x 8 Grad-CAM map of ``runs/leukemia`` (head
``d``, input 128 px) every documented way; none puts the peak on a white cell in >= 90 % of the
abnormal test images. This benchmark trains the two untried settings on the same smear folder,
folds and seeds, side by side with the 128-px head ``d`` trained the same (reduced) way:

- head ``d`` (pooled features, evidence = Grad-CAM on ``blocks.4``, stride 16) at input 128 px
  (an 8 x 8 map, the demo default) and 224 px (14 x 14);
- head ``s`` (:class:`raycyto.models.spatial.MILMapHead`, reads the ``blocks.4`` map; evidence =
  the exact additive per-cell decomposition of the explained class's logit) at 128 and 224 px.

The reduced sweep, derived from the experiment's own config.yaml: one backbone
(EfficientNet-Lite1, the demo's selected one, frozen), heads ``d`` and ``s`` (``s`` with the
karyogram demo's settings: width 32, kernel 3, channel dropout 0.3), one search sample per cell
with lr in [0.0009, 0.0011] and batch size 16 (the selected demo trial 9976f660: lr 0.00102,
batch 16); everything else (5 folds, 60 epochs, patience 15, 2 augmented copies, MC 100 passes,
seeds) as the experiment. The data folder is the experiment's (no regeneration). ``--seeds 0,1``
repeats it on a second CV / search seed (seed 0 = the experiment's). ``--demo 224`` also runs the
experiment's own full sweep with head ``s`` added to its grid at 224 px, and measures the
configuration the report selects (``select_best``): what the demo would ship with both knobs offered.

A shuffled control scores each image's peak against the white cells of the next abnormal test
image (near chance unless the map only learnt where white cells usually lie).

Per trial, on every abnormal test image (each explained by its own fold's checkpoint, the MC
answer explained, as ``raycyto report``'s evidence.csv): :func:`raycyto.evidence.evaluation.evidence_tables`,
so the peak is :func:`~raycyto.evidence.evaluation.fine_peak` and the hit is
:func:`~raycyto.evidence.evaluation.on_white_cell`, exactly the report's criterion. Printed side by
side: peak on a white cell (all abnormal and per class), the deletion-test drops, the model's
test accuracy (mean over the 5 test folds) and the sweep / training times.

Usage (under the shared CPU lock; trains 2 sweeps per seed, about 2 min each on 2 cores, the demo
sweep about 8 min; skips an experiment that already exists under --out; writes --out/summary.csv)::

    python benchmarks/smear_evidence_size.py runs/leukemia --out runs/smear_evidence_size --seeds 0,1 --demo 224
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from raycyto.analysis.load import load_experiment, resolve_experiment_dir
from raycyto.analysis.tables import resolve_rule, select_best
from raycyto.evidence.evaluation import evidence_tables, on_white_cell, smear_truth

SIZES = (128, 224)
HEADS = ("d", "s")
REDUCED = {
    "grid": {"backbones": ["efficientnet_lite1"], "finetune": ["frozen"], "heads": list(HEADS),
             "head_kwargs": {"s": {"width": 32, "kernel": 3, "channel_dropout": 0.3}}},
    "search": {"samples": 1, "lr": [0.0009, 0.0011], "batch_size": [16]},
}


def reduced_config(base: dict, size: int, storage: Path, seed: int = 0) -> dict:
    """The experiment's config with the reduced grid / search, ``data.input_size = size``,
    ``cv.seed = search.seed = seed`` (the data stay the experiment's) and Tune's storage under
    ``storage``."""
    cfg = yaml.safe_load(yaml.safe_dump(base))
    cfg["cv"]["seed"] = cfg["search"]["seed"] = int(seed)
    for section, values in REDUCED.items():
        cfg[section].update(values)
    cfg["data"]["input_size"] = int(size)
    cfg["data"].pop("synthetic", None)  # data.source is the existing folder
    cfg["name"] = f"smear_evidence_size_{size}"
    cfg["storage"] = str(storage)
    return cfg


def demo_config(base: dict, size: int, storage: Path) -> dict:
    """The experiment's own (full) config with head ``s`` added to its grid and
    ``data.input_size = size``: what the demo would select with both knobs offered."""
    cfg = yaml.safe_load(yaml.safe_dump(base))
    cfg["grid"]["heads"] = [h for h in cfg["grid"]["heads"] if h != "s"] + ["s"]
    cfg["grid"]["head_kwargs"] = {**(cfg["grid"].get("head_kwargs") or {}), "s": REDUCED["grid"]["head_kwargs"]["s"]}
    cfg["data"]["input_size"] = int(size)
    cfg["data"].pop("synthetic", None)
    cfg["name"] = f"smear_evidence_size_demo{size}"
    cfg["storage"] = str(storage)
    return cfg


def sweep(cfg: dict, tag: str, out: Path) -> tuple[Path, float]:
    """Run (or reuse) the sweep ``cfg`` into ``out/tag``; returns (experiment dir, wall seconds, nan if reused)."""
    exp_dir = out / tag
    if (exp_dir / "results.csv").is_file():
        return exp_dir, float("nan")
    out.mkdir(parents=True, exist_ok=True)
    config = out / f"{tag}.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    raycyto = Path(sys.executable).with_name("raycyto")
    t0 = time.time()
    subprocess.run([str(raycyto), "sweep", "--config", str(config), "--out", str(exp_dir), "-q"], check=True)
    return exp_dir, time.time() - t0


def measure(exp_dir: Path, selected: bool = False) -> list[dict]:
    """One row per trial of heads d and s (``selected``: the configuration the report selects
    only): peak on a white cell per class, drops, accuracy, times."""
    exp = load_experiment(exp_dir)
    cfg = yaml.safe_load(exp.config_text) or {}
    size = int(cfg["data"]["input_size"])
    data_dir = Path(cfg["data"]["source"])
    cells_of = smear_truth(data_dir)
    res = exp.results
    rows = []
    todo = (res[res["trial_id"].astype(str) == str(select_best(exp, resolve_rule(exp, None))["trial_id"])]
            if selected else res[res["head"].isin(HEADS)])
    for _, r in todo.iterrows():
        trial = str(r["trial_id"])
        t0 = time.time()
        summary, per, _ = evidence_tables(exp, trial)
        took = time.time() - t0
        row = {"sweep": "demo, selected" if selected else "reduced", "backbone": r["backbone"],
               "seed": int(cfg["cv"]["seed"]), "input": size, "head": r["head"], "trial": trial, "method": summary["method"].iloc[0],
               "lr": float(r["lr"]), "batch": int(r["batch_size"]), "test_accuracy": float(r["test_accuracy"]),
               "test_f1": float(r["test_f1"]), "train_s": float(r["time_s"]), "evidence_s": took}
        for _, s in summary.iterrows():
            row[f"hit {s['group']}"] = float(s["peak_on_white_cell"])
            row[f"n {s['group']}"] = int(s["n"])
        # control: each peak against the white cells of the next abnormal test image (a map that
        # only learnt where white cells usually are scores as high here as on its own image)
        cells = [cells_of(str(Path(q).relative_to(data_dir))) for q in per["path"]]
        peaks = list(zip(per["peak_x"], per["peak_y"]))
        row["hit shuffled"] = float(np.mean([on_white_cell(pk, c) for pk, c in zip(peaks, cells[1:] + cells[:1])]))
        row["distinct peaks"] = len(set(peaks))
        all_ = summary.iloc[0]
        row.update(drop_top=float(all_["drop_top"]), drop_random=float(all_["drop_random"]))
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("exp_dir", help="the demo experiment (runs/leukemia): its config.yaml and data")
    ap.add_argument("--out", default="runs/smear_evidence_size", help="where the reduced sweeps go")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--seeds", default="0", help="cv / search seeds (0: the experiment's)")
    ap.add_argument("--demo", type=int, default=0, metavar="SIZE",
                    help="also the experiment's full sweep with head s added at input SIZE px (0: not run); "
                         "its selected configuration's row")
    args = ap.parse_args()
    base_dir = resolve_experiment_dir(args.exp_dir)
    base = yaml.safe_load((base_dir / "config.yaml").read_text())
    out = Path(args.out).resolve()
    rows, walls = [], {}
    for seed in (int(v) for v in args.seeds.split(",")):
        for size in (int(v) for v in args.sizes.split(",")):
            tag = f"in{size}" + (f"_seed{seed}" if seed else "")
            exp_dir, walls[f"reduced, seed {seed}, input {size} px"] = sweep(
                reduced_config(base, size, out, seed), tag, out)
            rows += measure(exp_dir)
    if args.demo:
        exp_dir, walls[f"demo grid + head s, input {args.demo} px"] = sweep(
            demo_config(base, args.demo, out), f"demo{args.demo}", out)
        rows += measure(exp_dir, selected=True)
    df = pd.DataFrame(rows)
    classes = sorted(c[4:] for c in df.columns if c.startswith("hit ") and c not in ("hit all abnormal", "hit shuffled"))
    print(f"{base_dir}: reduced sweeps (Lite1 frozen, heads d and s, 1 sample, lr ~1e-3, batch 16, 5 folds)")
    for name, w in walls.items():
        print(f"  {name}: sweep wall time {'reused' if np.isnan(w) else f'{w:.0f} s'}")
    head = (f"{'sweep':15s} {'backbone':18s} {'seed':>4s} {'input':>5s} {'head':4s} {'evidence':9s} {'grid':>5s} {'all':>6s} "
            + " ".join(f"{c:>6s}" for c in classes)
            + f" {'shuffled':>8s} {'drop top':>8s} {'rand':>6s} {'test acc':>8s} {'train s':>7s}")
    print(head)
    for _, r in df.iterrows():
        grid = r["input"] // 16
        print(f"{r['sweep']:15s} {r['backbone']:18s} {r['seed']:4d} {r['input']:5d} {r['head']:4s} {r['method']:9s} {f'{grid}x{grid}':>5s} {r['hit all abnormal']:6.3f} "
              + " ".join(f"{r['hit ' + c]:6.3f}" for c in classes)
              + f" {r['hit shuffled']:8.3f} {r['drop_top']:8.3f} {r['drop_random']:6.3f} {r['test_accuracy']:8.3f} {r['train_s']:7.0f}")
    counts = ", ".join(f"{c} {int(df['n ' + c].iloc[0])}" for c in classes)
    print(f"n abnormal test images: {int(df['n all abnormal'].iloc[0])} ({counts}); "
          "target: peak on a white cell >= 0.90")
    df.to_csv(out / "summary.csv", index=False)


if __name__ == "__main__":
    main()
