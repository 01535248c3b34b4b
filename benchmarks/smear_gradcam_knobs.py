"""Blood smears: does the Grad-CAM peak fall on a white cell? The documented knobs side by side.

On every abnormal test image of the configuration the report selects (each explained by its
fold's own checkpoint, as ``raycyto report``'s evidence.csv), the share of images whose map
peak lies inside a white cell the generator drew (:func:`raycyto.synth.leukemia.render_with_cells`),
for:

- the layer captum's ``LayerGradCam`` explains (the backbone's stride-16 feature map, the
  default, and earlier / later blocks);
- ``relu_attributions`` on / off (off: the signed map; the peak is its maximum);
- how the peak is read off the map (the report's :func:`~raycyto.evidence.evaluation.fine_peak`,
  the centroid around the strongest cell; that cell's centre; the first maximum of the map
  resized to 224 x 224 by bilinear, nearest or bicubic interpolation);
- captum's ``GuidedGradCam`` (guided backpropagation times the upsampled Grad-CAM, pixel
  resolution; the peak of its absolute value summed over colour channels, Gaussian-smoothed);
- beyond those knobs, shift-averaged Grad-CAM (the input moved by 0, 4, 8, 12 px in x and y,
  reflect-padded; each map upsampled to the input, moved back and averaged: a stride-16 map at
  4-px steps).

Also the chance level: the share of the image the white cells cover (a uniformly random point).

Usage: python benchmarks/smear_gradcam_knobs.py runs/leukemia [--limit N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml

from raycyto.analysis.load import load_experiment, resolve_experiment_dir
from raycyto.analysis.tables import resolve_rule, select_best
from raycyto.evidence.evaluation import (FoldExplainer, fine_peak, is_abnormal, on_white_cell, read_rgb,
                                         smear_truth)
from raycyto.evidence.maps import _GradForward
from raycyto.evidence.maps import peak as cell_peak

SIZE = 224  # the grid the peak is taken on (normalised coordinates, as evaluation.fine_peak)
INTERP = {"bilinear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST, "bicubic": cv2.INTER_CUBIC}


def peak(values: np.ndarray, interp: str = "bilinear") -> tuple[float, float]:
    """The first maximum of the map resized to SIZE x SIZE (what evaluation.fine_peak did: on a
    plateau, e.g. a top / left border cell under cv2's edge clamping, the plateau's first pixel)."""
    up = cv2.resize(np.asarray(values, np.float32), (SIZE, SIZE), interpolation=INTERP[interp])
    i, j = np.unravel_index(int(np.argmax(up)), up.shape)
    return (j + 0.5) / SIZE, (i + 0.5) / SIZE


# how the peak is read off a map: the report's (fine_peak), the strongest cell's centre, and the
# first maximum of the map resized to SIZE x SIZE (fine_peak before 2026-12-04: bilinear)
READERS = {"3x3 centroid (fine_peak)": fine_peak, "cell centre": cell_peak,
           **{f"first max, {k}": (lambda k: lambda m: peak(m, k))(k) for k in INTERP}}


def layer_maps(model, x: torch.Tensor, t: torch.Tensor, layer: str, relu: bool) -> np.ndarray:
    from captum.attr import LayerGradCam

    fwd = _GradForward(model)
    cam = LayerGradCam(fwd, model.backbone.get_submodule(layer))
    with torch.enable_grad():
        a = cam.attribute(x.clone().requires_grad_(True), target=t, relu_attributions=relu)
    return a.detach().double().sum(1).numpy()


def guided_maps(model, x: torch.Tensor, t: torch.Tensor, layer: str) -> np.ndarray:
    from captum.attr import GuidedGradCam

    fwd = _GradForward(model)
    g = GuidedGradCam(fwd, model.backbone.get_submodule(layer))
    with torch.enable_grad():
        a = g.attribute(x.clone().requires_grad_(True), target=t)
    m = a.detach().abs().sum(1).numpy()  # [N, S, S]
    return np.stack([cv2.GaussianBlur(v.astype(np.float32), (0, 0), v.shape[0] / 40) for v in m])


def shifted_maps(model, x: torch.Tensor, t: torch.Tensor, layer: str, step: int = 4, stride: int = 16
                 ) -> np.ndarray:
    import torch.nn.functional as F

    n, _, h, w = x.shape
    total = np.zeros((n, h, w))
    shifts = [(dx, dy) for dx in range(0, stride, step) for dy in range(0, stride, step)]
    for dx, dy in shifts:
        xs = F.pad(x, (dx, 0, dy, 0), mode="reflect")[..., :h, :w]  # content moved right / down
        maps = layer_maps(model, xs, t, layer, True)
        up = np.stack([cv2.resize(m.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR) for m in maps])
        back = np.zeros_like(up)
        back[:, :h - dy, :w - dx] = up[:, dy:, dx:]
        total += back / np.maximum(back.reshape(n, -1).max(1), 1e-12)[:, None, None]
    return total / len(shifts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("exp_dir")
    ap.add_argument("--limit", type=int, default=0, help="images per fold (0: all)")
    ap.add_argument("--layers", default="blocks.2,blocks.3,blocks.4,blocks.5")
    args = ap.parse_args()
    torch.manual_seed(0)
    exp_dir = resolve_experiment_dir(args.exp_dir)
    exp = load_experiment(exp_dir)
    trial = str(select_best(exp, resolve_rule(exp, None))["trial_id"])
    cfg = yaml.safe_load(exp.config_text) or {}
    data_dir = Path(cfg["data"]["source"])
    cells_of = smear_truth(data_dir)
    assert cells_of is not None, f"{data_dir} is not a raycyto.synth blood-smear folder"
    p = exp.predictions
    test = p[(p["trial_id"] == trial) & (p["split"] == "test")]
    test = test[[is_abnormal(exp.class_names[int(v)]) for v in test["label"]]]
    layers = args.layers.split(",")
    hits: dict[str, list[bool]] = {}
    cover: list[float] = []
    t0 = time.time()
    for fold, g in test.groupby("fold"):
        fx = FoldExplainer(Path(exp.exp_dir) / "checkpoints" / trial / f"fold{int(fold)}", None)
        model = fx.model.eval()
        default = model.spec.feature_map.layer
        if args.limit:
            g = g.head(args.limit)
        for i in range(0, len(g), 16):
            part = g.iloc[i:i + 16]
            images = [read_rgb(q) for q in part["path"]]
            cells = [cells_of(str(Path(q).relative_to(data_dir))) for q in part["path"]]
            x = fx.pre(images)
            t = torch.as_tensor(part["mc_label"].to_numpy(np.int64))
            variants: dict[str, list[tuple[float, float]]] = {}
            for layer in layers:
                for relu in (True, False):
                    maps = layer_maps(model, x, t, layer, relu)
                    tag = f"LayerGradCam {layer}{' (default)' if layer == default else ''}, relu={relu}"
                    readers = READERS if layer == default and relu else {"3x3 centroid (fine_peak)": fine_peak}
                    for rname, read in readers.items():
                        variants[f"{tag}, {rname}"] = [read(m) for m in maps]
            variants[f"GuidedGradCam {default}"] = [fine_peak(m) for m in guided_maps(model, x, t, default)]
            variants[f"shift-averaged LayerGradCam {default} (16 shifts)"] = [
                fine_peak(m) for m in shifted_maps(model, x, t, default)]
            for name, peaks in variants.items():
                hits.setdefault(name, []).extend(on_white_cell(pk, c) for pk, c in zip(peaks, cells))
            for c in cells:  # chance: the covered share of a 224 x 224 grid
                yy, xx = (np.mgrid[0:SIZE, 0:SIZE] + 0.5) / SIZE
                cover.append(float(np.any([np.hypot(xx - cx, yy - cy) <= r for cx, cy, r, _ in c], 0).mean()))
    n = len(cover)
    print(f"{exp_dir} trial {trial}: {n} abnormal test images, {time.time() - t0:.0f} s")
    print(f"{'variant':62s} peak on a white cell")
    for name, h in hits.items():
        print(f"{name:62s} {np.mean(h):.3f}")
    print(f"{'chance (share of the image white cells cover)':62s} {np.mean(cover):.3f}")


if __name__ == "__main__":
    main()
