"""The one mapping between stored pixels and the network's [-1, 1] range."""

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
