"""Benchmark: feature cache vs re-running the frozen backbone in every trial.

Same grid both ways: one backbone x 5 folds x 3 heads x 4 search samples (12 trials, 60
fold fits) on a small synthetic karyogram set. "cache" computes the backbone features once
per (image, copy) with a Ray Data actor pool and hands them to every trial; "no cache"
runs the backbone over each fold's images inside every trial, as a sweep without the cache
would. Prints the wall-clock ratio and Tune's utilisation:
sum of trial times / (Tune wall-clock x concurrent slots).

    python benchmarks/sweep_cache.py [--patients 40] [--backbone efficientnet_lite2] [--cpus 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def _config(data_dir: Path, args: argparse.Namespace) -> dict:
    return {
        "name": "bench",
        "data": {"source": str(data_dir), "positive_class": "abnormal", "image_size": args.size,
                 "input_size": args.input_size, "policy": "karyogram", "copies": args.copies},
        "cv": {"folds": 5, "seed": 0},
        "grid": {"backbones": [args.backbone], "finetune": ["frozen"], "heads": ["a", "c", "k"]},
        "search": {"algorithm": "optuna", "samples": 4, "lr": [1e-3, 1e-2], "batch_size": [16, 32]},
        "train": {"epochs": args.epochs},
        "resources": {"cpus_per_trial": 1, "max_concurrent": args.cpus, "feature_batch_size": 32},
        "mc": {"passes": 20},
    }


def _run(cfg, out: Path, cache: bool) -> dict:
    from raycyto.analysis.load import read_csv
    from raycyto.tune.sweep import run_sweep

    t0 = time.perf_counter()
    run_sweep(cfg, out=out, progress=False, cache_features=cache)
    wall = time.perf_counter() - t0
    meta = json.loads((out / "experiment.json").read_text())
    results = read_csv(out / "results.csv")
    assert (results["status"] == "TERMINATED").all(), results[["trial_id", "status", "error"]]
    return {"wall_s": wall, "tune_wall_s": meta["tune_wall_s"], "trial_s": float(results["time_s"].sum()),
            "trials": len(results), "val_accuracy": float(results["val_accuracy"].mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=40)
    parser.add_argument("--backbone", default="efficientnet_lite2")
    parser.add_argument("--size", type=int, default=260, help="decode size")
    parser.add_argument("--input-size", type=int, default=260, help="backbone input size (lite2 native)")
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=2, help="Ray CPUs = concurrent trial slots")
    args = parser.parse_args()

    import ray

    from raycyto.config import load_config
    from raycyto.synth import generate

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    root = Path(tempfile.mkdtemp(prefix="sweep_cache_"))
    generate("karyogram", root / "data", patients=args.patients, per_patient=2, seed=0, size=args.size,
             progress=False)
    cfg = load_config(_config(root / "data", args))
    runs = {"cache": _run(cfg, root / "cache", True), "no cache": _run(cfg, root / "nocache", False)}
    print(f"grid: 1 backbone ({args.backbone}) x 5 folds x 3 heads x 4 samples = {runs['cache']['trials']} trials; "
          f"{args.patients * 2} images x {args.copies} copies at {args.input_size} px; {args.cpus} slots")
    for name, r in runs.items():
        util = r["trial_s"] / (r["tune_wall_s"] * args.cpus)
        print(f"{name:>9}: wall {r['wall_s']:7.1f} s | Tune wall {r['tune_wall_s']:7.1f} s | sum of trial "
              f"times {r['trial_s']:7.1f} s | utilisation {util:.2f} | mean val_accuracy {r['val_accuracy']:.3f}")
    print(f"speed-up with the feature cache (wall-clock ratio): {runs['no cache']['wall_s'] / runs['cache']['wall_s']:.1f}x")
    print(f"Tune overhead: 1 - utilisation = {1 - runs['cache']['trial_s'] / (runs['cache']['tune_wall_s'] * args.cpus):.2f} "
          f"(cache), {1 - runs['no cache']['trial_s'] / (runs['no cache']['tune_wall_s'] * args.cpus):.2f} (no cache)")
    ray.shutdown()


if __name__ == "__main__":
    main()
