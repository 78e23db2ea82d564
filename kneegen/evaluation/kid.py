"""Kernel Inception Distance: an unbiased MMD² between two feature sets (Bińkowski et al. 2018).

With the cubic polynomial kernel k(x, y) = (xᵀy / F + 1)³ and m images per set,

    MMD²_u = Σ_{i≠j} k(x_i, x_j) / (m(m−1)) + Σ_{i≠j} k(y_i, y_j) / (m(m−1)) − 2 Σ_{i,j} k(x_i, y_j) / m²

(the same estimator as torchmetrics' KernelInceptionDistance). Unlike FID it has no bias from
the sample count: two draws of one distribution score 0 on average, whatever m. It is averaged
over random subsets; the subset size is min(1000, half the smaller set), so that subsets differ
and their spread (population std, as torchmetrics) says how much the number moves. That spread
is of a half-size estimate, so it overstates the full set's uncertainty by about √2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SUBSET_SIZE = 1000  # the KID paper's subset size
SUBSETS = 100
MIN_IMAGES = 4  # two per subset, and subsets that are not the whole set
KID_SEED = 0


@dataclass(frozen=True)
class KernelDistance:
    mean: float
    std: float  # over subsets
    subset_size: int


def kernel_inception_distance(
    a: np.ndarray, b: np.ndarray, subsets: int = SUBSETS, subset_size: int | None = None, seed: int = KID_SEED
) -> KernelDistance:
    """KID between feature sets a (N_a, F) and b (N_b, F), averaged over random subsets."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    smaller = min(len(a), len(b))
    size = subset_size or min(SUBSET_SIZE, smaller // 2)
    if size < 2 or size > smaller:
        raise ValueError(f"KID needs subsets of 2 to {smaller} images, got {size} (sets of {len(a)} and {len(b)})")
    rng = np.random.default_rng(seed)
    scores = [
        polynomial_mmd(a[rng.permutation(len(a))[:size]], b[rng.permutation(len(b))[:size]]) for _ in range(subsets)
    ]
    return KernelDistance(float(np.mean(scores)), float(np.std(scores)), size)


def polynomial_mmd(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² of two equal-sized sets (m, F) under k(x, y) = (xᵀy / F + 1)³."""
    m, features = x.shape

    def kernel(p: np.ndarray, q: np.ndarray) -> np.ndarray:
        return (p @ q.T / features + 1.0) ** 3  # (m, m)

    k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / m**2)
