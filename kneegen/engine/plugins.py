"""A run config's plugin choices checked against the installed registries.

The network (`model.arch` and its section) and the sampler may come from other packages, so
config.py cannot check them; every entry point that takes a config passes it through here
before it writes or trains anything.
"""

from __future__ import annotations

from typing import Any

from kneegen.config import ModelConfig, RunConfig, from_dict, set_dotted
from kneegen.engine.network import network_settings, with_network_defaults
from kneegen.engine.samplers import get_sampler
from kneegen.errors import KneegenError

COMMAND_LINE = "the command line"  # the source config.py names for --set values and flags


def resolve_plugins(config: RunConfig, source: str) -> RunConfig:
    """The config with its network's settings complete, once the network and sampler are known."""
    check_sampler(config.sample.sampler, source)
    return with_network_defaults(config, source)


def check_sampler(name: str, source: str) -> None:
    try:
        get_sampler(name)
    except KneegenError as error:
        raise KneegenError(f"{source}: sample.sampler: {error}") from None


def check_overrides(overrides: dict[str, Any], arch: str) -> None:
    """The --set values for the sampler, model.arch and the network's section (`arch`'s) checked
    on their own (unknown name or key, type), so that a bad one is blamed on the command line, as
    config.py blames a bad value of any other key."""
    if "sample.sampler" in overrides:
        check_sampler(overrides["sample.sampler"], COMMAND_LINE)
    if "model.arch" in overrides:
        network_settings(ModelConfig(arch=overrides["model.arch"]), COMMAND_LINE)
    prefix = f"model.{arch}."
    section: dict[str, Any] = {}
    for dotted, value in overrides.items():
        if dotted.startswith(prefix):
            set_dotted(section, dotted.removeprefix(prefix), value, COMMAND_LINE)
    if section:
        network, _ = network_settings(ModelConfig(arch=arch))
        from_dict(network.settings, section, COMMAND_LINE, prefix=prefix)
