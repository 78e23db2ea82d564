"""contact_sheet.png: random slices of each split of a prepared cache, to eyeball what training
will see before spending time on it."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from kneegen.data.cache import eight_bit, open_cache
from kneegen.data.splits import SPLITS
from kneegen.viz import image_grid, save_png

CONTACT_SHEET = "contact_sheet.png"
TILES_PER_SPLIT = 8


def write_contact_sheet(out: Path, seed: int) -> Path:
    """One row per non-empty split, written into the cache folder `out`."""
    data = open_cache(out)
    rng = random.Random(seed)
    tiles = []
    for split in SPLITS:
        images = data.split(split)
        if len(images) == 0:
            continue
        picks = sorted(rng.sample(range(len(images)), min(TILES_PER_SPLIT, len(images))))
        row = list(eight_bit(images[picks]))
        tiles += row + [np.zeros_like(row[0])] * (TILES_PER_SPLIT - len(row))
    return save_png(image_grid(tiles, columns=TILES_PER_SPLIT), out / CONTACT_SHEET)
