"""Channels-last (NHWC) backbones: forward time per image, NCHW vs NHWC weights, side by side.

``raycyto.models.registry.build_backbone`` returns every backbone in channels-last memory
format; this prints the per-image forward time of both layouts for the same weights and the
same input (interleaved repetitions, best of each), their ratio, and the largest difference of
the outputs.

Example (EfficientNet-Lite0 at the main job's 416 px and at 224 px, one torch thread):
    .venv/bin/python benchmarks/channels_last.py --backbones efficientnet_lite0 --sizes 416,224
"""

from __future__ import annotations

import argparse
import copy
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", default="efficientnet_lite0")
    p.add_argument("--sizes", default="416,224")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()

    import torch

    from raycyto.models.registry import build_backbone

    torch.set_num_threads(a.threads)
    print(f"forward ms/image, batch {a.batch}, {a.threads} torch thread(s), best of {a.reps} (random weights)")
    print(f"{'backbone':<20} {'px':>4} {'NCHW':>8} {'NHWC':>8} {'speed-up':>9} {'max |diff|':>11}")
    for name in a.backbones.split(","):
        nhwc = build_backbone(name, pretrained=False).eval()
        nchw = copy.deepcopy(nhwc).to(memory_format=torch.contiguous_format)
        for size in (int(s) for s in a.sizes.split(",")):
            x = torch.randn(a.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
            best = {"nchw": float("inf"), "nhwc": float("inf")}
            with torch.no_grad():
                outs = {k: m(x) for k, m in (("nchw", nchw), ("nhwc", nhwc))}  # warm-up
                for _ in range(a.reps):  # interleaved: both see the same background load
                    for k, m in (("nchw", nchw), ("nhwc", nhwc)):
                        t0 = time.perf_counter()
                        m(x)
                        best[k] = min(best[k], (time.perf_counter() - t0) * 1000 / a.batch)
            diff = float((outs["nchw"] - outs["nhwc"]).abs().max())
            print(f"{name:<20} {size:>4} {best['nchw']:8.1f} {best['nhwc']:8.1f} "
                  f"{best['nchw'] / best['nhwc']:8.2f}x {diff:11.2e}")


if __name__ == "__main__":
    main()
