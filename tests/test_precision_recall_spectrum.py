"""Improved precision/recall against a brute-force reference and its two failure modes, and the
power-spectrum check against patterns whose frequency is known."""

from __future__ import annotations

import numpy as np
import pytest

from kneegen.evaluation.precision_recall import precision_recall
from kneegen.evaluation.spectrum import fold_radius, power_ratio_at, radial_power


def brute_force(real: np.ndarray, generated: np.ndarray, k: int) -> tuple[float, float]:
    """The paper's definition, written as plainly as possible."""

    def radii(points: np.ndarray) -> list[float]:
        return [sorted(np.linalg.norm(points - p, axis=1))[k] for p in points]

    def share_inside(queries: np.ndarray, centres: np.ndarray, r: list[float]) -> float:
        return float(np.mean([any(np.linalg.norm(q - c) <= rc for c, rc in zip(centres, r)) for q in queries]))

    return share_inside(generated, real, radii(real)), share_inside(real, generated, radii(generated))


def test_precision_recall_match_the_definition() -> None:
    rng = np.random.default_rng(0)
    real, generated = rng.normal(size=(60, 5)), rng.normal(0.7, 1.3, size=(45, 5))
    result = precision_recall(real, generated, k=3)
    assert (result.precision, result.recall) == pytest.approx(brute_force(real, generated, 3), abs=1e-12)


def test_collapse_keeps_precision_and_loses_recall() -> None:
    rng = np.random.default_rng(1)
    real = rng.normal(size=(400, 8))
    collapsed = real[:5][rng.integers(0, 5, 400)] + rng.normal(scale=0.01, size=(400, 8))  # 5 shapes, repeated
    result = precision_recall(real, collapsed)
    assert result.precision > 0.95
    assert result.recall < 0.2


def test_samples_off_the_data_lose_precision() -> None:
    rng = np.random.default_rng(2)
    real = rng.normal(size=(300, 8))
    far = rng.normal(size=(300, 8)) + 20.0
    assert precision_recall(real, far).precision == 0.0
    same = precision_recall(real, rng.normal(size=(300, 8)))
    assert same.precision > 0.6 and same.recall > 0.6


def test_precision_recall_need_more_points_than_neighbours() -> None:
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))


def test_radial_power_finds_a_known_frequency() -> None:
    x = np.arange(64)
    stripes = np.sin(2 * np.pi * 8 * x / 64)[None, None, :].repeat(64, axis=1)  # 8 cycles across
    power = radial_power(stripes)
    assert int(np.argmax(power)) == 8


def test_block_pattern_shows_at_the_fold_radius_only() -> None:
    rng = np.random.default_rng(3)
    smooth = rng.normal(size=(16, 64, 64)).cumsum(axis=1).cumsum(axis=2)
    smooth = ((smooth - smooth.min()) / np.ptp(smooth) * 200).astype(np.uint8)
    blocky = smooth.astype(np.int32)
    blocky[:, :, ::4] += 20  # a column pattern repeating every 4 pixels, as a patch-4 fold leaves
    blocky = blocky.clip(0, 255).astype(np.uint8)
    assert power_ratio_at(blocky, smooth, fold_radius(64, 4)) > 5
    assert power_ratio_at(smooth, smooth, fold_radius(64, 4)) == pytest.approx(1.0)
