"""What each cached slice says about itself: the knee's side and the slice's place in its stack.

These are the conditions a conditional model is trained on and asked for (`model.conditions`).
Both come from the manifest `prepare` writes, row for row with `images.npy`:
- side: 0 for a LEFT knee, 1 for a RIGHT one (AKOA names, DICOM laterality);
- position: the slice index normalised within its volume, (index − first) / (last − first) over
  the volume's slices in the cache, so 0 is the first slice of the stack and 1 the last.
A value that is not known (a PNG without an AKOA name, the one slice kept of a volume) is NaN: such images
train with that condition dropped, so they still teach the model what a knee looks like.
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import numpy as np

Condition = Literal["side", "position"]
CONDITIONS: tuple[str, ...] = get_args(Condition)  # the column order of every condition table
SIDE_CODES = {"left": 0.0, "right": 1.0}  # what `side` holds; NaN = unknown or dropped
UNKNOWN = math.nan


def condition_table(manifest: dict[str, Any]) -> np.ndarray:
    """(N, 2) float32 [side, position] of every cached slice, in cache order; NaN where unknown."""
    records = manifest["slices"]
    table = np.full((len(records), len(CONDITIONS)), UNKNOWN, dtype=np.float32)
    for row, record in enumerate(records):
        side = str(record.get("side") or "").lower()
        if side in SIDE_CODES:
            table[row, 0] = SIDE_CODES[side]
    for rows, indices in slices_by_volume(records).items():
        first, last = min(indices), max(indices)
        if last > first:
            table[list(rows), 1] = [(index - first) / (last - first) for index in indices]
    return table


def slices_by_volume(records: list[dict[str, Any]]) -> dict[tuple[int, ...], list[int]]:
    """(rows of one volume) → their slice indices, for every volume whose slices carry an index."""
    volumes: dict[str, tuple[list[int], list[int]]] = {}
    for row, record in enumerate(records):
        if record.get("slice") is None or record.get("volume") is None:
            continue
        rows, indices = volumes.setdefault(str(record["volume"]), ([], []))
        rows.append(row)
        indices.append(int(record["slice"]))
    return {tuple(rows): indices for rows, indices in volumes.values()}


def select_conditions(table: np.ndarray, conditions: list[str]) -> np.ndarray:
    """The columns of `table` a model is conditioned on, in the model's order: (N, K)."""
    return table[:, [CONDITIONS.index(name) for name in conditions]]
