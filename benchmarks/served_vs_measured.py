"""The served model against the measured one: largest probability difference on the exported fold.

For a main-job folder (or an experiment + bundle), every test image of the exported trial and
fold goes through ``raycyto predict``'s code path (:class:`raycyto.serve.predict.LocalPredictor`:
the bundle's Preprocess contract, backbone, head, seeded MC passes), and the answer's
probabilities are compared with predictions.parquet's MC-mean probabilities of that image.

Example:
    .venv/bin/python benchmarks/served_vs_measured.py runs/demo
    .venv/bin/python benchmarks/served_vs_measured.py runs/leukemia --limit 50
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="main-job folder (runs/demo) with experiment/ and model/")
    parser.add_argument("--limit", type=int, default=0, help="at most this many test images (0 = all)")
    args = parser.parse_args()

    import numpy as np
    import pandas as pd

    from raycyto.serve.predict import LocalPredictor

    exp, model = args.run / "experiment", args.run / "model"
    meta = json.loads((model / "model.json").read_text())
    sel = meta["selection"]
    preds = pd.read_parquet(exp / "predictions.parquet")
    rows = preds[(preds["trial_id"] == sel["trial_id"]) & (preds["fold"] == sel["fold"]) & (preds["split"] == "test")]
    if args.limit:
        rows = rows.head(args.limit)
    classes = meta["class_names"]
    local = LocalPredictor(model)
    worst, t0 = 0.0, time.perf_counter()
    for _, row in rows.iterrows():
        answer = local.predict_bytes(Path(row["path"]).read_bytes())
        got = np.array([answer["probabilities"][c] for c in classes])
        want = np.array([row[f"mc_mean_{c}"] for c in classes])
        worst = max(worst, float(np.abs(got - want).max()))
    print(f"{meta['backbone']}/{meta['finetune']}/{meta['head']} trial {sel['trial_id']} fold {sel['fold']}: "
          f"{len(rows)} test images in {time.perf_counter() - t0:.1f}s")
    print(f"largest |served - measured| probability: {worst:.2e}")


if __name__ == "__main__":
    main()
