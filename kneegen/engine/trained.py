"""A trained model as sampling and validation need it: network, schedule and config (and a latent
model's autoencoder)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from kneegen.config import RunConfig, config_from_mapping
from kneegen.engine.checkpoint import CHANGED_CONFIG, load_training_checkpoint, load_weights
from kneegen.engine.device import Compute
from kneegen.engine.latent import LatentSpace, check_same_autoencoder, load_latent_space
from kneegen.engine.network import build_network, network_settings
from kneegen.engine.plugins import resolve_plugins
from kneegen.engine.schedule import Schedule
from kneegen.errors import KneegenError


@dataclass
class TrainedModel:
    network: nn.Module
    schedule: Schedule
    config: RunConfig
    image_shape: tuple[int, int]
    epoch: int
    source: Path
    latent: LatentSpace | None = None  # a latent model's autoencoder: samples are its decoded latents
    distilled_steps: int | None = None  # a distilled student's: the steps of the `distilled` sampler it learnt
    guide: nn.Module | None = None  # the run's autoguidance guide (train.guide_at), once training has kept it
    distill_method: str | None = None  # a distilled student's `distill.method`: a consistency student takes any steps

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of what the sampler draws: one-channel images, or a latent model's latents."""
        return self.latent.shape_of(self.image_shape) if self.latent else (1, *self.image_shape)

    @property
    def fold(self) -> int:
        """Pixels per side the network folds into channels (`patch_size`; 1 for networks without one)."""
        return getattr(network_settings(self.config.model, str(self.source))[1], "patch_size", 1)


def load_trained_model(path: Path, compute: Compute) -> TrainedModel:
    """Rebuild the network from the checkpoint's own config and load its EMA weights
    (the raw weights when the run had no EMA), and its autoguidance guide if it kept one."""
    payload = load_training_checkpoint(path)
    config = resolve_plugins(config_from_mapping(payload["config"], str(path)), str(path))  # every check a YAML gets
    if config.model.arch == "vae":
        raise KneegenError(
            f"{path} is an autoencoder, which draws no samples: train a latent diffusion model on it "
            f"(model.autoencoder: {path}, see examples/latent-256.yaml) and sample from that"
        )
    image_shape: tuple[int, int] = tuple(payload["image_shape"])  # type: ignore[assignment]
    latent = latent_space_of(payload, config, compute, path) if config.model.autoencoder else None
    channels, *input_shape = latent.shape_of(image_shape) if latent else (1, *image_shape)
    shape = tuple(input_shape)

    def network_with(weights: dict[str, Any]) -> nn.Module:
        network = build_network(config.model, shape, channels)  # type: ignore[arg-type]
        load_weights(network, weights, str(path), CHANGED_CONFIG)
        return network.to(compute.device, memory_format=compute.memory_format).eval()

    network = network_with(payload["ema"] if payload["ema"] is not None else payload["model"])
    guide = network_with(payload["guide"]) if payload.get("guide") is not None else None
    schedule = Schedule(config.diffusion.schedule, config.diffusion.timesteps)
    distilled = payload.get("distillation")
    steps = int(distilled["steps"]) if distilled else None
    method = str(distilled.get("method", "progressive")) if distilled else None  # absent before consistency
    return TrainedModel(network, schedule, config, image_shape, payload["epoch"], path, latent, steps, guide, method)


def latent_space_of(payload: dict[str, Any], config: RunConfig, compute: Compute, path: Path) -> LatentSpace:
    """A latent checkpoint's autoencoder, from `model.autoencoder`, refused unless it holds the
    weights the model was trained with; with the latents' scale as trained."""
    space = load_latent_space(Path(config.model.autoencoder), compute, f"{path} (model.autoencoder)")
    check_same_autoencoder(space, payload["latent"]["digest"], str(path))
    space.scale = float(payload["latent"]["scale"])
    return space
