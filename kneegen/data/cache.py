"""The prepared-data cache: one memory-mapped image array and a JSON manifest.

Images are stored split by split (train, val, then test), so each split is a contiguous,
zero-copy view of the memory map and training never decodes an image file again. Pixels are
uint8, or uint16 when a source had 16 bits.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kneegen.data.conditions import condition_table, select_conditions
from kneegen.data.disk import is_disk_full
from kneegen.errors import KneegenError

IMAGES_FILE = "images.npy"
MANIFEST_FILE = "manifest.json"
CACHE_FORMAT = "kneegen-cache"
STAGING_PREFIX, STAGING_SUFFIX = ".kneegen.", ".partial"  # the hidden folder a new cache is written into first
REPLACING = ".kneegen.replacing.json"  # the old manifest, while a new cache's files move in
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

    def split_conditions(self, name: str, conditions: list[str]) -> np.ndarray | None:
        """(N, K) float32 conditions of a split's images (NaN where unknown, see
        kneegen/data/conditions.py), columns in the order of `conditions`; None if none asked."""
        if not conditions:
            return None
        start, stop = self.manifest["split_ranges"].get(name, (0, 0))
        return select_conditions(condition_table(self.manifest), conditions)[start:stop]

    def split_8bit(self, name: str) -> np.ndarray:
        """A split as PNGs, Inception and the pixel metrics see it (see `eight_bit`)."""
        return eight_bit(self.split(name))


def eight_bit(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels as they are (a view); uint16 ones with the low byte dropped (a copy)."""
    if pixels.dtype == np.uint8:
        return pixels
    return (pixels >> 8).astype(np.uint8)


def content_key(cache: PreparedData) -> str:
    """16 hex digits that change whenever the cache is prepared again: the image array's size and
    modification time, and the manifest. What is derived from a cache (FID features, latents)
    records it, so it is never paired with other images."""
    images = (cache.root / IMAGES_FILE).stat()
    digest = hashlib.sha1(f"{images.st_size}\n{images.st_mtime_ns}\n".encode())
    digest.update((cache.root / MANIFEST_FILE).read_bytes())
    return digest.hexdigest()[:16]


def is_cache(root: Path) -> bool:
    return (root / MANIFEST_FILE).is_file()


def is_replaceable(root: Path) -> bool:
    """A cache, or one whose replacement a crash cut short (its old manifest set aside)."""
    return is_cache(root) or (root / REPLACING).is_file()


def staging_folders(root: Path) -> list[Path]:
    """The hidden folders `write_cache` stages a new cache in (left behind only by a killed prepare)."""
    return [path for path in root.glob(f"{STAGING_PREFIX}*{STAGING_SUFFIX}") if path.is_dir()]


def open_cache(root: Path) -> PreparedData:
    """Open a prepared data dir, or say how to make one."""
    if root.is_file():
        raise KneegenError(
            f"data dir {root} is a file, not a folder: give the folder that holds {MANIFEST_FILE} and {IMAGES_FILE}"
            + (f" ({root.parent})" if root.name in (MANIFEST_FILE, IMAGES_FILE) else "")
        )
    if not root.is_dir():
        raise KneegenError(f"data dir {root} not found: run `kneegen prepare SRC --out {root}` first (or --phantom N)")
    if not is_cache(root):
        raise KneegenError(
            f"{root} holds no prepared data ({MANIFEST_FILE} missing): run `kneegen prepare` on it first"
        )
    try:
        manifest = json.loads((root / MANIFEST_FILE).read_text())
    except (ValueError, UnicodeDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        raise KneegenError(
            f"{root / MANIFEST_FILE} is damaged or not a kneegen cache manifest: prepare the data again "
            f"(kneegen prepare SRC --out {root} --overwrite)"
        )
    again = f"prepare the data again (kneegen prepare SRC --out {root} --overwrite)"
    version = manifest.get("version")
    if isinstance(version, int) and version > CACHE_VERSION:
        raise KneegenError(
            f"{root / MANIFEST_FILE} has cache version {version}, newer than this kneegen understands "
            f"({CACHE_VERSION}): upgrade kneegen, or {again}"
        )
    try:
        images = np.load(root / IMAGES_FILE, mmap_mode="r")
    except (OSError, ValueError, EOFError):
        raise KneegenError(f"{root / IMAGES_FILE} is missing or damaged: {again}") from None
    if images.dtype not in (np.uint8, np.uint16) or not matches_manifest(images, manifest):
        raise KneegenError(f"{root / IMAGES_FILE} does not match {MANIFEST_FILE}: {again}")
    return PreparedData(root, images, manifest)


def open_trained_on(data: str, checkpoint: Path, flag: str = "") -> PreparedData:
    """The prepared data dir a checkpoint's run recorded (`open_cache` names any miss but the one
    `refuse_relative_miss` explains)."""
    refuse_relative_miss(data, checkpoint, flag)
    return open_cache(Path(data))


def refuse_relative_miss(data: str, recorded_in: Path, flag: str = "") -> None:
    """A relative data dir in a run's files is relative to the folder the training ran in, so from
    another folder the data is there but not found: say that, rather than asking to prepare data
    the user already has."""
    root = Path(data)
    if root.is_absolute() or root.exists():
        return
    ways = [f"give {flag} DIR", "run this from that folder"] if flag else ["run this from that folder"]
    raise KneegenError(
        f"{recorded_in} trained on the data dir {data}, relative to the folder its training ran in, and not found "
        f"from {Path.cwd()}: {' or '.join(ways)}"
    )


def matches_manifest(images: np.ndarray, manifest: dict[str, Any]) -> bool:
    """Whether the (N, H, W) array is the one the manifest describes: its split ranges cover it
    end to end, train then val then test, it has a record per slice, and its size and depth are
    the manifest's."""
    ranges = manifest.get("split_ranges")
    if images.ndim != 3 or not isinstance(ranges, dict) or not {"train", "val"} <= ranges.keys():
        return False
    records = manifest.get("slices", images)  # the conditions and the summary read them
    if not isinstance(records, (list, np.ndarray)) or len(records) != len(images):
        return False
    start = 0
    for name in ("train", "val", "test"):
        span = ranges.get(name, [start, start])
        if not (isinstance(span, list) and len(span) == 2 and span[0] == start and type(span[1]) is int):
            return False
        if span[1] < start:
            return False
        start = span[1]
    described = {"image_shape": list(images.shape[1:]), "dtype": str(images.dtype)}
    return start == len(images) and all(manifest.get(key, value) == value for key, value in described.items())


def write_cache(root: Path, images: np.ndarray, manifest: dict[str, Any]) -> None:
    """Write the new cache into a hidden folder inside `root`, then move its two files in.

    A cache being replaced stays whole until the new one is complete (a full disk or a crash
    while writing leaves it untouched); only then does its manifest step aside (as REPLACING, so
    a crash in the moves leaves a folder `--overwrite` still knows as a cache), the new array
    and finally the new manifest move in, so a manifest never pairs with pixels it does not
    describe. Inside `root`, not beside it: the moves are renames on one file system even where
    `root` is a mount point or a link to another disk, so they cannot fail half-way. Staging
    folders a killed prepare left behind are removed first.
    """
    root.mkdir(parents=True, exist_ok=True)
    for left in staging_folders(root):
        shutil.rmtree(left, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, suffix=STAGING_SUFFIX, dir=root))
    try:
        np.save(staging / IMAGES_FILE, images)
        manifest = {"format": CACHE_FORMAT, "version": CACHE_VERSION, **manifest}
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
        if (root / MANIFEST_FILE).exists():
            os.replace(root / MANIFEST_FILE, root / REPLACING)
        os.replace(staging / IMAGES_FILE, root / IMAGES_FILE)
        os.replace(staging / MANIFEST_FILE, root / MANIFEST_FILE)
        (root / REPLACING).unlink(missing_ok=True)
    except OSError as error:
        if is_disk_full(error):  # a failed write names no file: the one-line report names the cache
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(root)) from error
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
