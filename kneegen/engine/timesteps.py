"""Which timesteps t a training step trains on: uniformly drawn, drawn by importance, or drawn
by noise level from a log-normal.

Importance sampling is the loss-second-moment resampler of Nichol & Dhariwal 2021 ("Improved
Denoising Diffusion Probabilistic Models", sec. 3.3): the loss of a uniform-t objective varies
greatly with t, so drawing t with p_t ∝ √E[L_t²] and weighting each image's loss by 1/(T p_t)
keeps the expected loss while lowering the variance of its gradient. E[L_t²] comes from the last
H per-image losses seen at each t; until every t has H of them, t stays uniform.

Log-normal t follows Karras et al. 2022 ("Elucidating the Design Space…", sec. 5): the noise level
σ_t = √((1 − ᾱ_t) / ᾱ_t) is drawn as ln σ ~ N(P_mean, P_std²) and mapped to the nearest t. Uniform t
on a cosine schedule spends much of training at σ > 5, where an image is all noise and little is
learnt; the log-normal puts most draws below σ = 1, where the structure and texture of an image
are decided. Its weights are 1: the objective itself changes, as in EDM. EDM's P_mean = −1.2 is
ln(0.6 σ_data) for data of standard deviation σ_data = 0.5; knee slices in [-1, 1] are mostly
dark background and vary far less (σ_data ≈ 0.258), so the recipes centre the draws on
ln(0.6 · 0.258) = −1.86 instead. `diffusion.lognormal_mean: auto` (the recipes') measures the
training split's standard deviation and centres on ln(0.6 σ_data) for whatever data is trained on
(README, "Recipes by hardware").

All draws come from the generator the caller passes, and the history is a plain state_dict, so
processes that update it with the same losses draw the same t, and a resumed run draws on exactly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kneegen.config import TimestepSampling

HISTORY = 10  # per-image losses kept per t (H; the paper's 10)
EDM_CENTRE = 0.6  # EDM's P_mean = ln(0.6 σ_data): −1.2 for its σ_data = 0.5
UNIFORM_SHARE = 0.001  # ε of p = (1 − ε) p + ε / T: every t keeps being drawn, and weights stay ≤ 1 / ε


def centred_lognormal_mean(data_std: float) -> float:
    """P_mean for data of standard deviation `data_std`: EDM's centre relative to the data's spread."""
    return math.log(EDM_CENTRE * data_std)


class TimestepSampler:
    """Draws the timesteps of a batch and their loss weights; keeps the loss history that
    importance sampling draws from (uniform t ignores it, and training does not update it)."""

    def __init__(
        self,
        timesteps: int,
        kind: TimestepSampling,
        log_sigmas: Tensor | None = None,
        lognormal: tuple[float, float] | None = None,
    ) -> None:
        """`log_sigmas` (T,) ln σ_t of the schedule (`Schedule.log_sigmas`) and `lognormal` (P_mean,
        P_std) are for the log-normal kind only."""
        self.timesteps = timesteps
        self.importance = kind == "importance"
        self.log_sigmas = None  # (T,) ln σ_t, increasing in t, for log-normal draws
        self.lognormal_params = lognormal  # (P_mean, P_std) of those draws
        if kind == "lognormal":
            if log_sigmas is None or lognormal is None:
                raise ValueError("log-normal timesteps need the schedule's ln σ_t and (P_mean, P_std)")
            self.log_sigmas = log_sigmas
        self.losses = torch.zeros((timesteps, HISTORY), dtype=torch.float64)  # (T, H) a ring of losses per t
        self.seen = torch.zeros(timesteps, dtype=torch.int64)  # (T,) losses pushed per t; ring slot = seen % H

    @property
    def ready(self) -> bool:
        """Importance sampling with H losses at every t; t is uniform until then."""
        return self.importance and bool((self.seen >= HISTORY).all())

    def probabilities(self) -> Tensor:
        """(T,) fp64 p_t ∝ √(mean of the stored L_t²), mixed with uniform by `UNIFORM_SHARE`."""
        rms = self.losses.square().mean(dim=1).sqrt()  # (T,) √E[L_t²]
        return (1.0 - UNIFORM_SHARE) * rms / rms.sum() + UNIFORM_SHARE / self.timesteps

    def draw(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(B,) timesteps from `generator` alone and (B,) fp32 loss weights 1 / (T p_t), which keep
        the expected weighted loss that of uniform t. Uniform t is `torch.randint` with weights 1."""
        if self.log_sigmas is not None:
            return self.lognormal(batch_size, generator), torch.ones(batch_size)
        if not self.ready:
            return torch.randint(0, self.timesteps, (batch_size,), generator=generator), torch.ones(batch_size)
        p = self.probabilities()
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        return t, (1.0 / (self.timesteps * p[t])).float()

    def lognormal(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """(B,) the t whose ln σ_t is nearest to ln σ ~ N(P_mean, P_std²)."""
        mean, std = self.lognormal_params  # type: ignore[misc]  # set whenever log_sigmas is
        log_sigma = mean + std * torch.randn(batch_size, generator=generator, dtype=torch.float64)
        above = torch.searchsorted(self.log_sigmas, log_sigma).clamp(
            1, self.timesteps - 1
        )  # first t with ln σ_t ≥ ln σ
        below = above - 1
        nearer_below = (log_sigma - self.log_sigmas[below]) < (self.log_sigmas[above] - log_sigma)
        return torch.where(nearer_below, below, above)

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Push the (B,) unweighted per-image losses of a batch's (B,) timesteps into the rings,
        in batch order: a t drawn k times fills k consecutive slots (of more than H, the last H)."""
        t, losses = t.cpu(), losses.detach().cpu().double()
        # 1. Each image's rank among the batch's images of the same t: 0, 1, … in batch order.
        sorted_t, order = torch.sort(t, stable=True)
        rank_in_sorted = torch.arange(len(t)) - torch.searchsorted(sorted_t, sorted_t)  # minus the first index
        rank = torch.empty_like(rank_in_sorted).scatter_(0, order, rank_in_sorted)
        # 2. Write them at seen + rank in the ring, skipping what later images of the same t overwrite.
        repeats = torch.bincount(t, minlength=self.timesteps)  # (T,)
        kept = rank >= repeats[t] - HISTORY
        slot = (self.seen[t] + rank) % HISTORY
        self.losses[t[kept], slot[kept]] = losses[kept]
        self.seen += repeats

    def state_dict(self) -> dict[str, Tensor]:
        return {"losses": self.losses.clone(), "seen": self.seen.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.losses.copy_(state["losses"])
        self.seen.copy_(state["seen"])
