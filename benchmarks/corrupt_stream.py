"""Reliability: a large image stream with planted corrupt files of every kind.

Writes N images (default 10,000, 1% corrupt: empty, truncated PNG/JPEG, random bytes,
text, GIF, decompression bomb, missing file), streams them through the Ray Data pipeline
(decode + resize + augment) and checks: 0 crashes, exactly the planted paths reported,
every other image processed. Prints the figures and exits non-zero on any mismatch.

Example:
    .venv/bin/python benchmarks/corrupt_stream.py                 # 10,000 images
    .venv/bin/python benchmarks/corrupt_stream.py --images 2000 --corrupt 0.02
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--corrupt", type=float, default=0.01, help="share of corrupt files")
    ap.add_argument("--size", type=int, default=32, help="side of the planted images")
    ap.add_argument("--num-cpus", type=int, default=2)
    args = ap.parse_args()

    import ray

    from raycyto.data.fixtures import planted_stream
    from raycyto.data.pipeline import image_dataset, quiet_ray_data, split_errors
    from raycyto.data.sources import read_source

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        manifest, planted = planted_stream(Path(tmp), args.images, args.corrupt, size=args.size)
        t_write = time.perf_counter() - t0
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        quiet_ray_data()
        t0 = time.perf_counter()
        ok, bad = split_errors(image_dataset(read_source(manifest), image_size=args.size,
                                             policy="karyogram", copies=2, seed=0))
        n_ok_rows = ok.count()
        t_run = time.perf_counter() - t0
        ray.shutdown()

    reported = set(bad["path"])
    expected = set(planted)
    missed, spurious = expected - reported, reported - expected
    n_good = args.images - len(expected)
    kinds = sorted({Path(p).name.split("_", 1)[1] for p in planted})  # "00012_bad_empty.png" -> kind
    print(f"images: {args.images}  corrupt planted: {len(expected)} ({len(kinds)} kinds: {', '.join(kinds)})")
    print(f"written in {t_write:.1f} s; streamed in {t_run:.1f} s ({args.images / t_run:.0f} images/s)")
    print(f"crashes: 0   reported: {len(reported)}   missed: {len(missed)}   spurious: {len(spurious)}")
    print(f"processed good images: {n_ok_rows // 2} / {n_good}  (rows with 2 copies each: {n_ok_rows})")
    passed = not missed and not spurious and n_ok_rows == 2 * n_good
    print("RESULT:", "PASS" if passed else "FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
