"""Samplers: functions of (denoiser, x_T, timesteps, per-image noise) with no hidden state.

A denoiser maps (x_t, t) to (x̂_0, ε̂). Timesteps run from high to low and are passed in;
the step after the last one lands on ᾱ = 1, i.e. on x̂_0. Randomness comes only from
`ImageNoise`, one generator per image, so image k of a run is the same whatever the batch.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor

from kneegen.engine.schedule import Schedule
from kneegen.errors import KneegenError

Denoiser = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
StepCallback = Callable[[int, Tensor, Tensor], None]  # (step index, x_t, x̂_0)


class ImageNoise:
    """Gaussian noise drawn per image from its own seed (as in EDM), on the CPU for portability."""

    def __init__(self, seeds: Sequence[int], device: torch.device) -> None:
        self.generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        self.device = device

    def randn(self, image_shape: Sequence[int]) -> Tensor:
        """(B, *image_shape) standard normal, image b drawn from generator b."""
        draws = [torch.randn(tuple(image_shape), generator=g) for g in self.generators]
        return torch.stack(draws).to(self.device)


class Sampler(Protocol):
    def __call__(
        self,
        denoise: Denoiser,
        x: Tensor,
        timesteps: Sequence[int],
        schedule: Schedule,
        noise: ImageNoise,
        on_step: StepCallback | None = None,
    ) -> Tensor: ...


def sample_timesteps(total: int, steps: int, schedule: Schedule | None = None) -> list[int]:
    """`steps` integer timesteps from T−1 down to 0, the first always T−1.

    Evenly spaced in t, or, given a `schedule`, evenly spaced in log-SNR λ = log(α/σ), which
    keeps the step sizes of the multistep solvers even (Lu et al. 2022, sec. 3.3).
    """
    if not 1 <= steps <= total:
        raise KneegenError(f"--steps {steps}: must be between 1 and the model's {total} timesteps")
    if schedule is None:
        grid = torch.linspace(total - 1, 0, steps).round().long().tolist()
        return list(dict.fromkeys(grid))
    abar = schedule.alphas_cumprod
    lambdas = 0.5 * (abar.log() - (1 - abar).log())  # decreasing in t, (T,)
    targets = torch.linspace(lambdas[-1].item(), lambdas[0].item(), steps, dtype=torch.float64)
    nearest = (lambdas[None, :] - targets[:, None]).abs().argmin(dim=1).tolist()
    return list(dict.fromkeys(nearest))


def ddpm(
    denoise: Denoiser,
    x: Tensor,
    timesteps: Sequence[int],
    schedule: Schedule,
    noise: ImageNoise,
    on_step: StepCallback | None = None,
) -> Tensor:
    """Ancestral sampling (Ho et al. 2020, Alg. 2) via the posterior q(x_s | x_t, x̂_0).

    With every timestep this is the original's sampler: σ² = β̃_t, mean only at the last step.
    With a subset of timesteps it is the same posterior between the visited steps.
    """
    for i, (t, s) in enumerate(step_pairs(timesteps, x)):
        x0, _ = denoise(x, t)
        if on_step is not None:
            on_step(i, x, x0)
        abar_t, abar_s = schedule.alpha_bar(t), schedule.alpha_bar(s)
        alpha_ts = abar_t / abar_s  # α_{t|s} = ᾱ_t / ᾱ_s
        # 1. Posterior mean  μ̃ = √ᾱ_s β_{t|s}/(1−ᾱ_t) x̂_0 + √α_{t|s} (1−ᾱ_s)/(1−ᾱ_t) x_t  (eq. 7).
        coef_x0 = abar_s.sqrt() * (1 - alpha_ts) / (1 - abar_t)
        coef_xt = alpha_ts.sqrt() * (1 - abar_s) / (1 - abar_t)
        mean = broadcast(coef_x0, x) * x0 + broadcast(coef_xt, x) * x
        # 2. Add posterior noise, except on the last step where the variance is zero.
        std = schedule.posterior_variance(t, s).sqrt()
        x = mean + broadcast(std, x) * noise.randn(x.shape[1:])
    return x


def ddim(
    denoise: Denoiser,
    x: Tensor,
    timesteps: Sequence[int],
    schedule: Schedule,
    noise: ImageNoise,
    on_step: StepCallback | None = None,
    *,
    eta: float = 0.0,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): deterministic at η = 0, DDPM-like variance at η = 1."""
    for i, (t, s) in enumerate(step_pairs(timesteps, x)):
        x0, eps = denoise(x, t)
        if on_step is not None:
            on_step(i, x, x0)
        abar_s = schedule.alpha_bar(s)
        # 1. σ_t(η) = η √((1−ᾱ_s)/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_s)   (eq. 16).
        sigma = eta * schedule.posterior_variance(t, s).sqrt()
        # 2. x_s = √ᾱ_s x̂_0 + √(1 − ᾱ_s − σ²) ε̂ + σ z.
        direction = (1 - abar_s - sigma**2).clamp(min=0).sqrt()
        x = broadcast(abar_s.sqrt(), x) * x0 + broadcast(direction, x) * eps
        if eta > 0:
            x = x + broadcast(sigma, x) * noise.randn(x.shape[1:])
    return x


def dpm_solver_pp(
    denoise: Denoiser,
    x: Tensor,
    timesteps: Sequence[int],
    schedule: Schedule,
    noise: ImageNoise,
    on_step: StepCallback | None = None,
    *,
    order: int = 2,
) -> Tensor:
    """DPM-Solver++(2M / 3M) (Lu et al. 2022, Alg. 2 and its third-order extension).

    A multistep solver of the probability-flow ODE in log-SNR time λ = log(α/σ), on the data
    prediction x̂_0. It starts at first order (which is DDIM), raises its order as previous
    x̂_0 become available, and lands on x̂_0 at the last step, where σ = 0. `noise` is unused
    beyond x_T: the solver is deterministic.
    """
    history: list[tuple[Tensor, Tensor]] = []  # (x̂_0, h) of the previous steps, newest last
    for i, (t, s) in enumerate(step_pairs(timesteps, x)):
        x0, _ = denoise(x, t)
        if on_step is not None:
            on_step(i, x, x0)
        if int(s[0]) < 0:
            return x0  # σ_s = 0: the ODE's end point is the data prediction itself
        alpha_t, sigma_t = log_snr_terms(schedule, t)
        alpha_s, sigma_s = log_snr_terms(schedule, s)
        h = (alpha_s / sigma_s).log() - (alpha_t / sigma_t).log()  # λ_s − λ_t > 0, (B,)
        phi = torch.expm1(-h)  # e^{−h} − 1
        # 1. The data-prediction term D, of the highest order the history allows.
        d0 = x0
        correction = torch.zeros_like(x)
        if order >= 2 and len(history) >= 1:
            x0_1, h_1 = history[-1]
            r0 = h_1 / h
            d1_0 = (x0 - x0_1) / broadcast(r0, x)
            if order >= 3 and len(history) >= 2:
                x0_2, h_2 = history[-2]
                r1 = h_2 / h
                d1_1 = (x0_1 - x0_2) / broadcast(r1, x)
                d1 = d1_0 + broadcast(r0 / (r0 + r1), x) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / broadcast(r0 + r1, x)
                # 2a. Third order: x̂_0 plus first and second finite differences in λ.
                correction = broadcast(alpha_s * (phi / h + 1), x) * d1 - broadcast(
                    alpha_s * ((phi + h) / h**2 - 0.5), x
                ) * d2
            else:
                # 2b. Second order (the midpoint form): D = x̂_0 + (x̂_0 − x̂_0') / (2 r).
                correction = -0.5 * broadcast(alpha_s * phi, x) * d1_0
        # 3. x_s = (σ_s/σ_t) x_t − α_s (e^{−h} − 1) D  (+ the correction terms above).
        x = broadcast(sigma_s / sigma_t, x) * x - broadcast(alpha_s * phi, x) * d0 + correction
        history.append((x0, h))
    return x


def log_snr_terms(schedule: Schedule, t: Tensor) -> tuple[Tensor, Tensor]:
    """(α_t, σ_t) = (√ᾱ_t, √(1 − ᾱ_t)) as (B,) float64."""
    abar = schedule.alpha_bar(t)
    return abar.sqrt(), (1 - abar).sqrt()


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "dpm++2m": functools.partial(dpm_solver_pp, order=2),
    "dpm++3m": functools.partial(dpm_solver_pp, order=3),
}


LOG_SNR_SPACED = {"dpm++2m", "dpm++3m"}  # multistep solvers want even steps in λ


def timesteps_for(name: str, schedule: Schedule, steps: int) -> list[int]:
    """The timesteps sampler `name` runs best on: log-SNR spacing for the multistep solvers,
    even spacing in t for DDPM and DDIM (measured: DDIM loses accuracy with log-SNR spacing)."""
    return sample_timesteps(schedule.timesteps, steps, schedule if name in LOG_SNR_SPACED else None)


def get_sampler(name: str, **options: float) -> Sampler:
    """The sampler registered under `name` with its own options bound (e.g. DDIM's `eta`).

    Options a sampler does not take are dropped here, so one CLI can offer them all.
    """
    if name not in SAMPLERS:
        raise KneegenError(f"unknown sampler {name!r}: choose one of {', '.join(sorted(SAMPLERS))}")
    function = SAMPLERS[name]
    accepted = inspect.signature(function).parameters
    return functools.partial(function, **{k: v for k, v in options.items() if k in accepted})


def step_pairs(timesteps: Sequence[int], like: Tensor) -> list[tuple[Tensor, Tensor]]:
    """(t, s) pairs as (B,) tensors: each timestep with the next one, the last with −1."""
    batch = like.shape[0]
    following = list(timesteps[1:]) + [-1]
    return [
        (torch.full((batch,), t, device=like.device), torch.full((batch,), s, device=like.device))
        for t, s in zip(timesteps, following)
    ]


def broadcast(coef: Tensor, like: Tensor) -> Tensor:
    """A (B,) float64 coefficient as (B, 1, 1, 1) in `like`'s dtype and device."""
    return coef.view(-1, *([1] * (like.dim() - 1))).to(like)


def generate(
    denoise: Denoiser,
    sampler: Sampler,
    timesteps: Sequence[int],
    schedule: Schedule,
    seeds: Sequence[int],
    image_shape: Sequence[int],
    device: torch.device,
    on_step: StepCallback | None = None,
) -> Tensor:
    """One image per seed: x_T ~ N(0, I) from that seed's generator, then the sampler."""
    noise = ImageNoise(seeds, device)
    x = noise.randn(image_shape)  # (B, C, H, W)
    return sampler(denoise, x, timesteps, schedule, noise, on_step)
