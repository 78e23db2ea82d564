"""The choices the commands' `--help` lists, read from the registries and config types, so a
plugin sampler or a new device shows up without editing any help text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import get_args

from kneegen.config import DeviceName, Precision, Spacing
from kneegen.engine.samplers import sampler_names


def one_of(choices: Sequence[str]) -> str:
    """("a", "b", "c") → "a, b or c"."""
    return f"{', '.join(choices[:-1])} or {choices[-1]}" if len(choices) > 1 else "".join(choices)


DEVICES = one_of(get_args(DeviceName))
PRECISIONS = one_of(get_args(Precision))
SPACINGS = one_of(get_args(Spacing))


def sampler_help() -> str:
    return f"{one_of(sampler_names())}; default from the run's config."
