"""Structural similarity (Wang et al. 2004) and its multi-scale form (Wang et al. 2003), per image.

Both the autoencoder's training loss and its reported reconstruction quality use these, so they are
written once, differentiable, for images in the model range [-1, 1] (data range 2). PSNR sits
beside them because it is reported with them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

WINDOW = 11  # the Gaussian window of the SSIM paper: 11 pixels, σ 1.5
WINDOW_SIGMA = 1.5
DATA_RANGE = 2.0  # images in [-1, 1]
C1, C2 = (0.01 * DATA_RANGE) ** 2, (0.03 * DATA_RANGE) ** 2  # the paper's K1 = 0.01, K2 = 0.03
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, finest scale first
MS_SSIM_FLOOR = 1e-4  # terms are cut here: x^w with w ≈ 0.04 has a gradient of ~w·x^(w−1), ~300 at this floor


def gaussian_window(device: torch.device) -> Tensor:
    """The separable window as a (1, 1, WINDOW) kernel summing to 1."""
    offsets = torch.arange(WINDOW, dtype=torch.float32, device=device) - (WINDOW - 1) / 2
    weights = torch.exp(-(offsets**2) / (2 * WINDOW_SIGMA**2))
    return (weights / weights.sum()).view(1, 1, WINDOW)


def blur(images: Tensor, window: Tensor) -> Tensor:
    """(B, C, H, W) → (B, C, H − 10, W − 10): the local weighted mean, valid positions only."""
    channels = images.shape[1]
    rows = window.view(1, 1, 1, WINDOW).expand(channels, 1, 1, WINDOW)
    columns = window.view(1, 1, WINDOW, 1).expand(channels, 1, WINDOW, 1)
    return F.conv2d(F.conv2d(images, rows, groups=channels), columns, groups=channels)


def ssim_parts(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(SSIM, contrast-structure) per image, each (B,): the means of the SSIM map and of its
    luminance-free part cs = (2σ_xy + C2) / (σ_x² + σ_y² + C2)."""
    window = gaussian_window(x.device)
    x, y = x.float(), y.float()
    mu_x, mu_y = blur(x, window), blur(y, window)
    var_x = blur(x * x, window) - mu_x**2
    var_y = blur(y * y, window) - mu_y**2
    cov = blur(x * y, window) - mu_x * mu_y
    contrast_structure = (2 * cov + C2) / (var_x + var_y + C2)
    luminance = (2 * mu_x * mu_y + C1) / (mu_x**2 + mu_y**2 + C1)
    return (luminance * contrast_structure).mean(dim=(1, 2, 3)), contrast_structure.mean(dim=(1, 2, 3))


def ssim(x: Tensor, y: Tensor) -> Tensor:
    """SSIM of each image pair, (B,); images (B, C, H, W) in [-1, 1], at least 11 pixels a side."""
    return ssim_parts(x, y)[0]


def ms_ssim_scales(height: int, width: int) -> int:
    """How many of the five scales fit: each halves the image, and the coarsest must still hold
    the 11-pixel window."""
    scales = 1
    while scales < len(MS_SSIM_WEIGHTS) and min(height, width) // 2**scales >= WINDOW:
        scales += 1
    return scales


def ms_ssim(x: Tensor, y: Tensor) -> Tensor:
    """Multi-scale SSIM of each image pair, (B,): contrast-structure at every scale but the
    coarsest, full SSIM there, combined with the paper's weights. Scales that do not fit (crops
    under 176 pixels) are left out and the weights of the rest renormalised; negative terms are
    cut at MS_SSIM_FLOOR (their fractional powers would not be real)."""
    scales = ms_ssim_scales(*x.shape[-2:])
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], device=x.device)
    weights = weights / weights.sum()
    terms = []
    for scale in range(scales):
        full, contrast_structure = ssim_parts(x, y)
        terms.append(full if scale == scales - 1 else contrast_structure)
        if scale < scales - 1:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    stacked = torch.stack(terms, dim=1).clamp(min=MS_SSIM_FLOOR)  # (B, scales)
    return torch.prod(stacked**weights, dim=1)


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Peak signal-to-noise ratio of each image pair in dB, (B,), for the data range 2."""
    mse = (x.float() - y.float()).pow(2).mean(dim=(1, 2, 3)).clamp(min=1e-12)
    return 10 * torch.log10(torch.full_like(mse, DATA_RANGE**2) / mse)
