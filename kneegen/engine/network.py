"""Build the configured denoising network and check that it fits the image size."""

from __future__ import annotations

from torch import nn

from kneegen.config import ModelConfig
from kneegen.engine.seed_unet import SeedUNet
from kneegen.engine.unet import UNet
from kneegen.errors import KneegenError

SEED_DOWNSAMPLES = 4  # the original U-Net pools four times


def build_network(cfg: ModelConfig, image_shape: tuple[int, int], image_channels: int = 1) -> nn.Module:
    """The network for `cfg`, after checking that H and W survive every downsampling."""
    check_image_size(cfg, image_shape)
    if cfg.arch == "seed":
        return SeedUNet(image_channels)
    return UNet(cfg, image_channels)


def size_multiple(cfg: ModelConfig) -> int:
    """H and W must be multiples of this for the skips to line up on the way back up."""
    if cfg.arch == "seed":
        return 2**SEED_DOWNSAMPLES
    return cfg.patch_size * 2 ** (len(cfg.channel_mults) - 1)


def check_image_size(cfg: ModelConfig, image_shape: tuple[int, int]) -> None:
    multiple = size_multiple(cfg)
    height, width = image_shape
    if height % multiple or width % multiple:
        fit = f"{max(1, round(height / multiple)) * multiple}x{max(1, round(width / multiple)) * multiple}"
        raise KneegenError(
            f"image size {height}x{width} cannot be downsampled by model.arch={cfg.arch} "
            f"(needs multiples of {multiple}): prepare the data with --size {fit}, or change "
            f"model.channel_mults / model.patch_size"
        )
    if cfg.arch == "unet" and any(not 0 <= level < len(cfg.channel_mults) for level in cfg.attention_levels):
        raise KneegenError(
            f"model.attention_levels {cfg.attention_levels}: levels must be between 0 and "
            f"{len(cfg.channel_mults) - 1} (one per entry of model.channel_mults)"
        )
