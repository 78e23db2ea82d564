"""Taking a patch network's fold frequencies out of x̂_0 (engine/fold.py): exact in the Fourier
domain, wired into the denoiser, and on by default for pixel samples only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from kneegen.engine.denoiser import make_denoiser
from kneegen.engine.device import Compute
from kneegen.engine.fold import without_fold
from kneegen.engine.network import build_network
from kneegen.engine.schedule import Schedule
from kneegen.engine.trained import TrainedModel
from kneegen.sampling import SamplerChoice, sample_batches

from helpers import TINY_MODEL, tiny_config

FP32 = Compute(torch.device("cpu"), None)


def fold_frequencies(height: int, width: int, patch: int) -> np.ndarray:
    """(H, W) mask of the DFT bins at multiples of H/p and W/p, the zero frequency excepted."""
    mask = np.zeros((height, width), bool)
    mask[:: height // patch, :: width // patch] = True
    mask[0, 0] = False
    return mask


@pytest.mark.parametrize(("patch", "shape"), [(2, (8, 12)), (4, (16, 8)), (3, (9, 6))])
def test_the_fold_frequencies_go_and_every_other_frequency_stays(patch, shape):
    x = torch.randn(2, 3, *shape, dtype=torch.float64)
    before, after = np.fft.fft2(x.numpy()), np.fft.fft2(without_fold(x, patch).numpy())
    mask = fold_frequencies(*shape, patch)
    assert np.abs(before[..., mask]).min() > 1e-3  # there was something to take out
    np.testing.assert_allclose(after[..., mask], 0, atol=1e-10)
    np.testing.assert_allclose(after[..., ~mask], before[..., ~mask], atol=1e-10)


def test_without_fold_is_the_identity_without_an_aligned_fold():
    x = torch.randn(1, 1, 6, 8)
    assert without_fold(x, 1) is x
    assert without_fold(x, 4) is x  # 6 rows: no 4-pixel fold fits


class Fixed(nn.Module):
    """A network that answers the same output for every input."""

    def __init__(self, output: Tensor) -> None:
        super().__init__()
        self.output = output

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.output.expand_as(x)


def test_the_denoiser_takes_the_fold_out_of_x0_and_keeps_eps_consistent():
    schedule, t = Schedule("cosine", 1000), torch.tensor([300, 700])
    x_t = torch.randn(2, 1, 8, 8)
    checkerboard = 0.3 * (-1.0) ** (torch.arange(8)[:, None] + torch.arange(8)[None, :])
    output = without_fold(0.2 * torch.randn(1, 1, 8, 8), 2) + checkerboard  # content plus a 2-pixel fold pattern
    plain_x0, _ = make_denoiser(Fixed(output), schedule, "v", FP32, clip=False)(x_t, t)
    x0, eps = make_denoiser(Fixed(output), schedule, "v", FP32, clip=False, fold=2)(x_t, t)

    torch.testing.assert_close(x0, without_fold(plain_x0, 2))
    assert (x0 - plain_x0).abs().max() > 0.01  # the v output's pattern reached x̂_0 and was taken out
    torch.testing.assert_close(eps, schedule.eps_from_x0(x0, x_t, t))


def trained(tmp_path, patch: int) -> TrainedModel:
    config = tiny_config(tmp_path, tmp_path, model={"unet": {**TINY_MODEL["unet"], "patch_size": patch}})
    torch.manual_seed(0)
    network = build_network(config.model, (16, 16), 1)
    return TrainedModel(network, Schedule("cosine", 1000), config, (16, 16), 1, tmp_path / "last.pt")


def fold_power(images: np.ndarray) -> float:
    spectrum = np.abs(np.fft.fft2(images.astype(np.float64) - images.mean(axis=(1, 2), keepdims=True))) ** 2
    return float(spectrum[:, fold_frequencies(16, 16, 2)].mean())


def test_pixel_samples_lose_the_fold_unless_asked_to_keep_it(tmp_path):
    model = trained(tmp_path, 2)
    assert model.fold == 2 and trained(tmp_path, 1).fold == 1
    choice = SamplerChoice("ddim", 3)
    removed = np.concatenate([images for _, images in sample_batches(model, FP32, choice, [0, 1, 2, 3], 4)])
    kept_choice = SamplerChoice("ddim", 3, keep_fold=True)
    kept = np.concatenate([images for _, images in sample_batches(model, FP32, kept_choice, [0, 1, 2, 3], 4)])
    assert "fold kept" in kept_choice.describe() and "fold" not in choice.describe()
    assert fold_power(removed) < fold_power(kept) / 10  # what is left comes from the clipping and the uint8 rounding
