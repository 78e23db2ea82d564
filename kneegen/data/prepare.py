"""A folder of slice images → the cache training reads, split by patient.

Neighbouring slices of one knee are near-duplicates, so the split is by patient (parsed from
AKOA names): a patient is never in two splits. Files whose names carry no patient id each
count as their own group, which is the best that can be done for them.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from kneegen.data.akoa import parse_akoa_name
from kneegen.data.cache import SPLITS, is_cache, write_cache
from kneegen.errors import KneegenError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


@dataclass
class Slice:
    path: Path
    patient: str
    side: str | None
    slice_index: int | None


@dataclass
class PrepareSummary:
    images: int
    patients: int
    sides: dict[str, int]
    split_images: dict[str, int]
    split_patients: dict[str, int]
    image_shape: tuple[int, int]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def find_images(src: Path) -> list[Path]:
    """Every PNG/JPG under `src`, in a stable order."""
    if not src.is_dir():
        raise KneegenError(f"source folder {src} not found: give a folder of PNG/JPG slices, or use --phantom N")
    paths = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise KneegenError(f"no PNG/JPG images found in {src}: point kneegen prepare at the folder of slices")
    return paths


def describe(path: Path, src: Path) -> Slice:
    """Patient and side from the AKOA name; otherwise the file is its own patient."""
    parsed = parse_akoa_name(path.name)
    if parsed is None:
        return Slice(path, f"file:{path.relative_to(src)}", None, None)
    return Slice(path, parsed.patient, parsed.side, parsed.slice_index)


def split_patients(patients: list[str], val_fraction: float, seed: int) -> dict[str, str]:
    """Patient → split, deterministic for a seed; both splits get at least one patient."""
    if not 0.0 < val_fraction < 1.0:
        raise KneegenError(f"--val-fraction {val_fraction}: must be between 0 and 1 (e.g. 0.2)")
    unique = sorted(set(patients))
    if len(unique) < 2:
        raise KneegenError(f"only {len(unique)} patient found: a patient-level split needs at least 2")
    random.Random(seed).shuffle(unique)
    n_val = min(len(unique) - 1, max(1, round(val_fraction * len(unique))))
    return {patient: ("val" if i < n_val else "train") for i, patient in enumerate(unique)}


def load_slice(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Decode one file as 8-bit grayscale, resized to (H, W)."""
    with Image.open(path) as image:
        gray = image.convert("L")
        if gray.size != (size[1], size[0]):
            gray = gray.resize((size[1], size[0]), Image.Resampling.BICUBIC)
        return np.asarray(gray, dtype=np.uint8)


def prepare_folder(
    src: Path,
    out: Path,
    size: tuple[int, int],
    val_fraction: float,
    seed: int,
    overwrite: bool,
    on_image: Callable[[], None] | None = None,
) -> PrepareSummary:
    """Decode, split by patient and cache every readable slice of `src` into `out`."""
    refuse_to_clobber(out, overwrite)
    slices = [describe(path, src) for path in find_images(src)]

    # 1. Decode; unreadable files are skipped and reported, not fatal.
    decoded, kept, skipped = [], [], []
    for item in slices:
        try:
            decoded.append(load_slice(item.path, size))
            kept.append(item)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            skipped.append((str(item.path), f"unreadable image ({exc.__class__.__name__})"))
        if on_image is not None:
            on_image()
    if not kept:
        raise KneegenError(f"none of the {len(slices)} image files in {src} could be read: check the files")

    # 2. Split by patient and order the cache split by split.
    assignment = split_patients([s.patient for s in kept], val_fraction, seed)
    order = sorted(range(len(kept)), key=lambda i: (SPLITS.index(assignment[kept[i].patient]), i))
    images = np.stack([decoded[i] for i in order])  # (N, H, W)
    records = [
        {
            "path": str(kept[i].path.relative_to(src)),
            "patient": kept[i].patient,
            "side": kept[i].side,
            "slice": kept[i].slice_index,
            "split": assignment[kept[i].patient],
        }
        for i in order
    ]
    counts = Counter(r["split"] for r in records)
    ranges, start = {}, 0
    for name in SPLITS:
        ranges[name] = [start, start + counts[name]]
        start += counts[name]

    # 3. Write the cache with everything a later reader needs to trust it.
    write_cache(
        out,
        images,
        {
            "source": str(src.resolve()),
            "image_shape": list(size),
            "val_fraction": val_fraction,
            "seed": seed,
            "split_ranges": ranges,
            "patients": assignment,
            "slices": records,
            "skipped": [{"path": p, "reason": r} for p, r in skipped],
        },
    )
    return PrepareSummary(
        images=len(records),
        patients=len(assignment),
        sides=dict(Counter(r["side"] or "unknown" for r in records)),
        split_images={name: counts[name] for name in SPLITS},
        split_patients={name: sum(1 for s in assignment.values() if s == name) for name in SPLITS},
        image_shape=size,
        skipped=skipped,
    )


def refuse_to_clobber(out: Path, overwrite: bool, flag: str = "--out") -> None:
    """Never replace a user's folder by accident; `flag` is the option that named `out`."""
    if out.is_file():
        raise KneegenError(f"{out} is a file: choose a folder for {flag}")
    if overwrite or not out.exists():
        return
    if is_cache(out):
        raise KneegenError(f"{out} already holds prepared data: pass --overwrite to replace it, or choose another {flag}")
    if any(out.iterdir()):
        raise KneegenError(f"{out} exists and is not empty: choose another {flag}, or pass --overwrite")
