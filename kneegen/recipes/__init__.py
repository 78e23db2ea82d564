"""Recommended training recipes, shipped with the package and chosen by the hardware.

A recipe that is right for a CPU with bf16 units (AMX, AVX512-BF16) is wrong for an fp32-only
one: the same minutes buy 2–3× more network work with bf16. Each recipe here was chosen by
measurement (benchmarks/quality.py; the table is in the README). `kneegen train` without
`--config` takes the one for the machine it runs on and says which; `--config NAME` takes one
by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kneegen.engine.device import Compute

RECIPES_DIR = Path(__file__).resolve().parent
SUFFIX = ".yaml"


def recipe_names() -> list[str]:
    return sorted(path.stem for path in RECIPES_DIR.glob(f"*{SUFFIX}"))


def recipe_path(name: str) -> Path:
    """The YAML file of the recipe `name` (no check: the config loader names a missing file)."""
    return RECIPES_DIR / f"{name}{SUFFIX}"


def recipe_for(compute: Compute) -> tuple[str, str] | None:
    """(recipe name, why) for a CPU; None on a GPU, where the built-in defaults apply."""
    if compute.device.type != "cpu":
        return None
    if compute.dtype == torch.bfloat16:
        return "cpu-bf16", "this CPU computes bf16 natively"
    return "cpu-fp32", "this CPU has no native bf16 (or fp32 was asked for)"
