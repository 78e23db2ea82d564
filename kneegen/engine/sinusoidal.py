"""The sinusoidal embedding of a number (Vaswani et al.), shared by timesteps and positions."""

from __future__ import annotations

import math

import torch
from torch import Tensor

MAX_PERIOD = 10_000  # the slowest sinusoid's period, in the embedded number's units


def sinusoidal_embedding(values: Tensor, dim: int) -> Tensor:
    """(B,) numbers, e.g. integer timesteps → (B, dim): cosines then sines of geometric frequencies,
    and for an odd `dim` (a network of odd width) a last column of zeros."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(MAX_PERIOD) * torch.arange(half, device=values.device, dtype=torch.float32) / max(half, 1)
    )
    angles = values.float()[:, None] * freqs[None, :]
    padding = torch.zeros((len(values), dim % 2), device=values.device)
    return torch.cat([angles.cos(), angles.sin(), padding], dim=1)
