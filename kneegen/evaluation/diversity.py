"""Diversity: mean pairwise MS-SSIM within a set of images (Odena et al. 2017's use of it).

Two unrelated slices score low, two near-copies score near 1. A model that collapses onto a
few images has a mean pairwise MS-SSIM well above that of real held-out slices; the two numbers
are meant to be read side by side.

MS-SSIM through torchmetrics (the `eval` extra), on [0, 1] images with `normalize="relu"`
(negative contrast terms at coarse scales would otherwise make fractional powers NaN). The
standard setting (Wang et al. 2003: 5 scales, 11-pixel Gaussian window, σ 1.5) needs images
of at least 176 pixels a side in torchmetrics' check, so smaller images (64², 32²) use 3 scales
with a 7-pixel window of σ 1.0 and the first three standard weights rescaled to sum to 1;
that setting works from 28 pixels up. Numbers from the two settings are not comparable; the
report says which one was used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kneegen.engine.ssim import MS_SSIM_WEIGHTS
from kneegen.errors import KneegenError

STANDARD_BETAS = MS_SSIM_WEIGHTS
MAX_PAIRS = 2000  # more pairs than this are a fixed random subset of them
PAIR_SEED = 0
PAIR_BATCH = 256


@dataclass(frozen=True)
class MsSsimSetting:
    kernel_size: int
    sigma: float
    betas: tuple[float, ...]

    def describe(self) -> str:
        return f"{len(self.betas)} scales, {self.kernel_size}px window, sigma {self.sigma}"

    def fits(self, height: int, width: int) -> bool:
        """torchmetrics' own size check: side // (scales − 1)² > window − 1."""
        divisor = max(1, len(self.betas) - 1) ** 2
        return min(height, width) // divisor > self.kernel_size - 1 and min(height, width) >= 2 ** len(self.betas)


STANDARD = MsSsimSetting(11, 1.5, STANDARD_BETAS)
SMALL = MsSsimSetting(7, 1.0, tuple(beta / sum(STANDARD_BETAS[:3]) for beta in STANDARD_BETAS[:3]))


def ms_ssim_setting(height: int, width: int) -> MsSsimSetting:
    """The standard 5-scale setting where it fits, else the 3-scale one for small images."""
    for setting in (STANDARD, SMALL):
        if setting.fits(height, width):
            return setting
    raise KneegenError(f"images of {height}x{width} are too small for MS-SSIM: it needs at least 28 pixels a side")


def ms_ssim_available() -> bool:
    """Whether torchmetrics (the `eval` extra) can be imported."""
    try:
        import torchmetrics.functional.image  # noqa: F401
    except ImportError:
        return False
    return True


def mean_pairwise_ms_ssim(images: np.ndarray, max_pairs: int = MAX_PAIRS, seed: int = PAIR_SEED) -> float:
    """Mean MS-SSIM over pairs of distinct images of (N, H, W) uint8 (all pairs, or `max_pairs`)."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as ms_ssim

    setting = ms_ssim_setting(*images.shape[1:])
    first, second = image_pairs(len(images), max_pairs, seed)
    x = torch.from_numpy(np.array(images)).float().div(255.0).unsqueeze(1)  # (N, 1, H, W) in [0, 1]
    scores = []
    for start in range(0, len(first), PAIR_BATCH):
        i, j = first[start : start + PAIR_BATCH], second[start : start + PAIR_BATCH]
        scores.append(
            ms_ssim(
                x[i],
                x[j],
                kernel_size=setting.kernel_size,
                sigma=setting.sigma,
                betas=setting.betas,
                data_range=1.0,
                normalize="relu",
                reduction="none",
            )
        )
    return float(torch.cat(scores).double().mean())


def image_pairs(count: int, max_pairs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (i, j), i < j: every pair, or `max_pairs` of them drawn without repeats."""
    if count < 2:
        raise ValueError(f"pairwise MS-SSIM needs at least 2 images, got {count}")
    first, second = np.triu_indices(count, k=1)
    if len(first) > max_pairs:
        keep = np.sort(np.random.default_rng(seed).choice(len(first), max_pairs, replace=False))
        first, second = first[keep], second[keep]
    return torch.from_numpy(first), torch.from_numpy(second)
