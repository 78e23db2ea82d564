"""What a user asks a conditional model for: `--side`, `--position` and `--guidance` turned into
one row of conditions per image, checked against what the checkpoint was trained on."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from kneegen.config import MAX_GUIDANCE
from kneegen.data.conditions import SIDE_CODES
from kneegen.engine.trained import TrainedModel
from kneegen.errors import KneegenError

SIDE_NAMES = {code: name for name, code in SIDE_CODES.items()}


@dataclass(frozen=True)
class AskedConditions:
    """Per image, the conditions in the model's order (NaN = not asked), and the guidance w."""

    names: list[str]  # model.conditions
    values: np.ndarray  # (N, K) float32
    guidance: float

    def describe(self, row: int) -> dict[str, str]:
        """Image `row`'s conditions and guidance, as its PNG text and JSON record them."""
        info = {}
        for name, value in zip(self.names, self.values[row].tolist()):
            if math.isnan(value):
                continue
            # the shortest text that gives back the same float32, so --position redraws the image exactly
            info[name] = (
                SIDE_NAMES[value] if name == "side" else np.format_float_positional(np.float32(value), trim="-")
            )
        return {**info, "guidance": f"{self.guidance:g}"}


def ask_conditions(
    model: TrainedModel,
    count: int,
    side: str | None = None,
    position: str | None = None,
    guidance: float | None = None,
    positions: np.ndarray | None = None,
) -> AskedConditions | None:
    """The conditions of `count` images: `side` for all, `position` one value or a range `a-b`
    spread evenly over them (or `positions` given per image). None when nothing is asked, which
    samples a conditional model unconditionally; refused in one line when the checkpoint was not
    trained on what is asked."""
    names = model.config.model.conditions
    position_flag = "--position" if positions is None else "stack"
    asked = {"--side": side is not None, position_flag: position is not None or positions is not None}
    if not any(asked.values()):
        if guidance is not None:
            raise KneegenError("--guidance steers towards a condition: give --side and/or --position with it")
        return None
    for flag, name in (("--side", "side"), (position_flag, "position")):
        if asked[flag] and name not in names:
            trained = f"conditions {names}" if names else "no conditions"
            instead = "sample stack walks positions 0 → 1;" if flag == "stack" else f"drop {flag}, or"
            raise KneegenError(
                f"{model.source} was trained with {trained}, so it cannot be asked for a {name}: {instead} "
                f"use a checkpoint trained with model.conditions: [side, position]"
            )
    w = model.config.sample.guidance if guidance is None else check_guidance(guidance)
    values = np.full((count, len(names)), math.nan, dtype=np.float32)
    if side is not None:
        values[:, names.index("side")] = parse_side(side)
    if positions is None and position is not None:
        positions = parse_positions(position, count)
    if positions is not None:
        values[:, names.index("position")] = positions
    return AskedConditions(list(names), values, w)


def check_guidance(w: float) -> float:
    if not 0 <= w <= MAX_GUIDANCE:  # NaN fails both
        raise KneegenError(
            f"--guidance {w}: give a weight from 0 (unconditional) to {MAX_GUIDANCE:g}; 1 is plain conditional"
        )
    return w


def parse_side(text: str) -> float:
    code = SIDE_CODES.get(text.strip().lower())
    if code is None:
        raise KneegenError(f"--side {text}: choose left or right")
    return code


NUMBER = r"\s*(\d*\.?\d+(?:[eE][+-]?\d+)?)\s*"
POSITIONS = re.compile(f"^{NUMBER}(?:-{NUMBER})?$")  # "0.5", "1e-3", "0.3-0.7"


def parse_positions(text: str, count: int) -> np.ndarray:
    """ "0.5" → 0.5 for every image; "0.3-0.7" → `count` positions from 0.3 to 0.7, evenly spread."""
    match = POSITIONS.match(text)
    if match is None:
        raise KneegenError(f"--position {text}: give a number from 0 to 1, or a range such as 0.3-0.7")
    low = float(match[1])
    high = float(match[2]) if match[2] is not None else low
    if not (0 <= low <= 1 and 0 <= high <= 1):
        raise KneegenError(
            f"--position {text}: positions run from 0 (first slice of the stack) to 1 (last); give values in 0…1"
        )
    if count == 1 and high != low:
        raise KneegenError(f"--position {text}: a range is spread over several images; one image takes one position")
    return np.linspace(low, high, count, dtype=np.float32)
