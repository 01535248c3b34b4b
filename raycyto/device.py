"""Which torch device a piece of work runs on, and at which precision."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

PRECISIONS = ("fp32", "bf16")


def worker_device() -> str:
    """``"cuda"`` when torch sees a GPU and, inside Ray, this worker was given one; else ``"cpu"``.

    Ray hides GPUs from workers that asked for none (``CUDA_VISIBLE_DEVICES=""``) and shows a
    trial with ``gpus_per_trial: 0.25`` the GPU it shares, so the same code runs CPU trials,
    whole-GPU trials and fractional-GPU trials.
    """
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    import ray

    if ray.is_initialized() and not ray.get_runtime_context().get_assigned_resources().get("GPU", 0):
        return "cpu"
    exact_fp32()
    return "cuda"


def exact_fp32() -> None:
    """fp32 means fp32 on CUDA too: TF32 off for convolutions (cuDNN's default is on) and
    matrix products, so an fp32 trial or replica computes what the CPU computes, up to float
    rounding (``train.precision: bf16`` is the fast setting; autocast governs it)."""
    import torch

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def autocast(device: str, precision: str) -> Any:
    """bf16 autocast on ``device`` for ``precision="bf16"``; a no-op context for fp32."""
    import torch

    if precision == "fp32":
        return nullcontext()
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
    return torch.autocast(device_type=str(device).split(":")[0], dtype=torch.bfloat16)
