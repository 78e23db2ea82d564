"""A network trained beside the run's own, with an optimiser of its own: the patch discriminator
(engine/adversary.py) and a distribution-matching distillation's fake score (engine/fake_score.py).

What they share is what a checkpoint must hold for a resumed run to continue them exactly (their
weights, optimiser and loss-scaler state) and the mean loss of the steps they took this epoch,
which `metrics.jsonl` records.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from kneegen.engine.device import Compute
from kneegen.engine.distributed import Distributed


@dataclass(kw_only=True)
class Companion:
    network: nn.Module
    train_network: nn.Module  # what a step calls: `network`, wrapped by DDP when data-parallel
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    compute: Compute
    epoch_losses: list[float] = field(default_factory=list)  # its mean loss of each step it took this epoch

    def epoch_loss(self) -> float | None:
        """The mean of this epoch's losses, for metrics.jsonl; None before its first step."""
        return sum(self.epoch_losses) / len(self.epoch_losses) if self.epoch_losses else None

    def state_dict(self) -> dict[str, object]:
        return {
            "network": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch_losses": list(self.epoch_losses),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.network.load_state_dict(state["network"])  # type: ignore[arg-type]
        self.optimizer.load_state_dict(state["optimizer"])  # type: ignore[arg-type]
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])  # type: ignore[arg-type]
        self.epoch_losses = list(state.get("epoch_losses", []))  # type: ignore[call-overload]  # older checkpoints lack it


def companion_fields(network: nn.Module, optimizer: torch.optim.Optimizer, compute: Compute, dist: Distributed) -> dict:
    """What every new companion holds: its network, wrapped for data-parallel training while its
    weights still ask for gradients (DDP requires it), then frozen until its own first step."""
    train_network = dist.wrap(network)
    network.requires_grad_(False)
    return {
        "network": network,
        "train_network": train_network,
        "optimizer": optimizer,
        "scaler": compute.grad_scaler(),
        "compute": compute,
    }
