"""Cached-prefix fine-tuning vs uncached fine-tuning: seconds per epoch, side by side.

For last1 and last2 at 416 px (EfficientNet-Lite0, the offline default, and InceptionV3,
study A's; random weights where ImageNet weights are not on disk: timing does not depend on
them), one training epoch over the same augmented karyogram rows with the same loop
(``raycyto.tune.train.fit``):

- uncached: every batch runs the whole backbone (the frozen prefix without gradient, the
  trainable tail with it) on the preprocessed images, as a streamed trial does (decoding and
  augmentation are left out, which only flatters the uncached side);
- cached: every batch runs the tail on the prefix's cached float16 output.

Also prints the one-time cost of filling the cache (one prefix pass per row): a sweep fills
it once per backbone and mode, and every fold, search sample and epoch reuses it.

The ratio depends on the architecture: roughly (prefix + 3 x tail) / (3 x tail) in forward
cost, large when the trainable blocks are a small share of the network, small when they are not.

Usage: python benchmarks/finetune_cache.py [--images 32] [--size 416] [--threads 2]
                                         [--backbones efficientnet_lite0,inception_v3]
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="training rows (karyograms, original + copies)")
    parser.add_argument("--size", type=int, default=416, help="input side")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backbones", default="efficientnet_lite0,inception_v3")
    args = parser.parse_args()

    import tempfile
    from pathlib import Path

    import numpy as np
    import torch

    from raycyto.config import TrainConfig
    from raycyto.data.augment import augment, image_key
    from raycyto.data.decode import load_image
    from raycyto.models.classifier import build_classifier
    from raycyto.models.preprocessing import Preprocess
    from raycyto.models.split import prefix_tail
    from raycyto.synth import generate
    from raycyto.tune.train import HParams, Task, array_batches, fit

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        generate("karyogram", Path(tmp), patients=(args.images + 3) // 4, per_patient=2, seed=0, size=args.size,
                 progress=False)
        paths = sorted(Path(tmp).rglob("*.png"))[: (args.images + 1) // 2]
        images = [load_image(str(p), args.size) for p in paths]
    rows = [augment(im, "karyogram", 0, image_key(im), c) for im in images for c in (0, 1)][: args.images]
    y = np.arange(len(rows)) % 2
    train = TrainConfig(epochs=1, select_metric="val_loss")
    task, hp = Task(2, positive=1), HParams(lr=1e-3, batch_size=args.batch)
    val = lambda data: (lambda: array_batches(data[:8], y[:8], 8)(0))  # noqa: E731 - a small validation pass

    for backbone in args.backbones.split(","):
        pre = Preprocess.build(backbone, args.size, args.size)
        x = pre.to_tensor(np.stack(rows)).numpy()  # [N, 3, S, S]
        try:
            build_classifier(backbone, "a", 2, pretrained=True)
            pretrained = True
        except Exception:  # noqa: BLE001 - WeightsError offline: time it with random weights
            pretrained = False

        def build(mode: str):
            model = build_classifier(backbone, "a", 2, finetune=mode, pretrained=pretrained, seed=0)
            if not pretrained:  # random weights: batch-norm statistics of these images, or deep
                bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
                for bn in bns:  # nets overflow to NaN (the timing is the same either way)
                    bn.reset_running_stats()
                    bn.momentum = None  # cumulative average over the calibration batches
                model.backbone.train()
                with torch.no_grad():
                    for i in range(0, len(x), args.batch):
                        model.backbone(torch.from_numpy(x[i:i + args.batch]))
                model.train()  # Classifier.train: frozen batch norms back to eval
            return model

        print(f"{backbone} ({'ImageNet' if pretrained else 'random'} weights), {len(rows)} rows at "
              f"{args.size} px, batch {args.batch}, {args.threads} threads")
        print(f"{'mode':<8}{'cache fill (s)':>16}{'uncached s/epoch':>18}{'cached s/epoch':>16}{'ratio':>8}")
        fit(build("last2"), array_batches(x[:4], y[:4], 4), val(x), task=task, train=train, hp=hp,
            device="cpu")  # untimed warm-up
        for mode in ("last1", "last2"):
            model = build(mode)
            t0 = time.perf_counter()
            fit(model, array_batches(x, y, args.batch, seed=0), val(x), task=task, train=train, hp=hp, device="cpu")
            uncached = time.perf_counter() - t0

            model = build(mode).eval()
            prefix, tail = prefix_tail(model.backbone, model.spec, mode)
            t0 = time.perf_counter()
            with torch.no_grad():
                acts = np.concatenate([prefix(torch.from_numpy(x[i:i + args.batch])).half().numpy()
                                       for i in range(0, len(x), args.batch)])
            fill = time.perf_counter() - t0
            forward = lambda m, b: m.classify_features(tail(b.float()))  # noqa: E731
            t0 = time.perf_counter()
            fit(model, array_batches(acts, y, args.batch, seed=0), val(acts), task=task, train=train, hp=hp,
                forward=forward, device="cpu")
            cached = time.perf_counter() - t0
            print(f"{mode:<8}{fill:>16.2f}{uncached:>18.2f}{cached:>16.2f}{uncached / cached:>7.1f}x")
            print(f"per-epoch ratio cached vs uncached {backbone} {mode} at {args.size} px: {uncached / cached:.1f}x")


if __name__ == "__main__":
    main()
