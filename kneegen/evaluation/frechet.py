"""The Fréchet distance between two feature sets seen as Gaussians: the maths of FID.

    d² = ‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a^½ Σ_b Σ_a^½)^½)        (Heusel et al. 2017, eq. 6)

Tr((Σ_a^½ Σ_b Σ_a^½)^½) is the sum of the square roots of the eigenvalues of Σ_a Σ_b. Two
exact routes compute it, all in float64:
- few images (min(N_a, N_b) ≤ F, every CPU-sized evaluation): with centred features A, B and
  Σ_a = AᵀA/(N_a − 1), the non-zero eigenvalues of Σ_a Σ_b are the squared singular values of
  A Bᵀ / √((N_a − 1)(N_b − 1)), an N_a × N_b matrix: no F × F matrix is ever formed;
- many images: the symmetric form with eigendecompositions of F × F matrices.

Sample count: with N ≤ F images the covariance has rank ≤ N − 1 < F, so FID is biased upward
(by roughly Tr Σ / N); numbers from different N must not be compared. FID needs N ≥ 2 per set.
"""

from __future__ import annotations

import numpy as np

MIN_IMAGES = 2  # a covariance needs two images


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The Fréchet distance between feature sets a (N_a, F) and b (N_b, F)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if min(len(a), len(b)) < MIN_IMAGES:
        raise ValueError(f"the Fréchet distance needs at least {MIN_IMAGES} images per set, got {len(a)} and {len(b)}")
    if min(len(a), len(b)) > a.shape[1]:
        return frechet_from_moments(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    centred_a, centred_b = a - a.mean(0), b - b.mean(0)  # (N_a, F), (N_b, F)
    cross = centred_a @ centred_b.T / np.sqrt((len(a) - 1) * (len(b) - 1))  # (N_a, N_b)
    trace_root = np.linalg.svd(cross, compute_uv=False).sum()  # Tr((Σ_a^½ Σ_b Σ_a^½)^½)
    trace_a = (centred_a**2).sum() / (len(a) - 1)  # Tr Σ_a
    trace_b = (centred_b**2).sum() / (len(b) - 1)
    mean_term = ((a.mean(0) - b.mean(0)) ** 2).sum()
    return float(mean_term + trace_a + trace_b - 2 * trace_root)


def frechet_from_moments(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a^½ Σ_b Σ_a^½)^½) for two Gaussians."""
    root_a = psd_sqrt(cov_a)
    cross = psd_sqrt(root_a @ cov_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(cross))


def psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
