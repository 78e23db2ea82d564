"""Memorisation: is a generated image a copy of a training slice?

For every generated image the nearest training slice is found in two spaces: pixels (RMS
difference, in [0, 1] intensity units) and Inception features (Euclidean). What counts as
"near" is set by real data: the held-out slices' own distances to their nearest training slice
are the baseline, because a fresh image of a new patient is exactly what a sample should be.
A sample nearer to the training set than the baseline's 1st percentile, in either space, is a
likely copy; the copy fraction is the share of samples so flagged. Honest samples land there
by chance too: 1% per space with a large baseline, but with H held-out images the 1st
percentile is about their minimum when H < 100, and a fresh sample falls below the minimum of
H others with probability 1/(H + 1). The chance rate is reported beside the copy fraction;
only a fraction well above it says much.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

COPY_PERCENTILE = 1.0  # a sample nearer than this percentile of held-out→train distances is flagged
CHUNK = 256  # training images compared per matrix product (256 images of 256² in float32: 64 MB)
BASELINE_MAX = 1000  # held-out images in the baseline: an even subset beyond this; enough for a 1st percentile


@dataclass(frozen=True)
class Nearest:
    """Each query's nearest key: its index and distance."""

    index: np.ndarray  # (Q,) int
    distance: np.ndarray  # (Q,) float64


@dataclass(frozen=True)
class SpaceReport:
    """Samples vs the held-out baseline in one space (pixels or features)."""

    samples: Nearest  # each sample's nearest training image
    baseline: np.ndarray  # (H,) each held-out image's distance to its nearest training image
    threshold: float  # the baseline's COPY_PERCENTILE-th percentile
    flagged: np.ndarray  # (Q,) bool: samples nearer than the threshold

    def summary(self) -> dict[str, float]:
        return {
            "threshold": self.threshold,
            "sample_median": float(np.median(self.samples.distance)),
            "held_out_median": float(np.median(self.baseline)),
            "flagged": float(self.flagged.mean()),
            "chance": chance_fraction(len(self.baseline)),
        }


def nearest_neighbours(
    queries: np.ndarray, keys: np.ndarray, to_vectors: Callable[[np.ndarray], np.ndarray] = np.asarray
) -> Nearest:
    """Nearest key (Euclidean) of each query; `to_vectors` turns rows of either into (n, D) vectors,
    chunk by chunk, so a large training set is never converted at once."""
    q = torch.from_numpy(np.asarray(to_vectors(queries), np.float32))  # (Q, D)
    best_distance = torch.full((len(q),), float("inf"))
    best_index = torch.zeros(len(q), dtype=torch.long)
    for start in range(0, len(keys), CHUNK):
        k = torch.from_numpy(np.asarray(to_vectors(keys[start : start + CHUNK]), np.float32))  # (chunk, D)
        squared = (q**2).sum(1, keepdim=True) + (k**2).sum(1) - 2 * q @ k.T  # (Q, chunk)
        distance, index = squared.clamp_min(0).sqrt().min(dim=1)
        better = distance < best_distance
        best_distance[better], best_index[better] = distance[better], index[better] + start
    return Nearest(best_index.numpy(), best_distance.double().numpy())


def pixel_vectors(images: np.ndarray) -> np.ndarray:
    """(N, H, W) uint8 → (N, H·W) scaled so Euclidean distance is the RMS difference in [0, 1] units."""
    n, height, width = images.shape
    return np.asarray(images, np.float32).reshape(n, -1) / np.float32(255.0 * np.sqrt(height * width))


def compare_with_training(
    samples: np.ndarray,
    held_out: np.ndarray,
    train: np.ndarray,
    to_vectors: Callable[[np.ndarray], np.ndarray] = np.asarray,
) -> SpaceReport:
    """One space's memorisation check: samples' nearest training images against the held-out baseline."""
    nearest = nearest_neighbours(samples, train, to_vectors)
    if len(held_out) > BASELINE_MAX:
        held_out = held_out[np.linspace(0, len(held_out) - 1, BASELINE_MAX).round().astype(int)]
    baseline = nearest_neighbours(held_out, train, to_vectors).distance
    threshold = float(np.percentile(baseline, COPY_PERCENTILE))
    return SpaceReport(nearest, baseline, threshold, nearest.distance < threshold)


def chance_fraction(baseline_count: int) -> float:
    """Share of honest samples expected below the threshold of a baseline of this many images."""
    return max(COPY_PERCENTILE / 100, 1 / (baseline_count + 1))


def copy_fraction(*spaces: SpaceReport) -> float:
    """Share of samples flagged in any of the spaces."""
    flagged = np.logical_or.reduce([space.flagged for space in spaces])
    return float(flagged.mean())


def copy_chance(*spaces: SpaceReport) -> float:
    """An upper bound on the copy fraction of honest samples: the spaces' chance rates added."""
    return min(1.0, sum(chance_fraction(len(space.baseline)) for space in spaces))


def closest_samples(space: SpaceReport, count: int) -> list[int]:
    """The `count` samples nearest to the training set in this space, nearest first."""
    return [int(i) for i in np.argsort(space.samples.distance, kind="stable")[:count]]
