"""Everything kneegen writes as pictures: grayscale PNGs, grids, GIFs and loss plots.

Images are written as 8-bit grayscale files, never through a colormap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

from kneegen.errors import naming
from kneegen.provenance import WRITER

GRID_PADDING = 2  # pixels of black between tiles
GIF_FRAME_MS = 120
GIF_LAST_FRAME_MS = 1500  # linger on the finished image


def save_png(pixels: np.ndarray, path: Path, text: dict[str, str] | None = None) -> Path:
    """Write (H, W) uint8 as a grayscale PNG, with optional text chunks (seed, sampler, …)."""
    info = PngImagePlugin.PngInfo()
    for key, value in {"software": WRITER, **(text or {})}.items():
        info.add_text(key, value)
    with naming(path):
        Image.fromarray(pixels, mode="L").save(path, pnginfo=info)
    return path


def image_grid(tiles: Sequence[np.ndarray], columns: int | None = None) -> np.ndarray:
    """Tile (H, W) images into one (rows·H, cols·W) image, row by row."""
    columns = columns or math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    height, width = tiles[0].shape
    pad = GRID_PADDING
    grid = np.zeros((rows * (height + pad) - pad, columns * (width + pad) - pad), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        grid[r * (height + pad) : r * (height + pad) + height, c * (width + pad) : c * (width + pad) + width] = tile
    return grid


def save_gif(frames: Sequence[np.ndarray], path: Path) -> Path:
    """An animated grayscale GIF that loops and holds its last frame."""
    images = [Image.fromarray(frame, mode="L") for frame in frames]
    durations = [GIF_FRAME_MS] * (len(images) - 1) + [GIF_LAST_FRAME_MS]
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0, comment=WRITER)
    return path


def plot_losses(records: list[dict[str, Any]], out_dir: Path) -> None:
    """The original's three plots: training loss, validation loss, and both overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    validated = [r for r in records if r["val_loss"] is not None]
    curves = {
        "train": ([r["epoch"] for r in records], [r["train_loss"] for r in records], "training loss"),
        "val": ([r["epoch"] for r in validated], [r["val_loss"] for r in validated], "validation loss"),
    }
    for name, (epochs, values, label) in curves.items():
        figure, axes = plt.subplots(figsize=(6, 4))
        axes.plot(epochs, values, marker="o", label=label)
        finish(axes, label)
        figure.savefig(out_dir / f"loss_{name}.png", dpi=100)
        plt.close(figure)
    figure, axes = plt.subplots(figsize=(6, 4))
    for epochs, values, label in curves.values():
        axes.plot(epochs, values, marker="o", label=label)
    finish(axes, "training and validation loss")
    figure.savefig(out_dir / "loss_overlay.png", dpi=100)
    plt.close(figure)


def finish(axes, title: str) -> None:  # type: ignore[no-untyped-def]
    axes.set_xlabel("epoch")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    axes.figure.tight_layout()
