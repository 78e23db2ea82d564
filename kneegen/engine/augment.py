"""Optional light augmentation of training batches, off by default.

Knee slices have a meaning that most augmentations break: a left/right flip turns a left knee
into a right one (so `flip` is there only for users who want side-agnostic samples), and
strong crops or rotations create anatomy no scanner makes. What is offered is small: a shift
of a few pixels and a mild intensity scale, both drawn from the training generator so a
resumed run repeats them exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kneegen.config import AugmentKind

MAX_SHIFT = 0.04  # of the image side
MAX_INTENSITY_SCALE = 0.1  # ± of the contrast around black


def augment(x: Tensor, kinds: list[AugmentKind], generator: torch.Generator) -> Tensor:
    """(B, 1, H, W) in [-1, 1] → the same shape, each image changed by its own random draw."""
    for kind in kinds:
        if kind == "shift":
            x = random_shift(x, generator)
        elif kind == "intensity":
            x = random_intensity(x, generator)
        elif kind == "flip":
            x = random_flip(x, generator)
    return x


def random_shift(x: Tensor, generator: torch.Generator) -> Tensor:
    """Translate each image by up to MAX_SHIFT of its size; the uncovered border is black (-1)."""
    batch, _, height, width = x.shape
    limits = torch.tensor([height, width]) * MAX_SHIFT
    offsets = ((torch.rand(batch, 2, generator=generator) * 2 - 1) * limits).round().long()  # (B, 2)
    shifted = torch.full_like(x, -1.0)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        shifted[i, :, max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = x[
            i, :, max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)
        ]
    return shifted


def random_intensity(x: Tensor, generator: torch.Generator) -> Tensor:
    """Scale each image's intensities above black by 1 ± MAX_INTENSITY_SCALE, clipped to [-1, 1]."""
    scale = 1 + (torch.rand(x.shape[0], 1, 1, 1, generator=generator) * 2 - 1) * MAX_INTENSITY_SCALE
    return ((x + 1) * scale.to(x.device) - 1).clamp(-1, 1)


def random_flip(x: Tensor, generator: torch.Generator) -> Tensor:
    """Mirror half of the images left-right (this swaps knee sides)."""
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)
