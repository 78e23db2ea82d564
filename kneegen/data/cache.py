"""The prepared-data cache: one memory-mapped image array and a JSON manifest.

Images are stored split by split (train, val, then test), so each split is a contiguous,
zero-copy view of the memory map and training never decodes an image file again. Pixels are
uint8, or uint16 when a source had 16 bits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kneegen.errors import KneegenError

IMAGES_FILE = "images.npy"
MANIFEST_FILE = "manifest.json"
CACHE_FORMAT = "kneegen-cache"
CACHE_VERSION = 2  # 2: test split, uint16 pixels, options and source sizes in the manifest


@dataclass
class PreparedData:
    root: Path
    images: np.ndarray  # (N, H, W) memory-mapped, ordered by split
    manifest: dict[str, Any]

    @property
    def image_shape(self) -> tuple[int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def split(self, name: str) -> np.ndarray:
        """The images of one split as a view of the memory map (empty if the cache has none)."""
        start, stop = self.manifest["split_ranges"].get(name, (0, 0))
        return self.images[start:stop]


    def split_8bit(self, name: str) -> np.ndarray:
        """A split as PNGs, Inception and the pixel metrics see it (see `eight_bit`)."""
        return eight_bit(self.split(name))


def eight_bit(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels as they are (a view); uint16 ones with the low byte dropped (a copy)."""
    if pixels.dtype == np.uint8:
        return pixels
    return (pixels >> 8).astype(np.uint8)


def is_cache(root: Path) -> bool:
    return (root / MANIFEST_FILE).is_file()


def open_cache(root: Path) -> PreparedData:
    """Open a prepared data dir, or say how to make one."""
    if not root.is_dir():
        raise KneegenError(f"data dir {root} not found: run `kneegen prepare SRC --out {root}` first (or --phantom N)")
    if not is_cache(root):
        raise KneegenError(f"{root} holds no prepared data ({MANIFEST_FILE} missing): run `kneegen prepare` on it first")
    manifest = json.loads((root / MANIFEST_FILE).read_text())
    if manifest.get("format") != CACHE_FORMAT:
        raise KneegenError(f"{root / MANIFEST_FILE} is not a kneegen cache manifest: prepare the data again")
    images = np.load(root / IMAGES_FILE, mmap_mode="r")
    return PreparedData(root, images, manifest)


def write_cache(root: Path, images: np.ndarray, manifest: dict[str, Any]) -> None:
    """Write the array, then the manifest last, so a cache with a manifest is complete; a cache
    being replaced loses its old manifest first, so a crash mid-write never pairs it with new pixels."""
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST_FILE).unlink(missing_ok=True)
    np.save(root / IMAGES_FILE, images)
    manifest = {"format": CACHE_FORMAT, "version": CACHE_VERSION, **manifest}
    (root / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
