"""Exponential moving average of the weights, used for validation and sampling."""

from __future__ import annotations

import copy

import torch
from torch import nn

WARMUP_OFFSET = 10  # decay ramps as (1 + step) / (10 + step) so early averages forget the init


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
        """Move toward `model` by 1 − decay_t, with the decay warmed up over the first steps."""
        decay = min(self.decay, (1 + step) / (WARMUP_OFFSET + step))
        ema_params = list(self.model.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - decay)
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)
