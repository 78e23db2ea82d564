"""Per-image diffusion losses, so that training and the per-t validation share one definition,
and the Min-SNR-γ weights that training may put on them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kneegen.config import LossKind, Prediction

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


def min_snr_weight(snr: Tensor, gamma: float, prediction: Prediction) -> Tensor:
    """(B,) SNR_t (Schedule.snr) → (B,) fp32 loss weights of Min-SNR-γ (Hang et al. 2023); all ones when γ = 0.

    The paper weights the x_0 error by min(SNR_t, γ), SNR_t = ᾱ_t / (1 − ᾱ_t). A squared ε error is
    SNR_t times the x_0 error and a squared v error (SNR_t + 1) times it, so in the network's own
    target the weight is min(SNR, γ) / SNR for ε-prediction and min(SNR, γ) / (SNR + 1) for v.
    """
    if gamma <= 0:
        return torch.ones(snr.shape, dtype=torch.float32, device=snr.device)
    clipped = snr.clamp(max=gamma)  # min(SNR_t, γ)
    weight = clipped / snr if prediction == "eps" else clipped / (snr + 1.0)
    return weight.float()
