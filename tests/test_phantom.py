"""Behaviour of the synthetic knee MRI phantom that stands in for the AKOA slices."""

import re
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from kneegen.data.phantom import (
    AKOA_HEIGHT,
    AKOA_WIDTH,
    _gaussian_blur,
    _rician,
    phantom_file_name,
    phantom_volume,
    write_phantom,
)

AKOA_NAME = re.compile(r"OAI(\d+)_BaseLine_3_de3d1_SAG_3D_DESS_WE_(LEFT|RIGHT)\.nii\.gz_(\d+)\.png")


def _mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def test_file_name_matches_akoa_convention():
    name = phantom_file_name(9014797, "LEFT", 12)
    assert name == "OAI9014797_BaseLine_3_de3d1_SAG_3D_DESS_WE_LEFT.nii.gz_12.png"
    assert AKOA_NAME.fullmatch(name)


def test_volume_has_requested_shape_and_dtype():
    volume = phantom_volume(3, 4, "RIGHT")
    assert volume.shape == (4, AKOA_HEIGHT, AKOA_WIDTH)
    assert volume.dtype == np.uint8


def test_same_seed_gives_identical_volume():
    np.testing.assert_array_equal(phantom_volume(7, 5, "LEFT", 64, 72), phantom_volume(7, 5, "LEFT", 64, 72))


def test_different_patients_differ():
    assert _mean_abs_diff(phantom_volume(1, 5, "RIGHT"), phantom_volume(2, 5, "RIGHT")) > 5


def test_slices_vary_from_medial_to_lateral_but_neighbours_are_alike():
    volume = phantom_volume(11, 16, "RIGHT")
    middle = len(volume) // 2
    neighbour_change = _mean_abs_diff(volume[middle], volume[middle + 1])
    edge_to_middle_change = _mean_abs_diff(volume[0], volume[middle])
    assert edge_to_middle_change > 2 * neighbour_change


def test_background_is_dark_and_anatomy_bright():
    for seed in range(5):
        mid_slice = phantom_volume(seed, 5, "RIGHT")[2].astype(np.float64)
        anterior_air = mid_slice[:, -8:]  # a right knee faces right
        knee = mid_slice[60:170, 70:190]
        assert np.median(anterior_air) < 25
        assert knee.mean() > 2 * np.median(anterior_air)
        assert knee.std() > 15  # bone, cartilage and soft tissue, not a flat blob


def test_left_knee_is_mirrored_right_knee_in_reverse_slice_order():
    right = phantom_volume(5, 6, "RIGHT")
    left = phantom_volume(5, 6, "LEFT")
    mirrored = _mean_abs_diff(left, right[::-1, :, ::-1])
    unmirrored = _mean_abs_diff(left, right[::-1])
    assert mirrored < 0.5 * unmirrored  # only the noise differs


@pytest.mark.parametrize("height, width", [(16, 16), (16, 40), (48, 20), (100, 300)])
def test_any_grid_size_gets_scaled_anatomy(height, width):
    volume = phantom_volume(4, 3, "LEFT", height, width)
    assert volume.shape == (3, height, width)
    assert volume.std() > 5


def test_unknown_side_is_rejected():
    with pytest.raises(ValueError):
        phantom_volume(1, 2, "BOTH")


def test_noise_is_rician():
    rng = np.random.default_rng(0)
    sigma = 0.1
    floor = _rician(np.zeros((400, 400), np.float32), sigma, rng)
    assert floor.min() >= 0
    assert floor.mean() == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.02)  # Rayleigh
    strong = _rician(np.ones((400, 400), np.float32), sigma, rng)
    assert strong.mean() == pytest.approx(1.0 + sigma**2 / 2, rel=0.01)
    assert strong.std() == pytest.approx(sigma, rel=0.05)


def test_gaussian_blur_keeps_mean_and_spreads_edges():
    step = np.zeros((20, 20), np.float32)
    step[:, 10:] = 1.0
    blurred = _gaussian_blur(step, 1.5)
    assert blurred.shape == step.shape
    assert blurred.mean() == pytest.approx(step.mean(), abs=1e-3)
    assert 0.05 < blurred[5, 9] < 0.5 < blurred[5, 10] < 0.95
    np.testing.assert_allclose(_gaussian_blur(np.full((8, 8), 3.0, np.float32), 2.0), 3.0, rtol=1e-5)


def test_write_phantom_writes_exact_count_with_akoa_names(tmp_path):
    progress = []
    paths = write_phantom(tmp_path, 45, seed=3, slices_per_volume=20, on_volume=progress.append)
    assert len(paths) == 45 == len(list(tmp_path.glob("*.png")))
    assert progress == [20, 20, 5]
    slices_by_knee = defaultdict(list)
    for path in paths:
        match = AKOA_NAME.fullmatch(path.name)
        assert match, path.name
        patient, side, index = match.groups()
        assert len(patient) == 7 and patient.startswith("9")
        slices_by_knee[patient, side].append(int(index))
        with Image.open(path) as image:
            assert image.mode == "L"
            assert image.size == (AKOA_WIDTH, AKOA_HEIGHT)
    assert len({patient for patient, _ in slices_by_knee}) == 3
    assert sorted(map(sorted, slices_by_knee.values())) == sorted(
        [list(range(1, 21)), list(range(1, 21)), list(range(1, 6))]
    )


def test_write_phantom_is_byte_identical_for_the_same_seed(tmp_path):
    first = write_phantom(tmp_path / "a", 5, seed=8, slices_per_volume=3)
    second = write_phantom(tmp_path / "b", 5, seed=8, slices_per_volume=3)
    other = write_phantom(tmp_path / "c", 5, seed=9, slices_per_volume=3)
    assert [p.name for p in first] == [p.name for p in second]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, second))
    assert {p.name for p in first}.isdisjoint(p.name for p in other)
