"""A KL-regularised convolutional autoencoder (Rombach et al. 2022, sec. 3): the image ↔ latent map
of latent diffusion.

The encoder halves the resolution log2(f) times and gives a diagonal Gaussian per latent pixel
(mean, log-variance); the decoder mirrors it. There is no attention, and the normalisation is
per pixel (`ChannelNorm`), so every output depends only on the inputs within its receptive field:
the network trains on random crops and encodes whole slices of any size that is a multiple of f
as it encoded the crops. GroupNorm, the paper's normalisation, breaks that: its statistics span
the whole input, and a knee slice is mostly black background while a crop of it often is not, so
an autoencoder trained on crops with it reconstructed whole slices grey and framed (128² crops,
8 minutes: reconstruction FID 99.3 and PSNR 27.4 dB with GroupNorm, 75.9 and 31.0 dB with the
channel norm; README, "Latent diffusion at 256²"). `model.vae.norm: group` keeps it, as every
autoencoder checkpoint before format 3 has it.
The loss (`autoencoder_loss`) is L1 + a multi-scale SSIM term + a small KL weight, all per image,
and optionally a distance between amplitude spectra (`spectral_weight`): L1 and SSIM reward the
mean of what the latent cannot pin down, so fine noise-like texture comes back smoothed; the
amplitude spectrum asks for that texture's power at each frequency without asking for its phase
(the idea of Jiang et al. 2021's focal frequency loss, unweighted); and optionally LPIPS's distance
on the FID Inception's early layers (`perceptual_weight`, engine/perceptual.py), which asks for
texture that looks like the slice's, as the paper's LPIPS term does. A patch discriminator may
judge the reconstructions too (`adversarial_weight`, engine/adversary.py), as the paper's does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kneegen.engine.perceptual import perceptual_distance
from kneegen.engine.ssim import ms_ssim
from kneegen.errors import KneegenError

NormKind = Literal["channel", "group"]
GROUPS = 32  # GroupNorm groups (fewer when a layer has fewer channels)
NORM_EPS = 1e-6  # ChannelNorm's ε (LayerNorm's, as in ConvNeXt)
LOGVAR_RANGE = (-30.0, 20.0)  # as in the paper's code: keeps exp(logvar) finite in bf16/fp32


@dataclass
class AutoencoderConfig:
    """`model.vae` settings (`model.arch: vae`): the shape, and the loss it trains with."""

    factor: int = 4  # f: each side of the latent is the image's / f (4 or 8: 16× or 64× fewer pixels)
    latent_channels: int = 4
    channels: int = 64  # width at full resolution; doubles at each halving, up to 4×
    blocks_per_level: int = 1  # residual blocks at each resolution, in the encoder and the decoder
    norm: NormKind = "channel"  # per-pixel LayerNorm over channels, or GroupNorm (see module)
    crop: int = 128  # train on random crops of this side (0 = whole images); validation uses whole images
    ssim_weight: float = 0.5  # weight of (1 − MS-SSIM) beside L1
    kl_weight: float = 1e-6  # weight of the KL term summed over the latent, per image pixel (the paper's 1e-6)
    spectral_weight: float = 0.0  # weight of the amplitude-spectrum distance (`spectral_distance`); 0 = off
    perceptual_weight: float = 0.0  # weight of the Inception-feature distance (engine/perceptual.py); 0 = off
    adversarial_weight: float = 0.0  # weight of a patch discriminator's judgement (engine/adversary.py); 0 = none
    adversarial_start: int = 1  # the epoch from which the discriminator trains and judges (0 = the first)
    discriminator_channels: int = 64  # its first layer's width, doubling at each halving up to 8×

    def check(self) -> None:
        if self.factor not in (2, 4, 8, 16):
            raise KneegenError(f"model.vae.factor = {self.factor} must be 2, 4, 8 or 16")
        for key in ("latent_channels", "channels", "blocks_per_level", "discriminator_channels"):
            if getattr(self, key) < 1:
                raise KneegenError(f"model.vae.{key} = {getattr(self, key)} must be ≥ 1")
        if self.crop and (self.crop < 16 or self.crop % self.factor):
            raise KneegenError(
                f"model.vae.crop = {self.crop} must be 0 (whole images) or a multiple of "
                f"factor {self.factor} of at least 16"
            )
        weights = ("ssim_weight", "kl_weight", "spectral_weight", "perceptual_weight", "adversarial_weight")
        for key in (*weights, "adversarial_start"):
            if getattr(self, key) < 0:
                raise KneegenError(f"model.vae.{key} = {getattr(self, key)} must be ≥ 0")

    def size_multiple(self) -> int:
        return self.factor

    def widths(self) -> list[int]:
        """Channels at each resolution, full resolution first: one more than the halvings."""
        levels = self.factor.bit_length()  # log2(f) + 1
        return [self.channels * min(2**level, 4) for level in range(levels)]


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of each pixel, with a learnt scale and shift per channel: the
    statistics of one position only, so a crop is normalised as it is inside the whole image."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        channels_last = x.permute(0, 2, 3, 1)  # (B, H, W, C): a view, contiguous for channels_last inputs
        weight, bias = self.weight.to(x.dtype), self.bias.to(x.dtype)
        return F.layer_norm(channels_last, (x.shape[1],), weight, bias, NORM_EPS).permute(0, 3, 1, 2)


def norm(channels: int, kind: NormKind) -> nn.Module:
    return ChannelNorm(channels) if kind == "channel" else nn.GroupNorm(min(GROUPS, channels), channels)


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kind: NormKind) -> None:
        super().__init__()
        self.norm1, self.conv1 = norm(in_channels, kind), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2, self.conv2 = norm(out_channels, kind), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Encoder(nn.Module):
    """(B, C, H, W) → (B, 2·latent_channels, H/f, W/f): the posterior's mean and log-variance."""

    def __init__(self, cfg: AutoencoderConfig, image_channels: int) -> None:
        super().__init__()
        widths = cfg.widths()
        self.stem = nn.Conv2d(image_channels, widths[0], 3, padding=1)
        layers: list[nn.Module] = []
        for level, width in enumerate(widths):
            previous = widths[max(level - 1, 0)]
            layers += [
                ResBlock(previous if block == 0 else width, width, cfg.norm) for block in range(cfg.blocks_per_level)
            ]
            if level < len(widths) - 1:
                layers.append(nn.Conv2d(width, width, 3, stride=2, padding=1))  # halve H and W
        self.levels = nn.Sequential(*layers)
        self.middle = ResBlock(widths[-1], widths[-1], cfg.norm)
        self.head = nn.Sequential(
            norm(widths[-1], cfg.norm), nn.SiLU(), nn.Conv2d(widths[-1], 2 * cfg.latent_channels, 3, padding=1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.middle(self.levels(self.stem(x))))


class Decoder(nn.Module):
    """(B, latent_channels, h, w) → (B, C, h·f, w·f)."""

    def __init__(self, cfg: AutoencoderConfig, image_channels: int) -> None:
        super().__init__()
        widths = cfg.widths()[::-1]  # coarsest first
        self.stem = nn.Conv2d(cfg.latent_channels, widths[0], 3, padding=1)
        self.middle = ResBlock(widths[0], widths[0], cfg.norm)
        layers: list[nn.Module] = []
        for level, width in enumerate(widths):
            previous = widths[max(level - 1, 0)]
            layers += [
                ResBlock(previous if block == 0 else width, width, cfg.norm) for block in range(cfg.blocks_per_level)
            ]
            if level < len(widths) - 1:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, width, 3, padding=1)]
        self.levels = nn.Sequential(*layers)
        self.head = nn.Sequential(
            norm(widths[-1], cfg.norm), nn.SiLU(), nn.Conv2d(widths[-1], image_channels, 3, padding=1)
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.head(self.levels(self.middle(self.stem(z))))


class Autoencoder(nn.Module):
    """Encoder and decoder; `forward` is the training pass, `encode`/`decode` the maps latent diffusion uses."""

    def __init__(self, cfg: AutoencoderConfig, image_channels: int = 1) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg, image_channels)
        self.decoder = Decoder(cfg, image_channels)

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, log-variance) of q(z | x), each (B, latent_channels, H/f, W/f)."""
        mean, logvar = self.encoder(x).float().chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def encode(self, x: Tensor) -> Tensor:
        """The posterior mean: the deterministic latent of each image, what the latent cache holds."""
        return self.posterior(x)[0]

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def last_layer(self) -> Tensor:
        """The decoder's output weight, where the adversarial term is balanced against the others."""
        return self.decoder.head[-1].weight

    def forward(self, x: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(reconstruction, mean, log-variance) with z = mean + σ·`noise` (the reparameterisation;
        the noise comes from the caller, drawn from the training generator)."""
        mean, logvar = self.posterior(x)
        z = mean + torch.exp(0.5 * logvar) * noise
        return self.decode(z), mean, logvar


def latent_shape(cfg: AutoencoderConfig, image_shape: tuple[int, int]) -> tuple[int, int, int]:
    """(C, h, w) of the latent of an (H, W) image."""
    return cfg.latent_channels, image_shape[0] // cfg.factor, image_shape[1] // cfg.factor


def autoencoder_loss(
    reconstruction: Tensor,
    target: Tensor,
    mean: Tensor,
    logvar: Tensor,
    cfg: AutoencoderConfig,
    autocast: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
) -> Tensor:
    """Per image (B,): mean |x̂ − x| + ssim_weight·(1 − MS-SSIM) + spectral_weight·(amplitude-spectrum
    distance) + perceptual_weight·(Inception-feature distance, engine/perceptual.py) +
    kl_weight·KL(q(z|x) ‖ N(0, I)) summed over the latent and divided by the image's pixels (so
    kl_weight means what it means in the paper, whose reconstruction term is a per-pixel sum).
    The Inception runs under `autocast` (the run's precision); every other term in float32."""
    perceptual: Tensor | float = 0.0
    if cfg.perceptual_weight:
        with autocast():
            perceptual = perceptual_distance(target.device)(reconstruction, target)
    reconstruction = reconstruction.float()
    l1 = (reconstruction - target).abs().mean(dim=(1, 2, 3))
    structural = 1.0 - ms_ssim(reconstruction, target) if cfg.ssim_weight else torch.zeros_like(l1)
    spectral = spectral_distance(reconstruction, target) if cfg.spectral_weight else torch.zeros_like(l1)
    kl = 0.5 * (mean**2 + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3))
    pixels = target[0].numel()
    return (
        l1
        + cfg.ssim_weight * structural
        + cfg.spectral_weight * spectral
        + cfg.perceptual_weight * perceptual
        + cfg.kl_weight * kl / pixels
    )


def spectral_distance(reconstruction: Tensor, target: Tensor) -> Tensor:
    """Per image (B,): the mean over channels and frequencies of ||F x̂| − |F x||, F the orthonormal
    2-D DFT (so a frequency's amplitude is in pixel units, as L1 is). Blind to phase: a texture of
    the right power scores 0 wherever its grains lie, and so does any circular shift of x."""
    reconstructed = torch.fft.rfft2(reconstruction, norm="ortho").abs()  # (B, C, H, W/2+1)
    real = torch.fft.rfft2(target, norm="ortho").abs()
    return (reconstructed - real).abs().mean(dim=(1, 2, 3))
