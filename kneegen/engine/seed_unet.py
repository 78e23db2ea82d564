"""The original system's plain U-Net (`arch: seed`), kept to compare against.

1→64→128→256→512 with a 1024 bottleneck; each block is conv3×3-BatchNorm-ReLU, plus the time
embedding, then conv3×3-BatchNorm-ReLU; max-pool down, transposed conv up, skip concatenation.
Time: 32-d sinusoidal → Linear(32, 32) → ReLU, then per block Linear(32, C) → ReLU added over
H×W. 31,140,577 parameters for one image channel. Unlike the original, BatchNorm follows the
module's train/eval mode, which the training loop and samplers set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kneegen.engine.sinusoidal import sinusoidal_embedding

TIME_DIM = 32
WIDTHS = (64, 128, 256, 512)
BOTTLENECK = 1024
DOWNSAMPLES = len(WIDTHS)  # one max-pool per encoder level


@dataclass
class SeedUNetConfig:
    """The original's U-Net has no settings: its shape is fixed, as it was."""

    def check(self) -> None:
        """Nothing to check: there are no keys."""

    def size_multiple(self) -> int:
        return 2**DOWNSAMPLES


class SeedBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU())
        self.time = nn.Sequential(nn.Linear(TIME_DIM, out_ch), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(out_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU())

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(x) + self.time(emb)[:, :, None, None]  # time added over H×W
        return self.conv2(h)


class SeedUNet(nn.Module):
    """forward(x (B, C, H, W), t (B,)) → (B, C, H, W); H and W divisible by 16."""

    def __init__(self, cfg: SeedUNetConfig, image_channels: int = 1) -> None:
        super().__init__()
        self.time_mlp = nn.Sequential(nn.Linear(TIME_DIM, TIME_DIM), nn.ReLU())
        chans = [image_channels, *WIDTHS]
        self.down = nn.ModuleList(SeedBlock(i, o) for i, o in zip(chans[:-1], chans[1:]))
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = SeedBlock(WIDTHS[-1], BOTTLENECK)
        ups = [BOTTLENECK, *reversed(WIDTHS)]
        self.up = nn.ModuleList(nn.ConvTranspose2d(i, o, 2, stride=2) for i, o in zip(ups[:-1], ups[1:]))
        self.dec = nn.ModuleList(SeedBlock(2 * o, o) for o in ups[1:])
        self.out = nn.Conv2d(WIDTHS[0], image_channels, 1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        emb = self.time_mlp(sinusoidal_embedding(t, TIME_DIM))  # (B, 32)
        skips = []
        for block in self.down:
            x = block(x, emb)
            skips.append(x)
            x = self.pool(x)  # (B, C, H/2, W/2)
        x = self.bottleneck(x, emb)
        for up, block in zip(self.up, self.dec):
            x = block(torch.cat([up(x), skips.pop()], dim=1), emb)  # (B, C, 2H, 2W)
        return self.out(x)
