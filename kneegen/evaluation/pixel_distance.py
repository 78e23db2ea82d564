"""A pixel-statistics Fréchet distance: cheap, offline, and enough to rank samplers.

Each image becomes a small feature vector of what a reader of knee slices notices first:
intensity percentiles, mean and spread, edge strength, and a coarse 4×4 layout. Two sets of
images are compared as Gaussians in that space with the Fréchet distance (evaluation/frechet.py,
the FID formula without Inception features). It is not FID: use it to compare samplers or steps
on one model, not to compare models across papers.
"""

from __future__ import annotations

import numpy as np

from kneegen.evaluation.frechet import frechet_distance, psd_sqrt  # noqa: F401 (re-exported)

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
    layout = cells.reshape(n, LAYOUT_CELLS, height // LAYOUT_CELLS, LAYOUT_CELLS, width // LAYOUT_CELLS).mean(
        axis=(2, 4)
    )
    return np.concatenate([percentiles, moments, edges, layout.reshape(n, -1)], axis=1)


def pixel_distance(generated: np.ndarray, reference: np.ndarray) -> float:
    """Fréchet distance of pixel features between two image sets, ×1000 for readable numbers."""
    return 1000.0 * frechet_distance(pixel_features(generated), pixel_features(reference))
