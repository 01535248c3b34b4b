"""Do the trained heads beat the linear probe on a real image set? Side by side, one sweep.

The real set that ships offline: scikit-learn's handwritten digits (1,797 scans, 10 classes,
8 x 8 pixels), written as 64 px PNGs, each its own group. The sweep is the blood-smear demo
config with the review's overrides: EfficientNet-Lite0 frozen at input 128, heads a and d,
2 optuna samples per head, 5 grouped folds. The probe (logistic regression on the standardised
cached features, C chosen on validation) runs on the same folds in the same sweep.

Prints the test accuracy (fold mean ± std) of the configuration the selection rule exports,
of each trained head and of the probe, and the ratio exported / probe.

Usage: python benchmarks/probe_vs_heads.py [--out /tmp/probe_vs_heads] [--set train.epochs=8 ...]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_digits(root: Path, size: int = 64) -> Path:
    """sklearn's digits as ``root/<digit>/<i>.png`` (dark strokes on white, RGB)."""
    import cv2
    import numpy as np
    from sklearn.datasets import load_digits

    if (root / "0").is_dir():
        return root
    d = load_digits()
    for i, (im, y) in enumerate(zip(d.images, d.target)):
        (root / str(y)).mkdir(parents=True, exist_ok=True)
        gray = (255 - np.clip(im / 16.0, 0, 1) * 255).astype(np.uint8)
        big = cv2.resize(gray, (size, size), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(root / str(y) / f"{i:04d}.png"), cv2.cvtColor(big, cv2.COLOR_GRAY2BGR))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/raycyto-probe-vs-heads"))
    parser.add_argument("--set", action="append", default=[], help="extra config overrides")
    args = parser.parse_args()

    import ray

    from raycyto.analysis.load import load_experiment
    from raycyto.analysis.tables import summary_table
    from raycyto.tune.sweep import configure, run_sweep

    data = write_digits(args.out / "digits")
    overrides = ["data.classes=null", "data.positive_class=null", "data.image_size=64", "data.input_size=128",
                 "data.policy=none", "data.copies=1", "grid.backbones=[efficientnet_lite0]", "grid.heads=[a, d]",
                 "search.samples=2", *args.set]
    cfg = configure(REPO / "jobs" / "configs" / "demo_leukemia.yaml", data=str(data), sets=tuple(overrides))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    t0 = time.time()
    exp_dir = run_sweep(cfg, out=args.out / f"exp-{time.strftime('%H%M%S')}", progress=False)
    wall = time.time() - t0
    s = summary_table(load_experiment(exp_dir)).set_index("config")
    print(f"digits (1797 images, 10 classes), Lite0 @128, heads a/d x 2 samples, 5 folds; sweep {wall:.0f} s")
    print(f"{'configuration':<36}{'test accuracy':>22}")
    for name, r in s.iterrows():
        tag = " (exported)" if r["best"] else (" (baseline)" if r["baseline"] else "")
        print(f"{name + tag:<36}{r['accuracy_mean']:>14.4f} ± {r['accuracy_std']:.4f}")
    best, probe = s[s["best"]].iloc[0], s[s["baseline"]].iloc[0]
    print(f"exported / probe test accuracy: {best['accuracy_mean'] / probe['accuracy_mean']:.3f}x "
          f"({best['accuracy_mean']:.4f} vs {probe['accuracy_mean']:.4f})")


if __name__ == "__main__":
    main()
