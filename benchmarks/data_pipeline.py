"""Images/s of read + decode + resize + augment: Ray Data pipeline vs a plain loop.

Both sides run the same functions (decode.load_image, augment.augment) over the same
files in one run, each twice; the second (warm) pass is compared, so Ray's worker
start-up is excluded (the first Ray pass is printed too). "images" are output rows
(source images x copies). Prints both rates, their ratio and the ratio per CPU Ray used.

Example:
    .venv/bin/python benchmarks/data_pipeline.py --images 300 --copies 4
    .venv/bin/python benchmarks/data_pipeline.py --source data/leukemia --policy leukemia
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def _plain_loop(table, size: int, policy: str, copies: int, seed: int) -> int:
    from raycyto.data.augment import augment, image_key
    from raycyto.data.decode import DecodeError, load_image

    rows = 0
    for path in table.df["path"]:
        try:
            img = load_image(path, size)
        except DecodeError:
            rows += 1
            continue
        for c in range(copies):
            augment(img, policy, seed, image_key(img), c)
            rows += 1
    return rows


def _count(batch: dict) -> dict:
    return {"n": [len(batch["copy"])]}


def _ray_pipeline(table, size: int, policy: str, copies: int, seed: int, batch_size: int,
                  deliver: bool = True) -> int:
    """deliver=True streams every image to the driver (what a local consumer gets);
    deliver=False consumes them inside the workers, like the plain loop discards them
    (what a downstream map_batches stage, e.g. feature extraction, sees)."""
    from raycyto.data.pipeline import image_dataset

    ds = image_dataset(table, size, policy=policy, copies=copies, seed=seed, batch_size=batch_size)
    if not deliver:
        ds = ds.map_batches(_count, batch_format="numpy", batch_size=None)
        return int(sum(b["n"].sum() for b in ds.iter_batches(batch_format="numpy", batch_size=None)))
    # consume blocks as produced (batch_size=None): no re-batching copies on the driver
    return sum(len(b["copy"]) for b in ds.iter_batches(batch_format="numpy", batch_size=None))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", help="image folder / manifest; default: generate synthetic leukemia smears")
    ap.add_argument("--images", type=int, default=300, help="synthetic images to generate")
    ap.add_argument("--gen-size", type=int, default=256, help="side of the generated images")
    ap.add_argument("--image-size", type=int, default=224, help="resize target")
    ap.add_argument("--policy", default="leukemia")
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-cpus", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import ray

    from raycyto.data.sources import read_source

    with tempfile.TemporaryDirectory() as tmp:
        source = args.source
        if source is None:
            from raycyto.synth import generate

            per_patient = 3
            source = generate("leukemia", Path(tmp) / "leuk", patients=max(1, args.images // per_patient),
                              per_patient=per_patient, seed=args.seed, size=args.gen_size, progress=True)
        table = read_source(source)
        n = len(table.df)
        print(f"{n} source images from {source}; policy {args.policy}, {args.copies} copies, "
              f"{args.image_size}px")

        ray.init(num_cpus=args.num_cpus, include_dashboard=False, configure_logging=False,
                 log_to_driver=False)
        from raycyto.data.pipeline import quiet_ray_data

        quiet_ray_data()
        cpus = int(ray.cluster_resources().get("CPU", 1))
        import cv2

        cv2.setNumThreads(1)  # a true single-core baseline (Ray tasks run cv2 single-threaded too)
        timings = {}
        runs = {
            "plain": lambda: _plain_loop(table, args.image_size, args.policy, args.copies, args.seed),
            "ray": lambda: _ray_pipeline(table, args.image_size, args.policy, args.copies, args.seed,
                                         args.batch_size, deliver=True),
            "ray_in_workers": lambda: _ray_pipeline(table, args.image_size, args.policy, args.copies,
                                                    args.seed, args.batch_size, deliver=False),
        }
        for name, run in runs.items():
            for attempt in ("cold", "warm"):  # cold includes Ray worker start-up and imports
                t0 = time.perf_counter()
                rows = run()
                timings[name, attempt] = (rows, time.perf_counter() - t0)
        ray.shutdown()

    rows = {r for r, _ in timings.values()}
    assert len(rows) == 1, timings  # every variant produced the same number of images
    n_out = rows.pop()
    rate = {k: n_out / t for (k, attempt), (_, t) in timings.items() if attempt == "warm"}
    print(f"plain loop (1 process): {n_out} images in {n_out / rate['plain']:.2f}s = {rate['plain']:.1f} images/s")
    cold_s = timings["ray", "cold"][1]
    print(f"Ray Data, images to driver ({cpus} CPUs): {rate['ray']:.1f} images/s "
          f"(first pass incl. worker start-up: {n_out / cold_s:.1f} images/s)")
    print(f"Ray Data, consumed in workers ({cpus} CPUs): {rate['ray_in_workers']:.1f} images/s")
    for key, what in (("ray", "images to driver"), ("ray_in_workers", "consumed in workers")):
        ratio = rate[key] / rate["plain"]
        print(f"ratio Ray/plain ({what}) = {ratio:.2f}x; per core = {ratio / cpus:.2f} (1.0 = perfect scaling)")
    print(f"machine: {os.cpu_count()} CPUs visible, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
