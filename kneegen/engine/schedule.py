"""The discrete forward process q(x_t | x_0) and every conversion between predictions.

Notation (Ho et al. 2020; Salimans & Ho 2022 for v):
    ᾱ_t            cumulative product of (1 − β_t), t = 0 … T−1; ᾱ_{−1} = 1 (clean data)
    x_t            = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε
    v              = √ᾱ_t · ε − √(1 − ᾱ_t) · x_0
All formulas live here so that training, validation and every sampler agree.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kneegen.config import Prediction, ScheduleKind

LINEAR_BETA_START = 1e-4  # Ho et al. 2020, T = 1000
LINEAR_BETA_END = 0.02
COSINE_OFFSET = 0.008  # Nichol & Dhariwal 2021, s in eq. 17
MAX_BETA = 0.999  # keeps the cosine schedule's last step finite


class Schedule:
    """ᾱ_t for t = 0 … T−1, kept in float64 so that derived quantities stay exact."""

    def __init__(self, kind: ScheduleKind, timesteps: int) -> None:
        self.kind = kind
        self.betas = make_betas(kind, timesteps)  # β_t, (T,)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # ᾱ_t, (T,)
        self.padded = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])  # ᾱ_{−1} … ᾱ_{T−1}
        self.log_snrs = 0.5 * (self.alphas_cumprod.log() - (1.0 - self.alphas_cumprod).log())  # λ_t, (T,), decreasing
        self.snrs = self.alphas_cumprod / (1.0 - self.alphas_cumprod)  # SNR_t = ᾱ_t / (1 − ᾱ_t) = e^{2λ_t}, (T,)

    @property
    def timesteps(self) -> int:
        return len(self.betas)

    def log_sigmas(self) -> Tensor:
        """(T,) ln σ_t with σ_t = √((1 − ᾱ_t) / ᾱ_t), the noise level of x_t / √ᾱ_t; increasing in t."""
        return -self.log_snrs

    def log_snr(self, t: int) -> float:
        """λ_t = log(α_t / σ_t) of one timestep: the multistep solvers' time variable."""
        return float(self.log_snrs[t])

    def alpha_sigma_at(self, t: int) -> tuple[float, float]:
        """(α_t, σ_t) = (√ᾱ_t, √(1 − ᾱ_t)) of one timestep, as Python floats for the samplers."""
        abar = float(self.alphas_cumprod[t])
        return math.sqrt(abar), math.sqrt(1.0 - abar)

    def alpha_bar(self, t: Tensor) -> Tensor:
        """ᾱ_t for integer t in [−1, T−1], with ᾱ_{−1} = 1; float64, same shape as t."""
        return self.padded[t.long().cpu() + 1].to(t.device)

    def snr(self, t: Tensor) -> Tensor:
        """SNR_t for integer t in [0, T−1]; float64, same shape as t (the loss weights' input)."""
        return self.snrs[t.long().cpu()].to(t.device)

    def alpha_sigma(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(√ᾱ_t, √(1 − ᾱ_t)) shaped (B, 1, 1, 1) to broadcast over images like `like`."""
        abar = self.alpha_bar(t).view(-1, *([1] * (like.dim() - 1)))
        return abar.sqrt().to(like), (1.0 - abar).sqrt().to(like)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) with the given ε (Ho et al. eq. 4)."""
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * x0 + sigma * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor, prediction: Prediction) -> Tensor:
        """What the network is trained to output: ε, or v = √ᾱ ε − √(1−ᾱ) x_0."""
        if prediction == "eps":
            return noise
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * noise - sigma * x0

    def to_x0_eps(self, output: Tensor, x_t: Tensor, t: Tensor, prediction: Prediction) -> tuple[Tensor, Tensor]:
        """Network output → (x̂_0, ε̂), the two views every sampler needs."""
        alpha, sigma = self.alpha_sigma(t, x_t)
        if prediction == "eps":
            eps = output
            return (x_t - sigma * eps) / alpha, eps
        v = output
        return alpha * x_t - sigma * v, sigma * x_t + alpha * v

    def eps_from_x0(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """ε consistent with a (possibly clipped) x̂_0: ε = (x_t − √ᾱ x_0) / √(1−ᾱ)."""
        alpha, sigma = self.alpha_sigma(t, x_t)
        return (x_t - alpha * x0) / sigma

    def posterior_mean_coefs(self, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """The posterior mean μ̃ = c_0 x̂_0 + c_t x_t of q(x_s | x_t, x_0), s < t (Ho et al. eq. 7 between
        any two steps): c_0 = √ᾱ_s (1 − α_{t|s}) / (1 − ᾱ_t), c_t = √α_{t|s} (1 − ᾱ_s) / (1 − ᾱ_t),
        with α_{t|s} = ᾱ_t / ᾱ_s; float64, shaped like t."""
        abar_t, abar_s = self.alpha_bar(t), self.alpha_bar(s)
        alpha_ts = abar_t / abar_s
        return abar_s.sqrt() * (1 - alpha_ts) / (1 - abar_t), alpha_ts.sqrt() * (1 - abar_s) / (1 - abar_t)

    def posterior_variance(self, t: Tensor, s: Tensor) -> Tensor:
        """Var of q(x_s | x_t, x_0) for s < t: (1 − ᾱ_s)/(1 − ᾱ_t) · (1 − ᾱ_t/ᾱ_s); β̃_t when s = t − 1."""
        abar_t, abar_s = self.alpha_bar(t), self.alpha_bar(s)
        return (1.0 - abar_s) / (1.0 - abar_t) * (1.0 - abar_t / abar_s)


def sigma_of_log_snr(log_snr: float) -> float:
    """σ from λ = log(α/σ) on a variance-preserving schedule (α² + σ² = 1)."""
    return 1 / math.sqrt(1 + math.exp(2 * log_snr))


def make_betas(kind: ScheduleKind, timesteps: int) -> Tensor:
    """β_1 … β_T as float64: linear (the original) or cosine (better at low resolution)."""
    if kind == "linear":
        scale = 1000.0 / timesteps  # keeps the end point of T = 1000 for other T
        return torch.linspace(scale * LINEAR_BETA_START, scale * LINEAR_BETA_END, timesteps, dtype=torch.float64)

    def f(u: float) -> float:
        return math.cos((u + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2

    betas = [min(1.0 - f((i + 1) / timesteps) / f(i / timesteps), MAX_BETA) for i in range(timesteps)]
    return torch.tensor(betas, dtype=torch.float64)
