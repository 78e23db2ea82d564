"""The one mapping between stored pixels and the network's [-1, 1] range."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def to_model_range(pixels: np.ndarray, device: torch.device) -> Tensor:
    """(B, H, W) unsigned integers → (B, 1, H, W) float32 in [-1, 1], scaled by the dtype's maximum."""
    scale = float(np.iinfo(pixels.dtype).max)
    images = torch.from_numpy(np.array(pixels)).to(device=device, dtype=torch.float32)  # copy: the cache is read-only
    return (images / scale * 2.0 - 1.0).unsqueeze(1)


def to_uint8(images: Tensor) -> np.ndarray:
    """(B, 1, H, W) in [-1, 1] → (B, H, W) uint8, clamped: what image files hold."""
    scaled = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round()
    return scaled.squeeze(1).to(torch.uint8).cpu().numpy()
