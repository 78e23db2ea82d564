"""The optimiser every trained network of a run gets: the diffusion model, an autoencoder, and a
distribution-matching distillation's fake score."""

from __future__ import annotations

import torch
from torch import nn

from kneegen.config import TrainConfig


def make_optimizer(network: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or Adam with the fused kernel, one kernel for all parameters: on a 2-core CPU its
    step took 21 ms for the default 6.9 M-parameter model, against 69 ms for the per-parameter
    loop and 104 ms for the multi-tensor (foreach) version."""
    optimizer_class = torch.optim.AdamW if train.optimizer == "adamw" else torch.optim.Adam
    return optimizer_class(
        network.parameters(), lr=train.lr, betas=(0.9, train.adam_beta2), weight_decay=train.weight_decay, fused=True
    )
