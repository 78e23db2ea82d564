"""Per-image diffusion losses, so that training and the per-t validation share one definition."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kneegen.config import LossKind

HUBER_DELTA = 0.1  # below this error the Huber loss is quadratic, above it linear


def per_image_loss(prediction: Tensor, target: Tensor, kind: LossKind) -> Tensor:
    """(B, C, H, W) × 2 → (B,): the mean error per image in fp32."""
    prediction, target = prediction.float(), target.float()
    if kind == "l1":
        error = F.l1_loss(prediction, target, reduction="none")
    elif kind == "l2":
        error = F.mse_loss(prediction, target, reduction="none")
    else:
        error = F.huber_loss(prediction, target, reduction="none", delta=HUBER_DELTA)
    return error.flatten(1).mean(dim=1)
