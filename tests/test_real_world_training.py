"""Real-world data all the way through: a 16-bit, non-square cache trains and samples.

The AKOA slices are 260×228 and volumes are 16-bit, so the engine must take H ≠ W and uint16
pixels as they come out of `prepare`, not only the 8-bit squares of the phantom.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kneegen.data.cache import open_cache
from kneegen.data.prepare import prepare_folder
from kneegen.data.splits import SplitFractions
from kneegen.engine.device import resolve_compute
from kneegen.engine.pixels import to_model_range
from kneegen.engine.trained import load_trained_model
from kneegen.sampling import choose_sampler, sample_batches
from kneegen.training_run import run_training

from helpers import prepare_options, tiny_config

SHAPE = (16, 24)  # H × W


@pytest.fixture(scope="module")
def deep_cache(phantom_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The phantom's slices re-saved as 16-bit PNGs (8-bit value × 257 + noise in the low byte)."""
    src = tmp_path_factory.mktemp("deep") / "slices"
    src.mkdir()
    rng = np.random.default_rng(0)
    for path in sorted(phantom_src.glob("*.png")):
        eight = np.asarray(Image.open(path).convert("L"), dtype=np.uint16)
        Image.fromarray(eight * 256 + rng.integers(0, 256, eight.shape, dtype=np.uint16)).save(src / path.name)
    out = src.parent / "cache"
    prepare_folder(src, out, prepare_options(SHAPE, fractions=SplitFractions(0.6, 0.2, 0.2)))
    return out


def test_sixteen_bit_pixels_reach_the_model_range_exactly(deep_cache):
    images = open_cache(deep_cache).split("train")
    assert images.dtype == np.uint16 and images.shape[1:] == SHAPE
    x = to_model_range(images[:4], resolve_compute("cpu", "fp32").device)
    assert x.shape == (4, 1, *SHAPE)
    np.testing.assert_allclose(x.numpy()[:, 0], images[:4] / 65535 * 2 - 1, atol=1e-6)
    assert len(np.unique(images[:4] % 256)) > 200  # the low byte survived prepare


@pytest.mark.slow
def test_training_and_sampling_on_a_non_square_sixteen_bit_cache(deep_cache, tmp_path):
    run_dir = tmp_path / "run"
    run_training(tiny_config(deep_cache, tmp_path, train={"epochs": 1, "val_images": 8}), run_dir, resume=False)
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(record["val_loss"]) and record["val_loss"] < 1.5

    compute = resolve_compute("cpu", "fp32")
    model = load_trained_model(run_dir / "last.pt", compute)
    assert model.image_shape == SHAPE
    ((_, images),) = list(sample_batches(model, compute, choose_sampler(model, "ddim", 2, None), [0, 1], 2))
    assert np.asarray(images).shape == (2, *SHAPE)


def test_validate_scores_a_sixteen_bit_cache_in_eight_bits(deep_cache, tmp_path):
    """Inception, MS-SSIM and the pixel metrics see the 16-bit cache as its high byte."""
    from kneegen.evaluation.reference import held_out_images

    data = open_cache(deep_cache)
    split, held_out = held_out_images(data)
    assert split == "test" and held_out.dtype == np.uint8
    np.testing.assert_array_equal(held_out, (data.split("test") >> 8).astype(np.uint8))
    assert data.split_8bit("train").dtype == np.uint8
