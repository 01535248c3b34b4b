"""CUDA paths checked where no GPU is: what the first run on an H200 found broken.

benchmarks/gpu_check.sh on an H200 (2026-12-04): every Serve /predict answered 500 because
``mc_predict`` returned ``probs.numpy()`` of a CUDA tensor, and CPU and CUDA trials of one
seed trained apart (training dropout drew from CUDA's generator; cuDNN convolutions ran in
TF32). These tests pin the fixes without a GPU.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from raycyto.device import exact_fp32
from raycyto.models.mc import MCDropout

PACKAGE = Path(__file__).resolve().parents[1] / "raycyto"


def test_every_tensor_to_numpy_goes_through_cpu():
    """``t.numpy()`` raises on a CUDA tensor; the package writes ``t.cpu().numpy()`` (a no-op on CPU)."""
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            for m in re.finditer(r"\.numpy\(\)", line):
                if not line[:m.start()].endswith(".cpu()"):
                    bad.append(f"{path.relative_to(PACKAGE.parent)}:{i}: {line.strip()}")
    assert not bad, "tensor.numpy() without .cpu():\n" + "\n".join(bad)


def test_training_dropout_draws_its_mask_from_the_cpu_generator():
    """The mask is ``torch.rand(shape) >= p`` from the CPU generator, so a seed drops the same
    units on every device (on CUDA only the multiply runs there)."""
    drop = MCDropout(p=0.3).train()
    x = torch.randn(4, 50)
    torch.manual_seed(7)
    got = drop(x)
    torch.manual_seed(7)
    want = x * (torch.rand(x.shape) >= 0.3).float() / 0.7
    assert torch.equal(got, want)
    assert 0 < int((got == 0).sum()) < x.numel()
    assert torch.equal(MCDropout(p=0.0).train()(x), x)


def test_fp32_turns_tf32_off():
    torch.backends.cudnn.allow_tf32 = True
    try:
        exact_fp32()
        assert torch.backends.cudnn.allow_tf32 is False
        assert torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cudnn.allow_tf32 = True
