"""A run config's plugin choices checked against the installed registries.

The network (`model.arch` and its section) and the sampler may come from other packages, so
config.py cannot check them; every entry point that takes a config passes it through here
before it writes or trains anything.
"""

from __future__ import annotations

from kneegen.config import RunConfig
from kneegen.engine.network import with_network_defaults
from kneegen.engine.samplers import get_sampler
from kneegen.errors import KneegenError


def resolve_plugins(config: RunConfig, source: str) -> RunConfig:
    """The config with its network's settings complete, once the network and sampler are known."""
    try:
        get_sampler(config.sample.sampler)
    except KneegenError as error:
        raise KneegenError(f"{source}: sample.sampler: {error}") from None
    return with_network_defaults(config, source)
