"""Light augmentation: exact shifts, bounded intensity scales, flips, reproducible draws, exact resume."""

from __future__ import annotations

import pytest
import torch

from kneegen.engine.augment import MAX_INTENSITY_SCALE, augment
from kneegen.errors import KneegenError
from kneegen.training_run import run_training

from helpers import tiny_config
from test_training import losses_of


def batch() -> torch.Tensor:
    return torch.rand(8, 1, 25, 25, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_no_kinds_is_the_identity():
    x = batch()
    assert torch.equal(augment(x, [], torch.Generator().manual_seed(1)), x)


def test_shift_moves_each_image_by_a_whole_number_of_pixels_within_one_pixel_at_25():
    x = batch()
    shifted = augment(x, ["shift"], torch.Generator().manual_seed(1))
    for original, moved in zip(x, shifted):
        matches = [
            (dy, dx)
            for dy in range(-1, 2)
            for dx in range(-1, 2)
            if torch.equal(
                moved[:, max(dy, 0) : 25 + min(dy, 0), max(dx, 0) : 25 + min(dx, 0)],
                original[:, max(-dy, 0) : 25 + min(-dy, 0), max(-dx, 0) : 25 + min(-dx, 0)],
            )
        ]
        assert len(matches) == 1  # 4 % of 25 px rounds to at most 1 px
        dy, dx = matches[0]
        border = moved.clone()
        border[:, max(dy, 0) : 25 + min(dy, 0), max(dx, 0) : 25 + min(dx, 0)] = -1
        assert (border == -1).all()  # what was uncovered is black


def test_intensity_scales_above_black_within_the_bound():
    x = batch()
    scaled = augment(x, ["intensity"], torch.Generator().manual_seed(1))
    ratio = (scaled + 1) / (x + 1)
    unclipped = (scaled.abs() < 1) & (x + 1 > 0.1)  # away from the clip and from 0/0
    for image_ratio, mask in zip(ratio, unclipped):
        values = image_ratio[mask]
        assert torch.allclose(values, values[0].expand_as(values), atol=1e-5)  # one scale per image
        assert abs(values[0] - 1) <= MAX_INTENSITY_SCALE + 1e-6


def test_flip_mirrors_some_images_and_leaves_the_others():
    x = batch()
    flipped = augment(x, ["flip"], torch.Generator().manual_seed(3))
    mirrored = [torch.equal(a, b.flip(-1)) for a, b in zip(flipped, x)]
    kept = [torch.equal(a, b) for a, b in zip(flipped, x)]
    assert all(m != k for m, k in zip(mirrored, kept)) and any(mirrored) and any(kept)


def test_same_generator_state_same_augmentation():
    x = batch()
    kinds = ["shift", "intensity", "flip"]
    assert torch.equal(
        augment(x, kinds, torch.Generator().manual_seed(5)), augment(x, kinds, torch.Generator().manual_seed(5))
    )
    assert not torch.equal(
        augment(x, kinds, torch.Generator().manual_seed(5)), augment(x, kinds, torch.Generator().manual_seed(6))
    )


@pytest.mark.slow
def test_training_with_augmentation_resumes_exactly_and_differs_from_plain(prepared, tmp_path):
    augmented = {"augment": ["shift", "intensity"]}
    straight, resumed, plain = tmp_path / "straight", tmp_path / "resumed", tmp_path / "plain"
    run_training(tiny_config(prepared, tmp_path, train={"epochs": 2, **augmented}), straight, resume=False)
    run_training(tiny_config(prepared, tmp_path, train={"epochs": 1, **augmented}), resumed, resume=False)
    run_training(tiny_config(prepared, tmp_path, train={"epochs": 2, **augmented}), resumed, resume=True)
    run_training(tiny_config(prepared, tmp_path, train={"epochs": 2}), plain, resume=False)
    assert losses_of(resumed) == losses_of(straight)
    assert losses_of(plain) != losses_of(straight)  # the option reaches the training batches


def test_unknown_augmentation_is_named(prepared, tmp_path):
    with pytest.raises(KneegenError, match="train.augment = 'rotate' is not one of shift, intensity, flip"):
        tiny_config(prepared, tmp_path, train={"augment": ["rotate"]})
