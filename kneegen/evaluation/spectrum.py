"""Radially averaged power spectra: a check for the grid artifacts a patch fold can leave.

A network that folds p×p pixels into channels (`model.unet.patch_size` p) and unfolds them at the end
can leave a pattern that repeats every p pixels: blocks that a look at the image shows and FID
barely sees. Its energy sits at the fold frequency, 1/p cycles per pixel, i.e. radius W/p in the
2-D spectrum of a W-pixel-wide image, and its harmonics. Comparing the mean radial power of
samples with that of real slices at that radius measures it: a ratio near 1 is clean; the
pattern shows as a ratio well above 1.
"""

from __future__ import annotations

import numpy as np


def radial_power(images: np.ndarray) -> np.ndarray:
    """(N, H, W) images in any range → (R,) mean power per integer radius of the centred
    spectrum, R = min(H, W) // 2 + 1 (radius in cycles per image along the shorter side).

    Each image is scaled to [0, 1] by its dtype's range and has its mean removed, so the
    spectra of sets with other brightness compare on structure alone."""
    x = np.asarray(images, np.float64)
    if np.issubdtype(np.asarray(images).dtype, np.integer):
        x = x / np.iinfo(np.asarray(images).dtype).max
    x = x - x.mean(axis=(1, 2), keepdims=True)
    power = (np.abs(np.fft.fftshift(np.fft.fft2(x), axes=(1, 2))) ** 2).mean(axis=0)  # (H, W)
    height, width = power.shape
    fy = (
        (np.arange(height) - height // 2) * min(height, width) / height
    )  # cycles per image, on the shorter side's scale
    fx = (np.arange(width) - width // 2) * min(height, width) / width
    radius = np.rint(np.hypot(fy[:, None], fx[None, :])).astype(int)
    bins = min(height, width) // 2 + 1
    keep = radius < bins
    totals = np.bincount(radius[keep], weights=power[keep], minlength=bins)
    counts = np.bincount(radius[keep], minlength=bins)
    return totals / np.maximum(counts, 1)


def fold_radius(side: int, patch: int) -> int:
    """The spectral radius of a pattern repeating every `patch` pixels across `side` pixels;
    the Nyquist radius side // 2 for patch 2 (a pixel-to-pixel alternation)."""
    return side // patch


def power_ratio_at(generated: np.ndarray, real: np.ndarray, radius: int) -> float:
    """Mean radial power of `generated` over that of `real` at `radius` (1 = the same)."""
    return float(radial_power(generated)[radius] / radial_power(real)[radius])
