"""The autoencoder of latent diffusion: SSIM/PSNR against torchmetrics, the loss in closed form,
the shapes at f = 4 and 8 on non-square slices, and that training it lowers its loss."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from kneegen.config import load_config
from kneegen.data.cache import open_cache
from kneegen.engine.autoencoder import (
    Autoencoder,
    AutoencoderConfig,
    ChannelNorm,
    autoencoder_loss,
    latent_shape,
    spectral_distance,
)
from kneegen.engine.device import resolve_compute
from kneegen.engine.ssim import ms_ssim, ms_ssim_scales, psnr, ssim
from kneegen.engine.training import create_state, epoch_steps, training_input_shape
from kneegen.engine.validation import reconstruction_validation
from kneegen.errors import KneegenError

CPU = resolve_compute("cpu", "fp32").device
HALF_WINDOW = 5  # the 11-pixel window reaches 5 pixels past its centre


def noisy_pairs(shape: tuple[int, ...], noise: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=generator) * 2 - 1
    return x, (x + noise * torch.randn(shape, generator=generator)).clamp(-1, 1)


def test_ssim_equals_torchmetrics_over_the_positions_the_window_fits():
    x, y = noisy_pairs((3, 1, 40, 52))
    _, full = structural_similarity_index_measure(x, y, data_range=2.0, reduction="none", return_full_image=True)
    inside = full[..., HALF_WINDOW:-HALF_WINDOW, HALF_WINDOW:-HALF_WINDOW].mean(dim=(1, 2, 3))
    torch.testing.assert_close(ssim(x, y), inside, rtol=1e-5, atol=1e-6)


def test_psnr_equals_torchmetrics_per_image():
    x, y = noisy_pairs((3, 1, 24, 24))
    expected = peak_signal_noise_ratio(x, y, data_range=2.0, reduction="none", dim=(1, 2, 3))
    torch.testing.assert_close(psnr(x, y), expected)


def test_ms_ssim_is_one_for_equal_images_lower_for_noisier_and_ssim_on_one_scale():
    x, slightly = noisy_pairs((2, 1, 64, 64), noise=0.05)
    _, very = noisy_pairs((2, 1, 64, 64), noise=0.5)
    torch.testing.assert_close(ms_ssim(x, x), torch.ones(2))
    assert (ms_ssim(x, slightly) > ms_ssim(x, very)).all()
    assert [ms_ssim_scales(side, side) for side in (11, 21, 22, 44, 88, 176, 512)] == [1, 1, 2, 3, 4, 5, 5]
    small, small_noisy = noisy_pairs((2, 1, 16, 20))
    torch.testing.assert_close(ms_ssim(small, small_noisy), ssim(small, small_noisy))


def test_loss_is_zero_for_a_perfect_reconstruction_and_the_kl_has_its_closed_form():
    cfg = AutoencoderConfig(ssim_weight=0.5, kl_weight=0.25)
    x, _ = noisy_pairs((2, 1, 32, 32))
    zeros = torch.zeros(2, 4, 8, 8)
    torch.testing.assert_close(autoencoder_loss(x, x, zeros, zeros, cfg), torch.zeros(2), atol=1e-6, rtol=0)
    # KL(N(1, e²) ‖ N(0, 1)) = ½(1 + e² − 1 − 2) per latent element: 256 of them, over 1,024 pixels.
    mean, logvar = torch.ones(2, 4, 8, 8), torch.full((2, 4, 8, 8), 2.0)
    kl_per_element = 0.5 * (1 + torch.e**2 - 1 - 2)
    expected = torch.full((2,), 0.25 * kl_per_element * 256 / 1024)
    torch.testing.assert_close(autoencoder_loss(x, x, mean, logvar, cfg), expected)


def test_spectral_distance_has_its_closed_form_and_ignores_where_a_texture_lies():
    # A constant image c has one nonzero orthonormal DFT coefficient, c·√(HW), among H·(W/2 + 1).
    constant, black = torch.full((1, 1, 8, 12), 0.5), torch.zeros(1, 1, 8, 12)
    expected = 0.5 * (8 * 12) ** 0.5 / (8 * 7)
    torch.testing.assert_close(spectral_distance(black, constant), torch.tensor([expected]))
    texture, _ = noisy_pairs((2, 1, 16, 16))
    shifted = torch.roll(texture, shifts=(3, 5), dims=(2, 3))
    torch.testing.assert_close(spectral_distance(shifted, texture), torch.zeros(2), atol=1e-6, rtol=0)
    assert ((shifted - texture).abs().mean(dim=(1, 2, 3)) > 0.3).all()  # where L1 sees only error
    smoothed = torch.nn.functional.avg_pool2d(texture, 3, stride=1, padding=1)
    assert (spectral_distance(smoothed, texture) > 0.1).all()  # the power a blur removes is missed


def test_spectral_weight_adds_its_term_and_trains_with_finite_gradients_from_black():
    x, y = noisy_pairs((2, 1, 16, 16))
    zeros = torch.zeros(2, 4, 4, 4)
    plain, spectral = AutoencoderConfig(), AutoencoderConfig(spectral_weight=2.0)
    torch.testing.assert_close(
        autoencoder_loss(y, x, zeros, zeros, spectral) - autoencoder_loss(y, x, zeros, zeros, plain),
        2.0 * spectral_distance(y, x),
    )
    black = torch.zeros(2, 1, 16, 16, requires_grad=True)  # every amplitude 0, where |z| has no slope
    autoencoder_loss(black, black.detach(), zeros, zeros, spectral).sum().backward()
    assert torch.isfinite(black.grad).all()


@pytest.mark.parametrize("factor", [4, 8])
def test_latents_are_the_image_over_f_per_side_and_decode_back_on_non_square_slices(factor):
    cfg = AutoencoderConfig(factor=factor, latent_channels=3, channels=8)
    network = Autoencoder(cfg).eval()
    images = torch.zeros(2, 1, 56, 64)
    latents = network.encode(images)
    assert latents.shape == (2, *latent_shape(cfg, (56, 64))) == (2, 3, 56 // factor, 64 // factor)
    assert network.decode(latents).shape == images.shape
    reconstruction, mean, logvar = network(images, torch.zeros_like(latents))
    assert reconstruction.shape == images.shape and mean.shape == logvar.shape == latents.shape


@pytest.mark.parametrize(
    ("key", "value"),
    [("factor", 3), ("latent_channels", 0), ("crop", 30), ("crop", 8), ("kl_weight", -1.0), ("spectral_weight", -0.5)]
    + [("perceptual_weight", -1.0)]
    + [("adversarial_weight", -0.1), ("adversarial_start", -1), ("discriminator_channels", 0)],
)
def test_impossible_settings_are_refused_by_key(key, value):
    with pytest.raises(KneegenError, match=f"model.vae.{key}"):
        AutoencoderConfig(**{key: value}).check()


def vae_config(data, tmp_path, **train):
    return load_config(
        None,
        {
            "data": str(data),
            "device": "cpu",
            "precision": "fp32",
            "model.arch": "vae",
            "model.vae": {"factor": 4, "latent_channels": 4, "channels": 8, "crop": 16},
            "train.batch_size": 10,
            "train.lr": 2e-3,
            "train.warmup_steps": 0,
            "train.ema_decay": 0.0,
            **{f"train.{key}": value for key, value in train.items()},
        },
    )


def test_training_on_random_crops_lowers_the_reconstruction_loss_of_whole_held_out_slices(prepared, tmp_path):
    cfg = vae_config(prepared, tmp_path, epochs=6)
    data = open_cache(prepared)
    compute = resolve_compute("cpu", "fp32")
    state = create_state(cfg, data.image_shape, compute)
    assert training_input_shape(state.network, (1, *data.image_shape)) == (1, 16, 16)  # crops of the 32² slices
    val = data.split("val")
    before = reconstruction_validation(state.network, val, compute, 10)
    for _ in range(cfg.train.epochs):
        for _step in epoch_steps(state, data.split("train"), None, cfg, compute):  # type: ignore[arg-type]
            pass
    after = reconstruction_validation(state.network, val, compute, 10)
    assert after.loss < 0.7 * before.loss
    assert after.psnr > before.psnr + 2 and after.ssim > before.ssim


@pytest.mark.parametrize("norm", ["channel", "group"])
def test_only_the_channel_norm_encodes_a_region_whatever_lies_beyond_its_receptive_field(norm):
    """What makes training on crops honest: with the per-pixel norm, a latent depends only on the
    pixels within its receptive field (~30 pixels here), so a crop encodes as it does inside the
    whole slice; GroupNorm's statistics span the image, so far-away content changes every latent."""
    torch.manual_seed(0)
    network = Autoencoder(AutoencoderConfig(factor=4, latent_channels=2, channels=8, norm=norm)).eval()
    image = torch.rand(1, 1, 128, 128) * 2 - 1
    far_changed = image.clone()
    far_changed[..., 96:] = -1.0  # the right quarter made black background
    with torch.no_grad():
        near = network.encode(image)[..., :4], network.encode(far_changed)[..., :4]  # latent columns 0-3: pixels < 16
    if norm == "channel":
        torch.testing.assert_close(*near, rtol=0, atol=1e-6)
    else:
        assert (near[0] - near[1]).abs().max() > 1e-3


def test_channel_norm_normalises_each_pixel_over_its_channels_in_channels_last_too():
    layer = ChannelNorm(6)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1.0, 7.0))
        layer.bias.fill_(0.5)
    x = torch.randn(2, 6, 5, 7) * 3 + 1
    mean, var = x.mean(dim=1, keepdim=True), x.var(dim=1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-6) * layer.weight.view(1, 6, 1, 1) + 0.5
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x.contiguous(memory_format=torch.channels_last)), expected, rtol=1e-5, atol=1e-5)
