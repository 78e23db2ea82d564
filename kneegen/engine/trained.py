"""A trained model as sampling and validation need it: network, schedule and config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from kneegen.config import RunConfig, config_from_mapping
from kneegen.engine.checkpoint import load_checkpoint
from kneegen.engine.device import Compute
from kneegen.engine.network import build_network
from kneegen.engine.plugins import resolve_plugins
from kneegen.engine.schedule import Schedule


@dataclass
class TrainedModel:
    network: nn.Module
    schedule: Schedule
    config: RunConfig
    image_shape: tuple[int, int]
    epoch: int
    source: Path


def load_trained_model(path: Path, compute: Compute) -> TrainedModel:
    """Rebuild the network from the checkpoint's own config and load its EMA weights
    (the raw weights when the run had no EMA)."""
    payload = load_checkpoint(path)
    config = resolve_plugins(config_from_mapping(payload["config"], str(path)), str(path))  # every check a YAML gets
    image_shape = tuple(payload["image_shape"])
    network = build_network(config.model, image_shape)
    network.load_state_dict(payload["ema"] if payload["ema"] is not None else payload["model"])
    network = network.to(compute.device, memory_format=compute.memory_format).eval()
    schedule = Schedule(config.diffusion.schedule, config.diffusion.timesteps)
    return TrainedModel(network, schedule, config, image_shape, payload["epoch"], path)  # type: ignore[arg-type]
