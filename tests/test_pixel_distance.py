"""The pixel-statistics distance: zero for a set against itself, ordered as a person would."""

from __future__ import annotations

import numpy as np
import pytest

from kneegen.data.phantom import phantom_volume
from kneegen.evaluation.pixel_distance import frechet_distance, pixel_distance, psd_sqrt


@pytest.fixture(scope="module")
def phantom_sets() -> tuple[np.ndarray, np.ndarray]:
    first = np.concatenate([phantom_volume(seed, 12, "RIGHT", 32, 32) for seed in range(6)])
    second = np.concatenate([phantom_volume(seed, 12, "RIGHT", 32, 32) for seed in range(100, 106)])
    return first, second


def test_a_set_against_itself_is_zero(phantom_sets):
    first, _ = phantom_sets
    assert abs(pixel_distance(first, first)) < 1e-6


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    """For diagonal covariances the trace term is Σ (σ_a − σ_b)²."""
    rng = np.random.default_rng(0)
    a = rng.normal([0.0, 1.0], [1.0, 2.0], size=(200_000, 2))
    b = rng.normal([0.5, 1.0], [2.0, 0.5], size=(200_000, 2))
    expected = 0.5**2 + (1.0 - 2.0) ** 2 + (2.0 - 0.5) ** 2
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)


def test_psd_sqrt_squares_back():
    rng = np.random.default_rng(1)
    m = rng.normal(size=(5, 5))
    spd = m @ m.T
    root = psd_sqrt(spd)
    np.testing.assert_allclose(root @ root, spd, atol=1e-9)


def test_other_phantom_patients_are_far_closer_than_noise_or_blank(phantom_sets):
    first, second = phantom_sets
    rng = np.random.default_rng(2)
    noise = rng.integers(0, 256, size=first.shape, dtype=np.uint8)
    blank = np.full_like(first, 40)
    same_family = pixel_distance(second, first)
    assert same_family * 5 < pixel_distance(noise, first)
    assert same_family * 5 < pixel_distance(blank, first)
