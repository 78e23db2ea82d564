"""kneegen's default denoiser: a residual U-Net in the style of Ho et al. / Dhariwal & Nichol.

Residual blocks with GroupNorm and SiLU, the time embedding injected as a per-channel
scale/shift, self-attention on the coarse levels only (where it is cheap), strided-conv down
and nearest+conv up. An optional pixel-unshuffle folds `patch_size`² pixels into channels
first, which makes small CPU models several times faster at the same quality. Unfolding at the
end writes each p×p patch from one position's features, so neighbouring patches meet at a seam;
an optional `unfold_head` adds one 3×3 convolution at full resolution after the unfold (as
U-ViT does after its patch decoder, Bao et al. 2023) that sees across those seams and the noisy
image's own pixels, for a few MFLOP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kneegen.engine.conditioning import ConditionEmbedding
from kneegen.engine.sinusoidal import sinusoidal_embedding
from kneegen.errors import KneegenError

GROUPS = 32  # GroupNorm groups, reduced for narrow layers by `norm`
HEAD_CHANNELS = 64  # channels per attention head


@dataclass
class UNetConfig:
    """The U-Net's own keys, under `model.unet` in a run config."""

    channels: int = 64  # width of the first level; later levels multiply it
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 2])
    blocks_per_level: int = 2
    attention_levels: list[int] = field(default_factory=lambda: [2])  # 0 = first level
    patch_size: int = 1  # pixel-unshuffle factor applied before the first level
    unfold_head: int = 0  # with patch_size > 1: channels unfolded into a full-resolution 3×3 conv; 0 = none
    dropout: float = 0.0

    def check(self) -> None:
        """The bounds the types cannot express, each named by its key."""
        for key in ("channels", "blocks_per_level", "patch_size"):
            if getattr(self, key) < 1:
                raise KneegenError(
                    f"model.unet.{key} = {getattr(self, key)} must be ≥ 1: fix it in the config or "
                    f"with --set model.unet.{key}=…"
                )
        if self.unfold_head < 0 or (self.unfold_head and self.patch_size == 1):
            raise KneegenError(
                f"model.unet.unfold_head = {self.unfold_head} needs model.unet.patch_size > 1 and a "
                "count of channels ≥ 1 (0 = no full-resolution head): fix it in the config or with "
                "--set model.unet.unfold_head=…"
            )
        if not 0 <= self.dropout < 1:
            raise KneegenError(
                f"model.unet.dropout = {self.dropout} must be ≥ 0 and < 1: fix it in the config or "
                "with --set model.unet.dropout=…"
            )
        if not self.channel_mults or min(self.channel_mults) < 1:
            raise KneegenError(
                f"model.unet.channel_mults {self.channel_mults}: give one width multiplier ≥ 1 per "
                "level, e.g. [1, 2, 2]"
            )
        if any(not 0 <= level < len(self.channel_mults) for level in self.attention_levels):
            raise KneegenError(
                f"model.unet.attention_levels {self.attention_levels}: levels must be between 0 and "
                f"{len(self.channel_mults) - 1} (one per entry of model.unet.channel_mults)"
            )

    def size_multiple(self) -> int:
        """The patch fold, then one halving per level after the first."""
        return self.patch_size * 2 ** (len(self.channel_mults) - 1)


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(GROUPS, channels), channels)


class ResBlock(nn.Module):
    """norm → SiLU → conv, then the time embedding as (1 + scale, shift), then norm → SiLU → conv."""

    def __init__(self, in_ch: int, out_ch: int, time_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time = nn.Linear(time_dim, 2 * out_ch)
        self.norm2 = norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.time(emb)[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H·W positions, residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.heads = max(1, channels // HEAD_CHANNELS)
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(dim=1)  # (B, heads, HW, C/heads) each
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.out(y)


class Level(nn.Module):
    """The blocks of one resolution, each optionally followed by attention."""

    def __init__(self, channels: list[tuple[int, int]], time_dim: int, dropout: float, attention: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(i, o, time_dim, dropout) for i, o in channels)
        self.attns = nn.ModuleList(Attention(o) if attention else nn.Identity() for _, o in channels)


class UNet(nn.Module):
    """forward(x (B, C, H, W) in [-1, 1], t (B,) integer, c (B, K) conditions) → (B, C, H, W) prediction."""

    def __init__(self, cfg: UNetConfig, image_channels: int = 1, conditions: list[str] | None = None) -> None:
        super().__init__()
        base, patch = cfg.channels, cfg.patch_size
        widths = [base * m for m in cfg.channel_mults]
        time_dim = 4 * base
        self.patch = patch
        self.base = base
        self.time_mlp = nn.Sequential(nn.Linear(base, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.stem = nn.Conv2d(image_channels * patch * patch, base, 3, padding=1)

        # Encoder: per level, `blocks_per_level` blocks; the output of each is kept as a skip.
        self.down_levels = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        skip_widths = [base]
        width = base
        for level, out in enumerate(widths):
            pairs = []
            for _ in range(cfg.blocks_per_level):
                pairs.append((width, out))
                width = out
                skip_widths.append(width)
            self.down_levels.append(Level(pairs, time_dim, cfg.dropout, level in cfg.attention_levels))
            last = level == len(widths) - 1
            self.downsamples.append(nn.Identity() if last else nn.Conv2d(width, width, 3, stride=2, padding=1))
            if not last:
                skip_widths.append(width)

        self.mid = Level([(width, width), (width, width)], time_dim, cfg.dropout, attention=False)
        self.mid_attn = Attention(width)

        # Decoder: mirror of the encoder, one extra block per level to take the downsample skip.
        self.up_levels = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for level, out in reversed(list(enumerate(widths))):
            pairs = []
            for _ in range(cfg.blocks_per_level + 1):
                pairs.append((width + skip_widths.pop(), out))
                width = out
            self.up_levels.append(Level(pairs, time_dim, cfg.dropout, level in cfg.attention_levels))
            self.upsamples.append(nn.Conv2d(width, width, 3, padding=1) if level > 0 else nn.Identity())

        unfolded = cfg.unfold_head or image_channels  # channels per pixel after the unfold
        self.head = nn.Sequential(norm(width), nn.SiLU(), nn.Conv2d(width, unfolded * patch * patch, 3, padding=1))
        # The unfolded channels and the noisy image → the prediction, across the patches' seams.
        self.unfold_head = (
            nn.Conv2d(unfolded + image_channels, image_channels, 3, padding=1) if cfg.unfold_head else None
        )
        last = self.unfold_head if self.unfold_head is not None else self.head[-1]
        nn.init.zeros_(last.weight)  # the network starts as a zero predictor
        nn.init.zeros_(last.bias)
        # Built last, so the other weights start as an unconditional model's of the same seed.
        self.conditioning = ConditionEmbedding(conditions, time_dim, base) if conditions else None

    def forward(self, x: Tensor, t: Tensor, c: Tensor | None = None) -> Tensor:
        """c: (B, K) conditions, NaN where not given (engine/conditioning.py); None = none given."""
        emb = self.time_mlp(sinusoidal_embedding(t, self.base))  # (B, time_dim)
        if self.conditioning is not None:
            emb = emb + self.conditioning(c, len(x), x.device)
        elif c is not None:
            raise ValueError("this network was built without conditions")
        h = self.stem(F.pixel_unshuffle(x, self.patch) if self.patch > 1 else x)
        skips = [h]
        for level, down in zip(self.down_levels, self.downsamples):
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(h, emb))
                skips.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)  # (B, C, H/2, W/2)
                skips.append(h)
        h = self.mid.blocks[0](h, emb)
        h = self.mid_attn(h)
        h = self.mid.blocks[1](h, emb)
        for level, up in zip(self.up_levels, self.upsamples):
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(torch.cat([h, skips.pop()], dim=1), emb))
            if not isinstance(up, nn.Identity):
                h = up(F.interpolate(h, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)
        out = self.head(h)
        out = F.pixel_shuffle(out, self.patch) if self.patch > 1 else out
        if self.unfold_head is not None:
            out = self.unfold_head(torch.cat([F.silu(out), x], dim=1))
        return out
