"""The device and numeric settings, decided once per process and passed down.

bf16 autocast is a large win only where the hardware has bf16 units (CUDA Ampere+, CPUs with
AMX or AVX512-BF16); elsewhere it emulates bf16 and is slower than fp32, so `auto` asks the
hardware instead of assuming. channels_last suits GPUs only: on the CPU, GroupNorm on bf16
channels_last tensors takes a slow path (12 ms against 1 ms contiguous for a 32×64×32² block,
forward and backward), which cost the U-Net's bf16 training step 28 % (width 64, patch 2)
to 71 % (the old demo model); see benchmarks/training.py. Training on an older GPU (no bf16) may
ask for fp16 instead, which needs loss scaling (`Compute.grad_scaler`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import get_args

import torch

from kneegen.config import DeviceName, Precision
from kneegen.errors import KneegenError

PRECISIONS: tuple[str, ...] = get_args(Precision)


@dataclass(frozen=True)
class Compute:
    """Where tensors live and how the network runs there."""

    device: torch.device
    dtype: torch.dtype | None  # autocast dtype; None runs in fp32

    @property
    def memory_format(self) -> torch.memory_format:
        """channels_last for autocast on a GPU; contiguous on the CPU (see the module docstring)."""
        return torch.channels_last if self.dtype is not None and self.device.type == "cuda" else torch.contiguous_format

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to `dtype`, or nothing: one code path either way."""
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16 (its gradients underflow without it); a no-op otherwise."""
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def describe(self) -> str:
        names = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
        return f"{self.device.type} ({names[self.dtype]})"


def resolve_compute(device: DeviceName | str, precision: Precision | str, allow_fp16: bool = False) -> Compute:
    """Turn the config's `device` and `precision` into a Compute, checking availability.

    `allow_fp16` (training): `auto` on a CUDA GPU without bf16 picks fp16 with loss scaling.
    """
    if precision not in PRECISIONS:
        raise KneegenError(f"precision {precision!r} unknown: use {', '.join(PRECISIONS)}")
    chosen = pick_device(device)
    if precision == "fp32":
        return Compute(chosen, None)
    supported = bf16_supported(chosen)
    if precision == "bf16" and not supported:
        raise KneegenError(f"precision bf16 is not supported on {chosen.type} here: use --precision fp32 or auto")
    if not supported and allow_fp16 and chosen.type == "cuda":
        return Compute(chosen, torch.float16)
    return Compute(chosen, torch.bfloat16 if supported else None)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name not in available:
        raise KneegenError(f"device {name!r} unknown: use auto, cpu, cuda or mps")
    if not available[name]:
        raise KneegenError(f"device {name} is not available on this machine: use --device auto or cpu")
    return torch.device(name)


def bf16_supported(device: torch.device) -> bool:
    """Native bf16 compute: CUDA's own check, oneDNN's on the CPU; never on MPS."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


@contextlib.contextmanager
def evaluating(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode (BatchNorm uses running stats) for the block, then the previous mode back."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
