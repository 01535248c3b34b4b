"""Is the synthetic label a trivial colour cue? Colour histogram vs frozen CNN features.

On the default synthetic sets (``raycyto.synth.DEFAULTS``), measures the balanced accuracy
of logistic regression under grouped stratified 5-fold CV (patients never straddle folds)
on (a) an 8x8x8 RGB colour histogram and (b) frozen ImageNet EfficientNet-Lite0 pooled
features, side by side in one run. A histogram far below the CNN means the label lives in
morphology, not in colour.

Example:
    .venv/bin/python benchmarks/synth_baseline.py            # default sets (60 x 2 each)
    .venv/bin/python benchmarks/synth_baseline.py --patients 20 --tasks leukemia
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np


def load_images(out: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read a synthetic set. Returns (images uint8 [N, S, S, 3] RGB, labels [N], groups [N])."""
    import cv2

    with (out / "manifest.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    images = np.stack([cv2.imread(str(out / r["path"]), cv2.IMREAD_COLOR)[:, :, ::-1]
                       for r in rows])
    return images, np.array([r["label"] for r in rows]), np.array([r["group"] for r in rows])


def colour_histogram(images: np.ndarray, bins: int = 8) -> np.ndarray:
    """Normalised joint RGB histogram. [N, S, S, 3] uint8 -> [N, bins**3]."""
    q = (images // (256 // bins)).astype(np.int64)  # [N, S, S, 3]
    codes = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]  # [N, S, S]
    hist = np.stack([np.bincount(c.ravel(), minlength=bins ** 3) for c in codes])
    return hist / hist.sum(axis=1, keepdims=True)


def cnn_features(images: np.ndarray, backbone: str = "efficientnet_lite0",
                 batch: int = 16, size: int | None = None) -> np.ndarray:
    """Frozen ImageNet backbone pooled features at input side ``size`` (default: the spec's).
    [N, S, S, 3] uint8 -> [N, D]."""
    import torch

    from raycyto.models.registry import build_backbone, get_spec, preprocess

    spec = get_spec(backbone)
    model = build_backbone(backbone, pretrained=True).eval()
    feats = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = preprocess(images[i:i + batch], spec, size=size)  # [B, 3, S, S]
            feats.append(model(x).numpy())  # [B, D]
    return np.concatenate(feats)


def grouped_cv_balanced_accuracy(x: np.ndarray, y: np.ndarray, groups: np.ndarray,
                                 folds: int, seed: int) -> tuple[float, float]:
    """Mean and std over folds of balanced accuracy (StratifiedGroupKFold + scaled LR)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    scores = []
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, test in cv.split(x, y, groups):
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.1))
        clf.fit(x[train], y[train])
        scores.append(balanced_accuracy_score(y[test], clf.predict(x[test])))
    return float(np.mean(scores)), float(np.std(scores))


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    from raycyto.synth import DEFAULTS, generate

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=list(DEFAULTS), choices=list(DEFAULTS))
    ap.add_argument("--patients", type=int, default=None, help="shrink the default sets")
    ap.add_argument("--per-patient", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--cnn-size", type=int, default=None,
                    help="CNN input side (default: the backbone's, 224)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--data", type=Path, default=None, help="where to write the sets (tmp)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    console = Console(width=130)
    table = Table(title=f"balanced accuracy, grouped stratified {args.folds}-fold CV "
                        "(mean ± std over folds)")
    for col in ("task", "images / patients", "chance", "colour histogram 8x8x8",
                "EfficientNet-Lite0 frozen", "CNN − histogram"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or Path(tmp)
        for task in args.tasks:
            d = dict(DEFAULTS[task])
            patients = args.patients or d.pop("patients")
            per_patient = args.per_patient or d.pop("per_patient")
            d.pop("patients", None), d.pop("per_patient", None)
            t0 = time.time()
            generate(task, root / task, patients=patients, per_patient=per_patient,
                     seed=args.seed, progress=True, **d)
            t_gen = time.time() - t0
            images, y, groups = load_images(root / task)
            hist = grouped_cv_balanced_accuracy(colour_histogram(images), y, groups,
                                                args.folds, args.seed)
            t0 = time.time()
            feats = cnn_features(images, size=args.cnn_size)
            t_cnn = time.time() - t0
            cnn = grouped_cv_balanced_accuracy(feats, y, groups, args.folds, args.seed)
            console.print(f"{task}: generated {len(y)} images in {t_gen:.1f}s "
                          f"({d.get('size')} px), CNN features in {t_cnn:.1f}s "
                          f"(input {args.cnn_size or 'default'} px)")
            table.add_row(task, f"{len(y)} / {len(set(groups))}", f"{1 / len(set(y)):.3f}",
                          f"{hist[0]:.3f} ± {hist[1]:.3f}", f"{cnn[0]:.3f} ± {cnn[1]:.3f}",
                          f"{cnn[0] - hist[0]:+.3f}")
    console.print(table)


if __name__ == "__main__":
    main()
