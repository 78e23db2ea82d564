"""The one mapping between what a cache stores and what the network takes: pixels (unsigned
integers, (N, H, W)) in the [-1, 1] range, or latents (float, (N, C, h, w)) as they are."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def to_model_range(pixels: np.ndarray, device: torch.device) -> Tensor:
    """(B, H, W) unsigned integers → (B, 1, H, W) float32 in [-1, 1], scaled by the dtype's maximum."""
    scale = float(np.iinfo(pixels.dtype).max)
    writable = np.require(pixels, requirements=["C", "W"])  # copies only a read-only view of the cache
    images = torch.from_numpy(writable).to(device=device, dtype=torch.float32)
    return images.mul_(2.0 / scale).sub_(1.0).unsqueeze(1)  # in place: one pass over the batch, not three


def to_uint8(images: Tensor) -> np.ndarray:
    """(B, 1, H, W) in [-1, 1] → (B, H, W) uint8, clamped: what image files hold."""
    scaled = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round()
    return scaled.squeeze(1).to(torch.uint8).cpu().numpy()


def to_network_input(stored: np.ndarray, device: torch.device) -> Tensor:
    """A batch of a pixel cache (B, H, W) → (B, 1, H, W) in [-1, 1]; of a latent cache (B, C, h, w),
    already scaled to unit variance when it was written, → float32 as it is."""
    if np.issubdtype(stored.dtype, np.integer):
        return to_model_range(stored, device)
    return torch.from_numpy(np.asarray(stored, dtype=np.float32)).to(device)


def stored_shape(stored: np.ndarray) -> tuple[int, int, int]:
    """(C, H, W) of one item of a pixel cache (N, H, W) or a latent cache (N, C, h, w)."""
    return (1, *stored.shape[1:]) if stored.ndim == 3 else tuple(stored.shape[1:])  # type: ignore[return-value]


STD_IMAGES = 2048  # evenly spaced images measure the spread of a cache to ~0.1 %: no need to read all of it


def model_range_std(pixels: np.ndarray) -> float:
    """The standard deviation of a pixel cache's (N, H, W) images in the network's [-1, 1] range,
    from up to `STD_IMAGES` of them spread over the split, in float64: what the log-normal noise
    levels are centred on (`diffusion.lognormal_mean: auto`)."""
    sample = np.asarray(pixels[:: max(1, len(pixels) // STD_IMAGES)], dtype=np.float64)
    return float(sample.std() * 2.0 / np.iinfo(pixels.dtype).max)
