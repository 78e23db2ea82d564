"""Bring a slice of any size to the cache's (H, W), keeping its bit depth.

The original system stretched 260×228 slices to 256×256, which squashes the knee by 12 %. The
default here keeps the aspect ratio and pads with black (the background of MRI); `crop` fills
the frame and cuts the long side instead; `stretch` reproduces the original behaviour.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from PIL import Image

Fit = Literal["pad", "crop", "stretch"]
FITS: tuple[Fit, ...] = ("pad", "crop", "stretch")


def fit_to_size(pixels: np.ndarray, size: tuple[int, int], fit: Fit = "pad") -> np.ndarray:
    """(h, w) uint8 or uint16 → (H, W) of the same dtype, resized bicubically as `fit` says."""
    height, width = size
    h, w = pixels.shape
    if (h, w) == (height, width):
        return pixels
    if fit == "stretch":
        return resize(pixels, (height, width))
    # Scale so the whole slice fits (pad) or the whole frame is covered (crop).
    pick = min if fit == "pad" else max
    scale = pick(height / h, width / w)
    scaled = resize(pixels, (max(1, round(h * scale)), max(1, round(w * scale))))
    return center_on_canvas(scaled, (height, width))


def resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic resize in float, rounded and clipped back to the input's integer range."""
    if pixels.shape == size:
        return pixels
    image = Image.fromarray(pixels.astype(np.float32), mode="F")
    resized = np.asarray(image.resize((size[1], size[0]), Image.Resampling.BICUBIC))
    top = np.iinfo(pixels.dtype).max
    return np.clip(np.rint(resized), 0, top).astype(pixels.dtype)


def center_on_canvas(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Center `pixels` on a black (H, W) canvas, cutting whatever overhangs."""
    canvas = np.zeros(size, dtype=pixels.dtype)
    (h, w), (height, width) = pixels.shape, size
    src_top, dst_top = max(0, (h - height) // 2), max(0, (height - h) // 2)
    src_left, dst_left = max(0, (w - width) // 2), max(0, (width - w) // 2)
    rows, cols = min(h, height), min(w, width)
    canvas[dst_top : dst_top + rows, dst_left : dst_left + cols] = pixels[
        src_top : src_top + rows, src_left : src_left + cols
    ]
    return canvas
