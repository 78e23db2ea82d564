"""A pixel-statistics Fréchet distance: cheap, offline, and enough to rank samplers.

Each image becomes a small feature vector of what a reader of knee slices notices first:
intensity percentiles, mean and spread, edge strength, and a coarse 4×4 layout. Two sets of
images are compared as Gaussians in that space with the Fréchet distance (the FID formula,
without Inception features). It is not FID: use it to compare samplers or steps on one model,
not to compare models across papers.
"""

from __future__ import annotations

import numpy as np

PERCENTILES = (5, 25, 50, 75, 95)
LAYOUT_CELLS = 4  # the coarse layout is a LAYOUT_CELLS × LAYOUT_CELLS average


def pixel_features(images: np.ndarray) -> np.ndarray:
    """(N, H, W) uint8 → (N, F) float64 features in [0, 1] units."""
    x = images.astype(np.float64) / 255.0
    n, height, width = x.shape
    flat = x.reshape(n, -1)
    percentiles = np.percentile(flat, PERCENTILES, axis=1).T  # (N, 5)
    moments = np.stack([flat.mean(axis=1), flat.std(axis=1)], axis=1)  # (N, 2)
    edges = np.stack(
        [np.abs(np.diff(x, axis=1)).mean(axis=(1, 2)), np.abs(np.diff(x, axis=2)).mean(axis=(1, 2))], axis=1
    )  # (N, 2)
    cells = x[:, : height // LAYOUT_CELLS * LAYOUT_CELLS, : width // LAYOUT_CELLS * LAYOUT_CELLS]
    layout = cells.reshape(n, LAYOUT_CELLS, height // LAYOUT_CELLS, LAYOUT_CELLS, width // LAYOUT_CELLS).mean(axis=(2, 4))
    return np.concatenate([percentiles, moments, edges, layout.reshape(n, -1)], axis=1)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a^½ Σ_b Σ_a^½)^½) between feature sets (N, F)."""
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = psd_sqrt(cov_a)
    cross = psd_sqrt(root_a @ cov_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * cross))


def psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def pixel_distance(generated: np.ndarray, reference: np.ndarray) -> float:
    """Fréchet distance of pixel features between two image sets, ×1000 for readable numbers."""
    return 1000.0 * frechet_distance(pixel_features(generated), pixel_features(reference))
