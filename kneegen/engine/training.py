"""One training epoch, and the state that makes a resumed run equal an uninterrupted one.

Every random draw of training comes from sources kept in `TrainState`: the data order of an
epoch from (seed, epoch), and t and ε from one generator whose state is checkpointed. So a run
resumed from the checkpoint of epoch k continues with exactly the losses it would have had.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from kneegen.config import RunConfig, TrainConfig
from kneegen.engine.device import Compute
from kneegen.engine.ema import EMA
from kneegen.engine.loss import per_image_loss
from kneegen.engine.network import build_network
from kneegen.engine.pixels import to_model_range
from kneegen.engine.schedule import Schedule

EPOCH_SEED_STRIDE = 1_000_003  # separates the per-epoch shuffling seeds of different run seeds


@dataclass
class TrainState:
    """What a checkpoint must hold to continue training exactly."""

    network: nn.Module
    ema: EMA | None
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # draws t and ε
    step: int = 0
    epoch: int = 0  # epochs completed
    best_val_loss: float = math.inf

    @property
    def eval_network(self) -> nn.Module:
        """The weights validation and sampling use: the EMA when there is one."""
        return self.ema.model if self.ema is not None else self.network


def create_state(cfg: RunConfig, image_shape: tuple[int, int], compute: Compute) -> TrainState:
    """A fresh network, EMA and optimizer, all seeded from `train.seed`."""
    torch.manual_seed(cfg.train.seed)
    network = build_network(cfg.model, image_shape).to(compute.device, memory_format=compute.memory_format)
    optimizer_class = torch.optim.AdamW if cfg.train.optimizer == "adamw" else torch.optim.Adam
    optimizer = optimizer_class(network.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    ema = EMA(network, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    generator = torch.Generator().manual_seed(cfg.train.seed)
    return TrainState(network, ema, optimizer, generator)


def state_payload(state: TrainState) -> dict[str, Any]:
    """The checkpoint's training part (the caller adds config and data facts)."""
    return {
        "model": state.network.state_dict(),
        "ema": state.ema.model.state_dict() if state.ema is not None else None,
        "optimizer": state.optimizer.state_dict(),
        "generator": state.generator.get_state(),
        "torch_rng": torch.get_rng_state(),  # dropout draws from the global generator
        "step": state.step,
        "epoch": state.epoch,
        "best_val_loss": state.best_val_loss,
    }


def restore_state(state: TrainState, payload: dict[str, Any]) -> None:
    """Load a checkpoint written by `state_payload` into a state built from the same config."""
    state.network.load_state_dict(payload["model"])
    if state.ema is not None and payload["ema"] is not None:
        state.ema.model.load_state_dict(payload["ema"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.generator.set_state(payload["generator"])
    torch.set_rng_state(payload["torch_rng"])
    state.step, state.epoch = payload["step"], payload["epoch"]
    state.best_val_loss = payload["best_val_loss"]


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over `warmup_steps`, then constant."""
    if cfg.warmup_steps <= 0:
        return cfg.lr
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)


def epoch_order(n_images: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled image order of one epoch, a function of (seed, epoch) only."""
    generator = torch.Generator().manual_seed(seed * EPOCH_SEED_STRIDE + epoch)
    return torch.randperm(n_images, generator=generator)


def train_epoch(
    state: TrainState,
    images: np.ndarray,
    schedule: Schedule,
    cfg: RunConfig,
    compute: Compute,
    on_batch: Callable[[float], None] | None = None,
) -> list[float]:
    """One pass over `images` ((N, H, W) unsigned ints); returns the loss of every step."""
    train = cfg.train
    state.network.train()
    order = epoch_order(len(images), train.seed, state.epoch)
    losses = []
    for start in range(0, len(order), train.batch_size):
        # 1. Batch: sorted indices read the memory-mapped cache sequentially.
        index = np.sort(order[start : start + train.batch_size].numpy())
        x0 = to_model_range(images[index], compute.device).to(memory_format=compute.memory_format)
        # 2. Forward process: t uniform, ε standard normal, both from the state's generator.
        t = torch.randint(0, schedule.timesteps, (len(index),), generator=state.generator)
        noise = torch.randn(x0.shape, generator=state.generator).to(compute.device)
        t = t.to(compute.device)
        x_t = schedule.add_noise(x0, noise, t)
        target = schedule.target(x0, noise, t, cfg.diffusion.prediction)
        # 3. Loss and update, with warm-up, clipping and EMA.
        with compute.autocast():
            prediction = state.network(x_t, t)
        loss = per_image_loss(prediction, target, cfg.diffusion.loss).mean()
        for group in state.optimizer.param_groups:
            group["lr"] = learning_rate(train, state.step)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(state.network.parameters(), train.grad_clip)
        state.optimizer.step()
        if state.ema is not None:
            state.ema.update(state.network, state.step)
        state.step += 1
        losses.append(loss.item())
        if on_batch is not None:
            on_batch(losses[-1])
    state.epoch += 1
    return losses
