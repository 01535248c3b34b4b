"""MC-dropout cost: one deterministic forward vs T passes in head scope vs full scope.

efficientnet_lite0 (pretrained, offline) at its native 224 px with head ``d`` (dropout 0.5
after each hidden ReLU), a batch of 8 images. Reports the median of ``--repeats`` runs of

- deterministic: ``model(x)`` in eval, dropout off;
- head scope:    ``mc_predict(..., passes=T, scope="head")`` (backbone once, T passes
                 vectorised on the head as one [8*T, 1280] call);
- full scope:    ``mc_predict(..., passes=T, scope="full")`` (T whole-network forwards);

and prints head/deterministic and full/head. torch runs with ``--threads`` intra-op
threads (default 1: this machine's 2 cores are shared, one thread keeps timings stable).

Example: .venv/bin/python benchmarks/mc_dropout.py --passes 100 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passes", type=int, default=100)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--full-repeats", type=int, default=1,
                    help="runs of the (slow) full scope; each is T whole-network forwards")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from raycyto.models import build_classifier, mc_predict

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_classifier("efficientnet_lite0", "d", 2, pretrained=True).eval()
    size = model.spec.input_size
    x = torch.rand(args.batch, 3, size, size) * 2 - 1  # [N, 3, 224, 224]

    def deterministic():
        with torch.no_grad():
            model(x)

    t_det = _median_s(deterministic, args.repeats)
    t_head = _median_s(lambda: mc_predict(model, x, args.passes, scope="head", seed=0), args.repeats)
    t_full = _median_s(lambda: mc_predict(model, x, args.passes, scope="full", seed=0),
                       args.full_repeats)
    print(f"efficientnet_lite0 @ {size}px, head d, batch {args.batch}, T={args.passes}, "
          f"torch threads={args.threads}")
    print(f"deterministic forward : {t_det * 1e3:9.1f} ms  (median of {args.repeats})")
    print(f"MC head scope  T={args.passes:<4}: {t_head * 1e3:9.1f} ms  (median of {args.repeats})")
    print(f"MC full scope  T={args.passes:<4}: {t_full * 1e3:9.1f} ms  (median of {args.full_repeats})")
    print(f"ratio head / deterministic = {t_head / t_det:.2f}x  (target <= 1.5x)")
    print(f"ratio full / head          = {t_full / t_head:.1f}x  (target >= 30x)")


if __name__ == "__main__":
    main()
