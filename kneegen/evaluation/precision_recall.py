"""Improved precision and recall of generated images (Kynkäänniemi et al. 2019).

FID folds two failures into one number: samples that do not look like the data (low fidelity)
and samples that cover only part of it (collapse onto a few shapes). Precision and recall
separate them. Each set's manifold is the union of balls around its points, a ball's radius
being the distance to the point's k-th nearest neighbour in its own set (k = 3 in the paper):

    precision = share of generated points inside the real manifold,
    recall    = share of real points inside the generated manifold.

Both are measured on the Inception features. Like FID they depend on the set sizes, so they are
compared at equal sizes only, next to the real-vs-real figures at that size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

NEIGHBOURS = 3  # the paper's k
ROWS = 1024  # query rows per distance matrix, so memory stays at ROWS × N


@dataclass(frozen=True)
class PrecisionRecall:
    precision: float
    recall: float


def precision_recall(real: np.ndarray, generated: np.ndarray, k: int = NEIGHBOURS) -> PrecisionRecall:
    """Precision and recall of `generated` (M, F) against `real` (N, F) features."""
    if min(len(real), len(generated)) <= k:
        raise ValueError(
            f"precision/recall with k={k} needs more than {k} images per set, "
            f"got {len(real)} real and {len(generated)} generated"
        )
    real_t, generated_t = (
        torch.from_numpy(np.asarray(real, np.float64)),
        torch.from_numpy(np.asarray(generated, np.float64)),
    )
    return PrecisionRecall(
        precision=coverage(generated_t, real_t, kth_neighbour_radii(real_t, k)),
        recall=coverage(real_t, generated_t, kth_neighbour_radii(generated_t, k)),
    )


def kth_neighbour_radii(points: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) distance of each point to its k-th nearest other point of the same set."""
    radii = []
    for start in range(0, len(points), ROWS):
        distances = torch.cdist(points[start : start + ROWS], points)  # (rows, N), itself at 0
        radii.append(distances.kthvalue(k + 1, dim=1).values)  # k + 1: the point itself is the first
    return torch.cat(radii)


def coverage(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    """Share of `queries` within radius of at least one centre."""
    inside = []
    for start in range(0, len(queries), ROWS):
        distances = torch.cdist(queries[start : start + ROWS], centres)  # (rows, N)
        inside.append((distances <= radii[None, :]).any(dim=1))
    return float(torch.cat(inside).double().mean())
