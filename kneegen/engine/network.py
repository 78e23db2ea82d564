"""The registry of denoising networks: the built-in ones plus any a package adds through the
`kneegen.networks` entry-point group, and building the one a run config names.

A network declares itself with a `Network`: its module class, built as `module(settings,
image_channels)` with `forward(x (B, C, H, W), t (B,)) → (B, C, H, W)`, and its settings
dataclass, whose keys a run config holds under `model.<name>` and which provides `check()` (the
bounds its types cannot express, raising KneegenError) and `size_multiple()` (what H and W must
be multiples of). Adding an architecture is one module with these two classes and one entry
point whose object is the `Network`. A network that can be conditioned (`model.conditions`,
engine/conditioning.py) says so with `conditional=True`: it is then built with
`conditions=[names]` and called as `forward(x, t, c (B, K))`, c = None meaning none given.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from torch import nn

from kneegen.config import ModelConfig, RunConfig, from_dict
from kneegen.engine.autoencoder import Autoencoder, AutoencoderConfig
from kneegen.engine.seed_unet import SeedUNet, SeedUNetConfig
from kneegen.engine.unet import UNet, UNetConfig
from kneegen.errors import KneegenError

NETWORK_GROUP = "kneegen.networks"  # entry-point group through which a package adds a network


@dataclass(frozen=True)
class Network:
    """What kneegen needs of an architecture: how to build it and what its settings are."""

    module: type[nn.Module]
    settings: type
    conditional: bool = False  # built as module(settings, channels, conditions), forward(x, t, c)


NETWORKS: dict[str, Network] = {
    "unet": Network(UNet, UNetConfig, conditional=True),
    "seed": Network(SeedUNet, SeedUNetConfig),
    "vae": Network(Autoencoder, AutoencoderConfig),  # not a denoiser: the image ↔ latent map of latent diffusion
}


def registered_networks() -> dict[str, Network]:
    """The built-in networks plus every installed `kneegen.networks` plugin (built-ins win)."""
    plugins = {ep.name: ep for ep in entry_points(group=NETWORK_GROUP) if ep.name not in NETWORKS}
    loaded = {}
    for name, ep in plugins.items():
        try:
            network = ep.load()
        except Exception as error:  # a broken plugin is the plugin's author's to fix, not a crash
            raise KneegenError(f"network plugin {name!r} ({ep.value}) failed to load: {error}") from None
        if not isinstance(network, Network):
            raise KneegenError(f"network plugin {name!r} ({ep.value}) is not a kneegen.engine.network.Network")
        loaded[name] = network
    return {**loaded, **NETWORKS}


def network_settings(model: ModelConfig, source: str = "config") -> tuple[Network, Any]:
    """The network `model.arch` names and its settings, read from `model.<arch>` and checked."""
    known = registered_networks()
    if model.arch not in known:
        raise KneegenError(f"{source}: model.arch = {model.arch!r} is not one of {', '.join(sorted(known))}")
    network = known[model.arch]
    settings = from_dict(network.settings, model.sections.get(model.arch, {}), source, prefix=f"model.{model.arch}.")
    try:
        settings.check()
    except KneegenError as error:
        raise KneegenError(f"{source}: {error}") from None
    return network, settings


def with_network_defaults(config: RunConfig, source: str = "config") -> RunConfig:
    """The config with its network's section complete (defaults filled in), after checking it:
    what a run dir and a checkpoint record, so a later default change cannot alter a run."""
    _, settings = network_settings(config.model, source)
    sections = {**config.model.sections, config.model.arch: dataclasses.asdict(settings)}
    return dataclasses.replace(config, model=dataclasses.replace(config.model, sections=sections))


def build_network(model: ModelConfig, image_shape: tuple[int, int], image_channels: int = 1) -> nn.Module:
    """The network for `model`, after checking that H and W survive every downsampling."""
    network, settings = network_settings(model)
    check_image_size(model, image_shape)
    if not model.conditions:
        return network.module(settings, image_channels)
    if not network.conditional:
        conditional = ", ".join(name for name, known in registered_networks().items() if known.conditional)
        raise KneegenError(
            f"model.arch = {model.arch} takes no conditions, but model.conditions = {model.conditions}: "
            f"use a network that does ({conditional}), or drop model.conditions"
        )
    return network.module(settings, image_channels, conditions=model.conditions)


def size_multiple(model: ModelConfig) -> int:
    """H and W must be multiples of this for the skips to line up on the way back up."""
    return network_settings(model)[1].size_multiple()


def check_image_size(model: ModelConfig, image_shape: tuple[int, int]) -> None:
    multiple = size_multiple(model)
    height, width = image_shape
    if height % multiple or width % multiple:
        fit = f"{max(1, round(height / multiple)) * multiple}x{max(1, round(width / multiple)) * multiple}"
        raise KneegenError(
            f"image size {height}x{width} cannot be downsampled by model.arch={model.arch} "
            f"(needs multiples of {multiple}): prepare the data with --size {fit}, or change "
            f"the network's settings under model.{model.arch}"
        )
