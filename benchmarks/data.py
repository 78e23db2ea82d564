"""Data speed, side by side in one run: preparing slices, and feeding training from the cache.

    .venv/bin/python benchmarks/data.py                    # 2,000 AKOA-like slices, 256²
    .venv/bin/python benchmarks/data.py --images 500 --size 128

1. `prepare` time per 1,000 slices, one process vs every core. The slices are phantom knees
   saved as AKOA stores them: 260×228 RGB PNGs with equal channels.
2. Training-batch read rate at the cache size: what `train_epoch` does (shuffled indices of
   the memory-mapped cache → float tensor in [-1, 1]) vs what the original did each epoch
   (open the PNG with PIL, grayscale, resize to the training size, to a tensor).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kneegen.data.cache import open_cache
from kneegen.data.options import PrepareOptions
from kneegen.data.phantom import write_phantom
from kneegen.data.prepare import prepare_folder
from kneegen.engine.pixels import to_model_range


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="slices to generate and prepare")
    parser.add_argument("--size", type=int, default=256, help="cache size (square)")
    parser.add_argument("--batch", type=int, default=32, help="training batch size")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        src = write_akoa_like_pngs(Path(tmp) / "slices", args.images)
        print(f"{args.images} slices of 260x228 RGB PNG -> {args.size}x{args.size}, {cores} cores, torch 1 thread")

        # 1. Prepare: one process vs one per core.
        for workers in sorted({1, cores}):
            seconds = time_prepare(src, Path(tmp) / f"cache{workers}", args.size, workers)
            per_thousand = 1000 * seconds / args.images
            print(f"prepare, {workers} process(es): {seconds:6.1f} s total, {per_thousand:6.2f} s per 1,000 images")

        # 2. Feeding training: cache batches vs PNG decoding, same indices.
        cache = open_cache(Path(tmp) / f"cache{cores}").split("train")
        png_paths = sorted(src.glob("*.png"))
        cached = rate(lambda index: to_model_range(cache[np.sort(index)], torch.device("cpu")), len(cache), args.batch)
        decoded = rate(lambda index: decode_pngs([png_paths[i] for i in index], args.size), len(png_paths), args.batch)
        print(f"training batches from the cache: {cached:9.0f} images/s")
        print(f"decoding PNGs with PIL each time: {decoded:9.0f} images/s")
        print(f"cache / PNG: {cached / decoded:.1f}x")


def write_akoa_like_pngs(folder: Path, n_images: int) -> Path:
    """Phantom slices with AKOA names, re-saved as RGB like the real dataset's files."""
    write_phantom(folder, n_images, seed=0)
    for path in folder.glob("*.png"):
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        rgb.save(path)
    return folder


def time_prepare(src: Path, out: Path, size: int, workers: int) -> float:
    started = time.perf_counter()
    prepare_folder(src, out, PrepareOptions(size=(size, size), workers=workers))
    return time.perf_counter() - started


def decode_pngs(paths: list[Path], size: int) -> torch.Tensor:
    """The original's per-epoch path: PIL decode, grayscale, resize, scale to [-1, 1]."""
    tiles = []
    for path in paths:
        with Image.open(path) as image:
            gray = image.convert("L").resize((size, size), Image.Resampling.BILINEAR)
        tiles.append(torch.from_numpy(np.asarray(gray, dtype=np.float32)))
    return (torch.stack(tiles) / 127.5 - 1.0).unsqueeze(1)


def rate(read_batch, n_images: int, batch: int, seconds: float = 3.0) -> float:
    """Images per second of `read_batch(indices)` over shuffled batches, for about `seconds`."""
    generator = np.random.default_rng(0)
    read_batch(generator.choice(n_images, batch, replace=False))  # warm-up: page cache, allocator
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        read_batch(generator.choice(n_images, batch, replace=False))
        done += batch
    return done / (time.perf_counter() - started)


if __name__ == "__main__":
    main()
