"""fit_to_size: where the slice lands on the canvas for pad / crop / stretch, in both bit depths."""

from __future__ import annotations

import numpy as np
import pytest

from kneegen.data.geometry import fit_to_size


def test_pad_keeps_the_aspect_and_centres_with_black_borders():
    wide = np.full((10, 20), 200, dtype=np.uint8)  # 1:2
    padded = fit_to_size(wide, (20, 20), "pad")
    assert padded.shape == (20, 20) and padded.dtype == np.uint8
    assert (padded[5:15] == 200).all()  # scaled to 10×20... ×1: rows 5..14 hold the slice
    assert (padded[:5] == 0).all() and (padded[15:] == 0).all()


def test_crop_fills_the_frame_and_cuts_the_long_side_evenly():
    wide = np.zeros((10, 30), dtype=np.uint8)
    wide[:, 10:20] = 255  # the middle third
    cropped = fit_to_size(wide, (10, 10), "crop")
    assert cropped.shape == (10, 10)
    assert (cropped == 255).all()


def test_stretch_is_a_plain_resize_of_both_sides():
    tall = np.arange(4 * 2, dtype=np.uint8).reshape(4, 2) * 30
    stretched = fit_to_size(tall, (8, 8), "stretch")
    assert stretched.shape == (8, 8) and (stretched > 0).mean() > 0.8  # no black borders


def test_akoa_geometry_pad_from_228x260_to_256():
    slice_ = np.full((228, 260), 100, dtype=np.uint8)
    out = fit_to_size(slice_, (256, 256), "pad")
    content_rows = np.flatnonzero(out.max(axis=1) > 0)
    assert out.shape == (256, 256)
    assert len(content_rows) == round(228 * 256 / 260)  # 224: height scaled by the same factor as width
    assert (out[:, 0] == 100).any() and (out[:, -1] == 100).any()  # full width used


@pytest.mark.parametrize("fit", ["pad", "crop", "stretch"])
def test_sixteen_bit_stays_sixteen_bit_without_losing_levels(fit):
    ramp = np.linspace(0, 65535, 64 * 48).reshape(64, 48).astype(np.uint16)
    out = fit_to_size(ramp, (32, 24), fit)
    assert out.dtype == np.uint16
    assert len(np.unique(out)) > 256  # more levels than 8 bits could hold
    assert out.max() <= 65535


def test_same_size_is_returned_untouched():
    pixels = np.random.default_rng(0).integers(0, 255, (12, 16), dtype=np.uint8)
    assert fit_to_size(pixels, (12, 16), "crop") is pixels
