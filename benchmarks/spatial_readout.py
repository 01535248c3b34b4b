"""Head s training step: the per-cell readout as an einsum (before) vs a multiply-sum per class.

``MILMapHead.cell_scores`` computes ``s[n, c, p] = z[n, :, p] . W[c, p, :]``. Written as
``torch.einsum("nrp,cpr->ncp")`` PyTorch runs it as one small matrix product per map cell
(676 for Lite0 blocks.4 at 416 px); as ``(z * W[c]).sum(1)`` per class it is one elementwise
pass. This times one training step (forward + backward + AdamW) of head s on a batch of
main-job-shaped maps with each form, interleaved, best of the repetitions, and prints the
ratio and the largest difference of the logits.

Example (batch 32 of 112 x 26 x 26 maps, 2 torch threads as in a main-job trial):
    .venv/bin/python benchmarks/spatial_readout.py
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--channels", type=int, default=112)
    p.add_argument("--grid", type=int, default=26)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()

    import torch

    from raycyto.models.spatial import MILMapHead

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    head = MILMapHead(a.channels, a.grid, 2, reference=0)
    x = torch.randn(a.batch, a.channels, a.grid, a.grid).half()
    y = torch.randint(0, 2, (a.batch,))
    opt = torch.optim.AdamW(head.parameters(), 1e-3)
    current = head.cell_scores

    def einsum(z):  # the previous form, same dropout call
        n = z.shape[0]
        z = z * head.channel_drop(z.new_ones(n, head.width, 1, 1))
        return torch.einsum("nrp,cpr->ncp", head.drop(z.flatten(2)), head._weights())

    def step(scores) -> float:
        head.cell_scores = scores
        t = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(head(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    best = {"einsum": float("inf"), "multiply-sum": float("inf")}
    for _ in range(a.reps):
        best["einsum"] = min(best["einsum"], step(einsum))
        best["multiply-sum"] = min(best["multiply-sum"], step(current))
    head.eval()
    with torch.no_grad():
        z = head.trunk(x)
        diff = (head._pool(einsum(z)) - head._pool(current(z))).abs().max().item()
    print(f"head s training step, batch {a.batch} of {a.channels} x {a.grid} x {a.grid} maps, "
          f"{a.threads} threads (best of {a.reps}):")
    for k, v in best.items():
        print(f"  {k:>12}: {v * 1000:6.1f} ms")
    print(f"einsum / multiply-sum: {best['einsum'] / best['multiply-sum']:.2f}x; largest logit difference {diff:.1e}")


if __name__ == "__main__":
    main()
