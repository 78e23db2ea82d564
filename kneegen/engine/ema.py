"""Exponential moving average of the weights, used for validation and sampling."""

from __future__ import annotations

import copy

import torch
from torch import nn

WARMUP_OFFSET = 9  # the decay ramps as t / (9 + t) after t steps, so early averages forget the init


class EMA:
    """A frozen copy of the model whose parameters trail the trained ones.

    Buffers (BatchNorm running statistics of `arch: seed`) are copied rather than averaged:
    they are already running averages.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Move toward `model` by 1 − decay_t after `step` = t ≥ 1 optimizer steps, with the decay
        warmed up over the first steps (in effect a power-function EMA of σ_rel ≈ 0.09 while
        t / (9 + t) is below `decay`: for the first ~4,500 steps at 0.998)."""
        decay = min(self.decay, step / (WARMUP_OFFSET + step))
        ema_params = list(self.model.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - decay)
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)
