"""Out-of-distribution guard: mildly shifted images of the model's own task vs images it cannot read.

A shifted karyogram is not an out-of-distribution one (issue 19): the per-image guard should
refer another task's images, photographs and noise, and let through what a second lab's
scanner gives (JPEG re-save, blur, contrast, a small rotation or rescale), which the model
still reads; a scanner change is the drift monitor's business. ``raycyto export`` therefore
thresholds the guard on the exported fold's test images *and* their shifted copies
(:func:`raycyto.referral.ood.calibrate_on_images`). This script measures that, with the
bundle's own preprocessing, backbone and guard (the code Serve runs):

- in distribution: the exported fold's *test* images, split into two halves by patient group;
  the guard is recalibrated with the bundle's recorded recipe on one half and measured on the
  other, then the other way round (so no measured image calibrated the threshold it meets);
  each measured image is shown unshifted, as a copy of the training augmentation policy and
  as one fresh copy per family of :data:`raycyto.data.shift.SHIFTS` (seeds the calibration
  never used). ``flagged``: share referred as out of distribution; ``accuracy``: the head's
  deterministic prediction (dropout off) on those copies;
- out of distribution: the other task's images (blood smears to the karyogram model and the
  reverse), photographs (scikit-learn's two samples and their crops) and noise (1/f, uniform,
  Gaussian, constant images): AUROC of the guard's score against the unshifted measured
  images and against all in-distribution copies (target >= 0.95), the share referred, and the
  lowest of their scores over the (higher) threshold: the margin.

Each row also gives the ``originals only`` threshold (the recipe before issue 19: conformal
on the unshifted calibration half alone) for comparison.

Without a blood-smear main-job folder (or with ``--smear-proxy``) the reverse direction uses a
*proxy* blood-smear guard: frozen EfficientNet-Lite0, pooled features at 128 px
(demo_leukemia.yaml's input), fitted as the sweep now fits it (class-conditional Mahalanobis on
L2-normalised features, PCA 128 + residual) on half the patients of a synthetic blood-smear set
plus one leukemia-policy copy each (that config trains on 2 copies), calibrated by the export's
recipe on the other half. A frozen backbone's guard does not depend on the head, so this is the
guard such a sweep would export. A bundle exported from a sweep older than issue 19 carries an
unnormalised guard; the table measures whatever guard the bundle carries.

``--variants`` refits the karyogram guard from the exported fold's training images (paths in
``histories/<trial>/fold<k>_data.json``) under alternative distances (unnormalised as before
issue 19, L2-normalised, fewer PCA dimensions, no residual, fitted on shifted copies too) and
calibrations (originals only; + scanner copies, the export's; + single shift families; + the
augmentation policy's copies) and prints them side by side: flagged shares of the measured
half, the lowest AUROC over other-task images, photographs and noise, the least share of them
referred, and the margin (closest of them / threshold).

Usage::

    .venv/bin/python benchmarks/ood_guard.py                          # runs/demo (+ runs/leukemia)
    .venv/bin/python benchmarks/ood_guard.py KARYO_RUN [SMEAR_RUN] [--variants] [--smear-proxy]
        [--max-images 80]     # fewer test (and, for --variants, training) images: a quick look
    # KARYO_RUN / SMEAR_RUN: a main-job folder (model/ + data/), or a bundle folder
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
MEASURE_SEED = 1000  # shifted copies measured; calibration copies use the guard's own seed (0)
TARGET_FLAGGED, TARGET_AUROC = 0.10, 0.95


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
    """Name -> uint8 RGB image: the two scikit-learn sample photographs and 3 crops of each."""
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
    return out


def noise_images(seed: int = 0, size: int = 416) -> list[np.ndarray]:
    """1/f random images (1600x1200), uniform and Gaussian noise, constant images."""
    rng = np.random.default_rng(seed)
    out = [natural_noise(rng) for _ in range(3)]
    out += [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(3)]
    out += [np.clip(rng.normal(200, 30, (size, size, 3)), 0, 255).astype(np.uint8) for _ in range(3)]
    out += [np.full((size, size, 3), v, np.uint8) for v in (0, 128, 255)]
    return out


def read_rgb(path: Path) -> np.ndarray:
    from raycyto.serve.validation import decode_upload

    return decode_upload(Path(path).read_bytes())


def embed(model: Any, meta: dict, images: list[np.ndarray], batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(pooled backbone features [N, D] as the guard sees them, head's predicted class [N])."""
    import torch

    from raycyto.models.preprocessing import Preprocess
    from raycyto.serve.predict import pooled_features

    pre = Preprocess.from_bundle(meta, model.spec)
    feats, preds = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            f = model.features(pre(images[i:i + batch]))
            feats.append(pooled_features(f.cpu().numpy()))
            preds.append(model.classify_features(f).argmax(1).cpu().numpy())
    return np.concatenate(feats), np.concatenate(preds)


@dataclass
class Subject:
    """One model under test: its guard, test images (labels, groups) and what it must refer."""

    name: str
    model: Any
    meta: dict
    guard: Any
    images: list[np.ndarray]
    labels: np.ndarray
    groups: np.ndarray
    policy: str | None
    recipe: dict                                   # calibration: shifts, policy, policy_copies, seed
    others: dict[str, list[np.ndarray]] = field(default_factory=dict)
    train_paths: list[Path] = field(default_factory=list)     # exported fold's training images
    train_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    cache: dict = field(default_factory=dict)       # features evaluate() computed (reused by variants)
    trained_head: bool = True                       # False: the proxy's untrained head (no accuracy)


def recipe_of(guard: Any, policy: str | None, trained_on_copies: bool) -> dict:
    """How the bundle's guard was calibrated (its meta), else the export's current recipe."""
    from raycyto.referral.ood import GUARD_POLICY_COPIES, GUARD_SEED, GUARD_SHIFTS

    cal = guard.extra.get("calibration") or {}
    if "shifts" in cal:
        return {"shifts": tuple(cal["shifts"]), "policy": cal.get("policy"),
                "policy_copies": int(cal.get("policy_copies") or 0), "seed": int(cal.get("seed", 0))}
    return {"shifts": GUARD_SHIFTS, "policy": policy if trained_on_copies else None,
            "policy_copies": GUARD_POLICY_COPIES if trained_on_copies else 0, "seed": GUARD_SEED}


def bundle_subject(run: Path, name: str, max_images: int | None) -> Subject:
    """The exported bundle of a main-job folder and its fold's test (and training) images."""
    import yaml

    from raycyto.models.bundle import find_bundle_dir, load_bundle, load_guard

    bdir = find_bundle_dir(run)
    model, meta = load_bundle(bdir)
    guard = load_guard(bdir, meta)
    if guard is None:
        raise SystemExit(f"{bdir}: the bundle has no out-of-distribution guard (ood.npz)")
    sel = meta["selection"]
    src = Path(sel["source"])
    preds = pd.read_parquet(src / "predictions.parquet", columns=["trial_id", "fold", "split", "path", "label", "group"])
    rows = preds[(preds["trial_id"].astype(str) == str(sel["trial_id"])) & (preds["fold"] == sel["fold"])
                 & (preds["split"] == "test")].drop_duplicates("path").sort_values("path")
    if max_images and len(rows) > max_images:  # whole groups, deterministically
        groups = sorted(set(rows["group"].astype(str)))
        keep = set(np.random.default_rng(0).permutation(groups)[: max(2, len(groups) * max_images // len(rows))])
        rows = rows[rows["group"].astype(str).isin(keep)]
    data = (yaml.safe_load((src / "config.yaml").read_text()) or {}).get("data") or {}
    policy = data.get("policy") if data.get("policy") not in (None, "none") else None
    used = src / "histories" / str(sel["trial_id"]) / f"fold{sel['fold']}_data.json"
    train_paths = json.loads(used.read_text())["train"] if used.is_file() else []
    if max_images and len(train_paths) > 3 * max_images:
        train_paths = sorted(np.random.default_rng(0).permutation(train_paths)[: 3 * max_images].tolist())
    names = list(meta["class_names"])
    return Subject(name=name, model=model, meta=meta, guard=guard,
                   images=[read_rgb(Path(p)) for p in rows["path"]], labels=rows["label"].to_numpy(int),
                   groups=rows["group"].astype(str).to_numpy(), policy=policy,
                   recipe=recipe_of(guard, policy, policy is not None and int(data.get("copies") or 1) > 1),
                   train_paths=[Path(p) for p in train_paths],
                   train_labels=np.array([names.index(Path(p).parent.name) if Path(p).parent.name in names else -1
                                          for p in train_paths]))


def proxy_smear_subject(tmp: Path, patients: int = 60) -> Subject:
    """A frozen Lite0 blood-smear guard fitted on synthetic smears (see the module docstring)."""
    from raycyto.data.augment import augment, image_key
    from raycyto.models.classifier import build_classifier
    from raycyto.models.preprocessing import Preprocess
    from raycyto.referral.ood import GUARD_POLICY_COPIES, GUARD_SEED, GUARD_SHIFTS, fit_mahalanobis
    from raycyto.synth import generate

    out = tmp / "smears"
    generate("leukemia", out, patients, 2, seed=1, size=224, progress=False)
    man = pd.read_csv(out / "manifest.csv")
    classes = sorted(man["label"].unique())
    model = build_classifier("efficientnet_lite0", "a", len(classes), pretrained=True).eval()
    meta = {"preprocess": Preprocess.build(model.spec, 224, 128).to_dict(), "class_names": classes}
    groups = man["group"].astype(str).to_numpy()
    ug = np.random.default_rng(0).permutation(sorted(set(groups)))
    is_train = np.isin(groups, ug[: len(ug) // 2])
    imgs = [read_rgb(out / p) for p in man["path"]]
    y = np.array([classes.index(v) for v in man["label"]])
    tr = [i for i in np.flatnonzero(is_train)]
    rows = [imgs[i] for i in tr] + [augment(imgs[i], "leukemia", 0, image_key(imgs[i]), 1 + int(i) % 32) for i in tr]
    feats, _ = embed(model, meta, rows)
    guard = fit_mahalanobis(feats, np.r_[y[tr], y[tr]], normalize=True)  # as the sweep fits it
    te = np.flatnonzero(~is_train)
    return Subject(name="blood smear (proxy)", model=model, meta=meta, guard=guard,
                   images=[imgs[i] for i in te], labels=y[te], groups=groups[te], policy="leukemia",
                   recipe={"shifts": GUARD_SHIFTS, "policy": "leukemia", "policy_copies": GUARD_POLICY_COPIES,
                           "seed": GUARD_SEED}, trained_head=False)


def measured_copies(images: list[np.ndarray], policy: str | None) -> tuple[list[np.ndarray], list[str]]:
    """Per image: the original, a policy copy (if any) and one fresh copy per shift family."""
    from raycyto.data.augment import augment, image_key
    from raycyto.data.shift import SHIFTS, shifted_copy

    names = ["unshifted"] + ([f"policy {policy}"] if policy else []) + list(SHIFTS)
    out = []
    for img in images:
        key = image_key(img)
        out.append(img)
        if policy:
            out.append(augment(img, policy, MEASURE_SEED, key, 1 + int(key[:4], 16) % 32))
        out += [shifted_copy(img, s, MEASURE_SEED, key=key) for s in SHIFTS]
    return out, names


def halves(groups: np.ndarray, seed: int = 0) -> list[np.ndarray]:
    """Two boolean masks splitting the images by group (each half calibrates the other)."""
    ug = np.random.default_rng(seed).permutation(sorted(set(groups)))
    a = np.isin(groups, ug[: len(ug) // 2])
    return [a, ~a]


def cross_calibrated(guard: Any, cal_scores: np.ndarray, cal_names: list[str], mask_sets: list[np.ndarray],
                     rate: float, originals_only: bool = False) -> list[float]:
    """The threshold each half gets from the other half's calibration scores."""
    from raycyto.referral.ood import set_threshold

    out = []
    for cal in mask_sets:
        cols = [0] if originals_only else list(range(len(cal_names)))
        g = set_threshold(copy.deepcopy(guard), cal_scores[cal][:, cols], [cal_names[c] for c in cols], rate)
        out.append(g.threshold)
    return out


def evaluate(sub: Subject, rate: float, photos: list[np.ndarray], noise: list[np.ndarray]) -> pd.DataFrame:
    """The table rows of one model (see the module docstring); keeps the features in ``sub.cache``."""
    from raycyto.referral.ood import calibration_copies, ood_auroc

    r = sub.recipe
    cal_imgs, cal_names = calibration_copies(sub.images, tuple(r["shifts"]), r["policy"], r["policy_copies"], r["seed"])
    n = len(sub.images)
    fcal = embed(sub.model, sub.meta, cal_imgs)[0].reshape(n, len(cal_names), -1)
    del cal_imgs
    mea_imgs, mea_names = measured_copies(sub.images, sub.policy)
    f, pred = embed(sub.model, sub.meta, mea_imgs)
    del mea_imgs
    fmea = f.reshape(n, len(mea_names), -1)
    fout = {k: embed(sub.model, sub.meta, v)[0] for k, v in {**sub.others, "photographs": photos, "noise": noise}.items()}
    sub.cache = {"cal": (fcal, cal_names), "mea": (fmea, mea_names), "out": fout}
    d = fcal.shape[-1]
    cal_scores = sub.guard.score(fcal.reshape(-1, d)).reshape(n, len(cal_names))
    s = sub.guard.score(fmea.reshape(-1, d)).reshape(n, len(mea_names))
    correct = (pred.reshape(n, len(mea_names)) == sub.labels[:, None])
    masks = halves(sub.groups)
    new = cross_calibrated(sub.guard, cal_scores, cal_names, masks, rate)
    old = cross_calibrated(sub.guard, cal_scores, cal_names, masks, rate, originals_only=True)
    # mask h calibrates threshold h; the images of the other half meet it
    t_new = np.where(masks[0], new[1], new[0])
    t_old = np.where(masks[0], old[1], old[0])
    rows = []
    for j, name in enumerate(mea_names):
        rows.append({"model": sub.name, "set": name, "n": n, "flagged": float(np.mean(s[:, j] > t_new)),
                     "flagged, originals only": float(np.mean(s[:, j] > t_old)),
                     "accuracy": float(np.mean(correct[:, j])) if sub.trained_head else np.nan,
                     "AUROC": np.nan, "AUROC vs shifted": np.nan, "closest / threshold": np.nan})
    in_all = s.ravel()
    for name, fo in fout.items():
        so = sub.guard.score(fo)
        rows.append({"model": sub.name, "set": name, "n": len(fo),
                     "flagged": float(np.mean([np.mean(so > t) for t in new])),
                     "flagged, originals only": float(np.mean([np.mean(so > t) for t in old])),
                     "accuracy": np.nan, "AUROC": ood_auroc(s[:, 0], so), "AUROC vs shifted": ood_auroc(in_all, so),
                     "closest / threshold": float(so.min()) / max(new)})
    return pd.DataFrame(rows)


def variants(sub: Subject, rate: float) -> pd.DataFrame:
    """Alternative distances x calibrations, refitted on the exported fold's training images.

    Reuses :func:`evaluate`'s features of the test images; embeds the training images (and one
    scanner copy of each, for the fit on shifted copies). Calibration columns come from one
    half of the test images (the recipe's copies, or the measured copies of that half), the
    measured copies of the other half are measured, and the other way round."""
    from raycyto.data.shift import MILD
    from raycyto.referral.ood import calibration_copies, fit_mahalanobis, ood_auroc, set_threshold

    if not sub.train_paths or (sub.train_labels < 0).any():
        raise SystemExit(f"{sub.name}: no usable training paths recorded for the exported fold (--variants)")
    train_imgs = [read_rgb(p) for p in sub.train_paths]
    tr_copies, tr_names = calibration_copies(train_imgs, ("scanner",), None, 0, 11)
    del train_imgs
    ftr = embed(sub.model, sub.meta, tr_copies)[0].reshape(len(sub.train_paths), len(tr_names), -1)
    del tr_copies
    (fcal, cal_names), (fmea, mea_names), fout = sub.cache["cal"], sub.cache["mea"], sub.cache["out"]
    n, d, y = fcal.shape[0], fcal.shape[-1], sub.train_labels
    fall = np.concatenate([fcal, fmea], axis=1)                        # [n, m_cal + m_mea, D]
    names = [f"cal {c}" for c in cal_names] + list(mea_names)
    x0 = ftr[:, 0]
    fits = {"unnormalised, PCA 128 + residual (sweep before)": fit_mahalanobis(x0, y),
            "L2, PCA 128 + residual (sweep now)": fit_mahalanobis(x0, y, normalize=True),
            "L2, PCA 32 + residual": fit_mahalanobis(x0, y, pca_dim=32, normalize=True),
            "PCA 32, no residual": fit_mahalanobis(x0, y, pca_dim=32, residual=False),
            "PCA 16, no residual": fit_mahalanobis(x0, y, pca_dim=16, residual=False),
            "PCA 8, no residual": fit_mahalanobis(x0, y, pca_dim=8, residual=False),
            "L2, fitted on + scanner copies": fit_mahalanobis(ftr.reshape(-1, d), np.repeat(y, ftr.shape[1]),
                                                              normalize=True)}
    scan = [c for c in names if c.startswith("cal scanner")]
    singles = ["jpeg", "blur", "contrast", "rotate", "rescale", "colour"]
    cals = {"originals only": ["cal original"], "+ scanner x2 (export)": ["cal original"] + scan,
            "+ single families": ["cal original"] + singles}
    pol = [c for c in mea_names if c.startswith("policy")]
    if pol:
        cals["+ policy copy"] = ["cal original"] + pol
        cals["+ policy copy + scanner x2"] = ["cal original"] + pol + scan
    mild = [names.index(m) for m in MILD]
    masks = halves(sub.groups)
    rows = []
    for fname, g in fits.items():
        s = g.score(fall.reshape(-1, d)).reshape(n, len(names))
        sout = {k: g.score(v) for k, v in fout.items()}
        for cname, cols in cals.items():
            ci = [names.index(c) for c in cols]
            th = [set_threshold(copy.deepcopy(g), s[m][:, ci], cols, rate).threshold for m in masks]
            t = np.where(masks[0], th[1], th[0])
            flags = {c: float(np.mean(s[:, names.index(c)] > t)) for c in mea_names}
            worst = max(MILD, key=lambda c: flags[c])
            row = {"distance": fname, "calibration": cname, "unshifted": flags["unshifted"],
                   "mild, mean": float(np.mean([flags[c] for c in MILD])), "mild, worst": flags[worst],
                   "worst family": worst}
            if pol:
                row["policy copy"] = flags[pol[0]]
            row["min AUROC"] = min(ood_auroc(s[:, names.index("unshifted")], v) for v in sout.values())
            row["min AUROC vs shifted"] = min(ood_auroc(s[:, [names.index("unshifted")] + mild].ravel(), v)
                                              for v in sout.values())
            row["others referred"] = min(float(np.mean([np.mean(v > x) for x in th])) for v in sout.values())
            row["margin"] = min(float(v.min()) for v in sout.values()) / max(th)
            rows.append(row)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    from raycyto.models.bundle import find_bundle_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("karyogram", nargs="?", default=str(ROOT / "runs" / "demo"),
                    help="karyogram main-job folder (data/ and model/) [runs/demo]")
    ap.add_argument("smear", nargs="?", default=str(ROOT / "runs" / "leukemia"),
                    help="blood-smear main-job folder [runs/leukemia]; missing: a proxy guard (docstring)")
    ap.add_argument("--rate", type=float, default=None, help="false-alarm rate [the bundle's, else 0.05]")
    ap.add_argument("--max-images", type=int, default=None, help="test images per model (whole groups) [all]")
    ap.add_argument("--variants", action="store_true", help="also refit the karyogram guard under alternatives")
    ap.add_argument("--smear-proxy", action="store_true", help="the proxy blood-smear guard even if SMEAR_RUN has a bundle")
    args = ap.parse_args(argv)
    karyo = Path(args.karyogram)
    if not (find_bundle_dir(karyo) / "model.json").is_file():
        print(f"{karyo}: needs model/ (run `raycyto run` first, or `raycyto export`)", file=sys.stderr)
        return 2
    smear = Path(args.smear)
    has_smear = ((find_bundle_dir(smear) / "model.json").is_file() and (smear / "data").is_dir()
                 and not args.smear_proxy)
    photos, noise = list(photographs().values()), noise_images()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        k = bundle_subject(karyo, "karyogram", args.max_images)
        rate = float(args.rate or ((k.meta.get("config") or {}).get("mc") or {}).get("ood_false_alarm") or 0.05)
        if has_smear:
            s = bundle_subject(smear, "blood smear", args.max_images)
            smear_imgs = [read_rgb(p) for p in sorted((smear / "data").rglob("*.png"))]
        else:
            s = proxy_smear_subject(tmp)
            smear_imgs = s.images
        kdata = karyo / "data"
        karyo_paths = sorted(kdata.rglob("*.png")) if kdata.is_dir() else []
        pick = np.random.default_rng(0).permutation(len(karyo_paths))[:120]
        k.others = {"blood smears": smear_imgs}
        s.others = {"karyograms": [read_rgb(karyo_paths[i]) for i in sorted(pick)] or k.images}
        tables = [evaluate(k, rate, photos, noise), evaluate(s, rate, photos, noise)]
        table = pd.concat(tables, ignore_index=True)
        print(f"flagged at false-alarm rate {rate:g}: thresholds cross-calibrated on patient-group halves of "
              f"each model's test images (karyogram recipe {k.recipe}; blood smear {s.recipe})")
        with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.3f}".format):
            print(table.to_string(index=False))
            if args.variants:
                print("\nalternatives, karyogram model (refitted on the exported fold's training images):")
                print(variants(k, rate).to_string(index=False))
    from raycyto.data.shift import MILD

    mild = table[table["set"].isin(MILD)]
    worst_flag = float(mild["flagged"].max())
    worst_auc = float(table["AUROC"].min())
    referred = float(table.loc[table["AUROC"].notna(), "flagged"].min())
    ok = worst_flag <= TARGET_FLAGGED and worst_auc >= TARGET_AUROC
    print(f"mildly shifted images flagged: at most {worst_flag:.3f} per family (target <= {TARGET_FLAGGED}); "
          f"lowest AUROC {worst_auc:.3f} (target >= {TARGET_AUROC}); other images referred: at least "
          f"{referred:.3f}: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
