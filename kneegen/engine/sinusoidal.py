"""The sinusoidal embedding of a number (Vaswani et al.), shared by timesteps and positions."""

from __future__ import annotations

import math

import torch
from torch import Tensor

MAX_PERIOD = 10_000  # the slowest sinusoid's period, in the embedded number's units


def sinusoidal_embedding(values: Tensor, dim: int) -> Tensor:
    """(B,) numbers, e.g. integer timesteps → (B, dim): cosines then sines of geometric frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, device=values.device, dtype=torch.float32) / half)
    angles = values.float()[:, None] * freqs[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=1)
