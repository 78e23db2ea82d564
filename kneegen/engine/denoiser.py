"""Wrap a network as a denoiser (x_t, t) → (x̂_0, ε̂), the interface every sampler uses."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kneegen.config import Prediction
from kneegen.engine.device import Compute
from kneegen.engine.samplers import Denoiser
from kneegen.engine.schedule import Schedule


def make_denoiser(network: nn.Module, schedule: Schedule, prediction: Prediction, compute: Compute) -> Denoiser:
    """Runs the network in eval/inference mode with the device's settings; x̂_0 is clipped to the
    data range [-1, 1] and ε̂ recomputed from it, which keeps few-step samplers on the data."""
    network.eval()

    def denoise(x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        with torch.inference_mode(), compute.autocast():
            output = network(x_t.to(memory_format=compute.memory_format), t)
        x0, _ = schedule.to_x0_eps(output.float(), x_t, t, prediction)
        x0 = x0.clamp(-1.0, 1.0)
        return x0, schedule.eps_from_x0(x0, x_t, t)

    return denoise
