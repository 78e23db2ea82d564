"""The metric maths without Inception: Fréchet against closed forms and torchmetrics, KID's lack
of bias, MS-SSIM's ends, memorisation flags, the held-out split and the feature cache."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from kneegen.data.cache import open_cache, write_cache
from kneegen.data.phantom import phantom_volume
from kneegen.errors import KneegenError
from kneegen.evaluation import reference as reference_module
from kneegen.evaluation.diversity import SMALL, STANDARD, mean_pairwise_ms_ssim, ms_ssim_setting
from kneegen.evaluation.features import tf_bilinear_resize
from kneegen.evaluation.frechet import frechet_distance, frechet_from_moments
from kneegen.evaluation.kid import kernel_inception_distance
from kneegen.evaluation.memorisation import compare_with_training, copy_fraction, pixel_vectors
from kneegen.evaluation.reference import held_out_split, reference_features


def random_spd(rng: np.random.Generator, size: int) -> np.ndarray:
    m = rng.normal(size=(size, size))
    return m @ m.T + 0.5 * np.eye(size)


def closed_form(mu1, cov1, mu2, cov2) -> float:
    """‖μ1−μ2‖² + Tr(Σ1 + Σ2 − 2(Σ1Σ2)^½), the trace of the root from the eigenvalues of Σ1Σ2."""
    eigenvalues = torch.linalg.eigvals(torch.from_numpy(cov1 @ cov2))
    root_trace = eigenvalues.sqrt().real.sum().item()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * root_trace)


# --- Fréchet ----------------------------------------------------------------------------------


def test_frechet_of_two_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    cov1, cov2 = random_spd(rng, 6), random_spd(rng, 6)
    assert frechet_from_moments(mu1, cov1, mu2, cov2) == pytest.approx(closed_form(mu1, cov1, mu2, cov2), rel=1e-9)
    assert frechet_from_moments(mu1, cov1, mu1, cov1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_of_samples_converges_to_the_gaussians_distance():
    rng = np.random.default_rng(1)
    mu1, mu2 = np.zeros(3), np.array([1.0, 0.0, -0.5])
    cov1, cov2 = random_spd(rng, 3), random_spd(rng, 3)
    a = rng.multivariate_normal(mu1, cov1, size=100_000)
    b = rng.multivariate_normal(mu2, cov2, size=100_000)
    assert frechet_distance(a, b) == pytest.approx(closed_form(mu1, cov1, mu2, cov2), rel=0.02)


def test_few_image_route_equals_the_covariance_route():
    """N ≤ F uses singular values of A Bᵀ; it must give the covariance formula's number exactly."""
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(12, 40)), rng.normal(0.3, 1.5, size=(9, 40))
    moments = frechet_from_moments(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert frechet_distance(a, b) == pytest.approx(moments, rel=1e-7)  # eigh of a singular Σ: round-off
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


class Passthrough(nn.Module):
    """torchmetrics' custom-feature hook, fed features directly."""

    num_features = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_frechet_and_kid_agree_with_torchmetrics():
    fid_module = pytest.importorskip("torchmetrics.image.fid")
    kid_module = pytest.importorskip("torchmetrics.image.kid")
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(30, 8)), rng.normal(0.5, 2.0, size=(30, 8))
    fid = fid_module.FrechetInceptionDistance(feature=Passthrough())
    fid.update(torch.from_numpy(a), real=True)
    fid.update(torch.from_numpy(b), real=False)
    assert frechet_distance(b, a) == pytest.approx(fid.compute().item(), rel=1e-6)
    # With subsets as large as the sets every subset is the whole set: no randomness left.
    kid = kid_module.KernelInceptionDistance(feature=Passthrough(), subsets=3, subset_size=30)
    kid.update(torch.from_numpy(a), real=True)
    kid.update(torch.from_numpy(b), real=False)
    expected, _ = kid.compute()
    assert kernel_inception_distance(b, a, subsets=3, subset_size=30).mean == pytest.approx(expected.item(), rel=1e-6)


def test_frechet_refuses_a_single_image():
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(np.zeros((1, 4)), np.zeros((5, 4)))


# --- KID ----------------------------------------------------------------------------------------


def test_kid_is_unbiased_where_fid_is_not():
    """Two draws of one distribution: KID averages to 0, small-sample FID stays well above it."""
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(64, 32)), rng.normal(size=(64, 32))
    kid = kernel_inception_distance(a, b)
    assert abs(kid.mean) < 0.05 * kernel_inception_distance(a, b + 1.0).mean
    assert kid.subset_size == 32 and kid.std > 0
    assert frechet_distance(a, b) > 5.0  # the bias: ≈ 2·Tr Σ·F/N… far from 0 at N = 64


def test_kid_refuses_sets_too_small_for_subsets():
    with pytest.raises(ValueError, match="subsets"):
        kernel_inception_distance(np.zeros((3, 4)), np.zeros((10, 4)))


# --- Inception preprocessing ------------------------------------------------------------------


def test_resize_is_tf1_bilinear_without_half_pixel_centres():
    """Output column j samples input column j·in/out: a ramp 0…31 becomes j·32/299 (clamped at the edge)."""
    ramp = torch.arange(32, dtype=torch.float32).expand(1, 3, 32, 32)
    resized = tf_bilinear_resize(ramp, 299)
    columns = torch.arange(299) * 32 / 299
    np.testing.assert_allclose(resized[0, 0, 5].numpy(), columns.clamp(max=31).numpy(), atol=1e-4)


# --- MS-SSIM ------------------------------------------------------------------------------------


def test_ms_ssim_is_one_for_copies_and_near_zero_for_noise():
    pytest.importorskip("torchmetrics")
    slices = phantom_volume(0, 6, "RIGHT", 32, 32)
    assert mean_pairwise_ms_ssim(np.repeat(slices[:1], 4, axis=0)) == pytest.approx(1.0, abs=1e-5)
    noise = np.random.default_rng(5).integers(0, 256, size=(8, 32, 32), dtype=np.uint8)
    assert mean_pairwise_ms_ssim(noise) < 0.1
    assert 0.1 < mean_pairwise_ms_ssim(slices) < 0.95


def test_ms_ssim_setting_follows_the_image_size():
    assert ms_ssim_setting(256, 256) == STANDARD
    assert ms_ssim_setting(64, 64) == SMALL and ms_ssim_setting(32, 28) == SMALL
    assert sum(SMALL.betas) == pytest.approx(1.0)
    with pytest.raises(KneegenError, match="16x16"):
        ms_ssim_setting(16, 16)


# --- memorisation ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def knees() -> dict[str, np.ndarray]:
    """Training, held-out and fresh patients of the phantom at 32², ten slices each."""
    volumes = {
        "train": range(6),
        "held_out": range(100, 103),
        "fresh": range(200, 203),
    }
    return {
        name: np.concatenate([phantom_volume(s, 10, "RIGHT", 32, 32) for s in seeds]) for name, seeds in volumes.items()
    }


def test_exact_training_slices_are_flagged_and_fresh_patients_are_not(knees):
    samples = np.concatenate([knees["fresh"], knees["train"][[3, 17, 44]]])
    pixels = compare_with_training(samples, knees["held_out"], knees["train"], pixel_vectors)
    assert not pixels.flagged[: len(knees["fresh"])].any()
    assert pixels.flagged[len(knees["fresh"]) :].all()
    assert list(pixels.samples.index[-3:]) == [3, 17, 44]
    assert pixels.samples.distance[-3:] == pytest.approx(0.0, abs=1e-3)
    assert copy_fraction(pixels) == pytest.approx(3 / len(samples))


# --- held-out split and the feature cache -------------------------------------------------------


def test_held_out_split_is_test_when_the_cache_has_one():
    assert held_out_split({"split_ranges": {"train": [0, 8], "val": [8, 10], "test": [10, 12]}}) == "test"
    assert held_out_split({"split_ranges": {"train": [0, 8], "val": [8, 10], "test": [10, 10]}}) == "val"
    assert held_out_split({"split_ranges": {"train": [0, 8], "val": [8, 10]}}) == "val"


class PooledPixels(nn.Module):
    """A stand-in extractor: 4×4 average intensities, counting its calls."""

    identity = "pooled-pixels"

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.nn.functional.adaptive_avg_pool2d(images.float().unsqueeze(1), 4).flatten(1)


def test_reference_features_are_computed_once_and_renewed_with_the_cache(tmp_path):
    images = np.concatenate([phantom_volume(s, 4, "RIGHT", 32, 32) for s in range(3)])
    write_cache(tmp_path, images, {"image_shape": [32, 32], "split_ranges": {"train": [0, 8], "val": [8, 12]}})
    cache, extractor = open_cache(tmp_path), PooledPixels()
    first = reference_features(cache, "val", extractor, 8, torch.device("cpu"))
    again = reference_features(open_cache(tmp_path), "val", extractor, 8, torch.device("cpu"))
    assert extractor.calls == 1 and np.array_equal(first, again) and first.shape == (4, 16)
    (stored,) = tmp_path.glob(f"{reference_module.REFERENCE_PREFIX}_val_*.npz")
    # A cache prepared again (new images.npy) gets a new key; the stale file goes.
    stat = (tmp_path / "images.npy").stat()
    os.utime(tmp_path / "images.npy", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    reference_features(open_cache(tmp_path), "val", extractor, 8, torch.device("cpu"))
    (renewed,) = tmp_path.glob(f"{reference_module.REFERENCE_PREFIX}_val_*.npz")
    assert extractor.calls == 2 and renewed != stored
    assert json.loads((tmp_path / "manifest.json").read_text())["split_ranges"]["val"] == [8, 12]
