"""Out-of-distribution guard on the cross-task shifted set: AUROC per direction.

Each exported bundle carries the Mahalanobis guard its sweep fitted on the exported fold's
training features and thresholded on its validation images (``ood.npz``). This script scores,
with exactly the code Serve runs (``LoadedModel.embed_scored``):

- in distribution: the exported fold's own *test* images (never seen by the guard);
- shifted: every image of the other task (blood smears shown to the karyogram model and
  karyograms shown to the blood-smear model), and photographs: scikit-learn's two sample
  photographs, crops of them at several scales, and large smooth random images with a
  natural 1/f spectrum (1600x1200, like the cat photograph of issue 12).

It prints, per direction, the AUROC of the guard's score (target >= 0.95), and at the stored
threshold the share of in-distribution images flagged (false alarms; the sweep asked for
``mc.ood_false_alarm``) and of shifted images flagged (detections, i.e. referred).

Usage (after ``raycyto run`` and ``raycyto run --task leukemia``)::

    .venv/bin/python benchmarks/ood_guard.py                      # runs/demo and runs/leukemia
    .venv/bin/python benchmarks/ood_guard.py KARYO_RUN SMEAR_RUN  # other main-job folders
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def natural_noise(rng: np.random.Generator, height: int = 1200, width: int = 1600) -> np.ndarray:
    """A random RGB image with a 1/f amplitude spectrum (the statistics of natural photographs)."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    amp = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / max(height, width))
    chans = []
    for _ in range(3):
        phase = rng.uniform(0, 2 * np.pi, amp.shape)
        chans.append(np.fft.irfft2(amp * np.exp(1j * phase), s=(height, width)))
    img = np.stack(chans, -1)
    img = (img - img.min()) / np.ptp(img)
    return (img * 255).astype(np.uint8)


def photographs(seed: int = 0) -> dict[str, np.ndarray]:
    """Name -> uint8 RGB image: sample photographs, their crops, 1/f random images."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for i, img in enumerate(load_sample_images().images):
        out[f"sample{i}"] = img
        h, w = img.shape[:2]
        for j, frac in enumerate((0.5, 0.3, 0.15)):
            ch, cw = int(h * frac), int(w * frac)
            y, x = rng.integers(0, h - ch), rng.integers(0, w - cw)
            out[f"sample{i}_crop{j}"] = np.ascontiguousarray(img[y:y + ch, x:x + cw])
    for k in range(4):
        out[f"noise{k}"] = natural_noise(rng)
    return out


def read_rgb(path: Path) -> np.ndarray:
    from raycyto.serve.validation import decode_upload

    return decode_upload(path.read_bytes())


def test_images(bundle: Path) -> list[Path]:
    """The exported fold's test images (from the sweep's predictions.parquet)."""
    doc = json.loads((bundle / "model.json").read_text())
    sel = doc["selection"]
    preds = pd.read_parquet(Path(sel["source"]) / "predictions.parquet",
                            columns=["trial_id", "fold", "split", "path"])
    rows = preds[(preds["trial_id"].astype(str) == str(sel["trial_id"])) & (preds["fold"] == sel["fold"])
                 & (preds["split"] == "test")]
    return [Path(p) for p in sorted(set(rows["path"]))]


def scores(model, images: list[np.ndarray], batch: int = 16) -> np.ndarray:
    out = []
    for i in range(0, len(images), batch):
        out += [s for _, s in model.embed_scored(images[i:i + batch])]
    return np.asarray(out, dtype=float)


def main(argv: list[str] | None = None) -> int:
    from raycyto.models.bundle import find_bundle_dir
    from raycyto.referral.ood import ood_auroc
    from raycyto.serve.predict import LoadedModel

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("karyogram", nargs="?", default=str(ROOT / "runs" / "demo"),
                    help="karyogram main-job folder (data/ and model/) [runs/demo]")
    ap.add_argument("smear", nargs="?", default=str(ROOT / "runs" / "leukemia"),
                    help="blood-smear main-job folder [runs/leukemia]")
    args = ap.parse_args(argv)
    runs = {"karyogram": Path(args.karyogram), "blood smear": Path(args.smear)}
    for name, run in runs.items():
        if not (run / "data").is_dir() or not (find_bundle_dir(run) / "model.json").is_file():
            print(f"{run}: needs data/ and model/ (run `raycyto run` first)", file=sys.stderr)
            return 2
    photos = photographs()
    photo_imgs = list(photos.values())
    rows = []
    for name, run in runs.items():
        other_name = next(n for n in runs if n != name)
        model = LoadedModel(find_bundle_dir(run))
        if model.guard is None:
            print(f"{run}: the bundle has no calibrated guard (ood.npz)", file=sys.stderr)
            return 2
        own = scores(model, [read_rgb(p) for p in test_images(find_bundle_dir(run))])
        other = scores(model, [read_rgb(p) for p in sorted((runs[other_name] / "data").rglob("*.png"))])
        photo = scores(model, photo_imgs)
        t = model.ood_threshold
        for shifted, s in ((f"{other_name} images", other), ("photographs", photo),
                           (f"{other_name} images + photographs", np.r_[other, photo])):
            rows.append({"model": name, "shifted set": shifted, "n in": len(own), "n shifted": len(s),
                         "AUROC": ood_auroc(own, s), "false alarms": float(np.mean(own > t)),
                         "referred (shifted)": float(np.mean(s > t))})
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 160, "display.float_format", "{:.3f}".format):
        print(table.to_string(index=False))
    worst = table["AUROC"].min()
    print(f"lowest AUROC {worst:.3f} (target >= 0.95): {'met' if worst >= 0.95 else 'NOT met'}")
    return 0 if worst >= 0.95 else 1


if __name__ == "__main__":
    sys.exit(main())
