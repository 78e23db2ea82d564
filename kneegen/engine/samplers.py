"""Samplers: functions of (denoiser, x_T, timesteps, per-image noise) with no hidden state.

A denoiser maps (x_t, t) to (x̂_0, ε̂). Timesteps run from high to low and are passed in;
the step after the last one lands on ᾱ = 1, i.e. on x̂_0. Randomness comes only from
`ImageNoise`, one generator per image, so image k of a run is the same whatever the batch.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Protocol

import torch
from torch import Tensor

from kneegen.engine.schedule import Schedule, sigma_of_log_snr
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


KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5


def sample_timesteps(total: int, steps: int, schedule: Schedule | None = None, spacing: str = "logsnr") -> list[int]:
    """`steps` integer timesteps from T−1 down to 0, the first always T−1.

    Without a schedule: evenly spaced in t. With one: evenly spaced in log-SNR λ = log(α/σ),
    which keeps the multistep solvers' steps even (Lu et al. 2022, sec. 3.3), or, for
    `spacing="karras"`, in σ^{1/ρ} with σ = √((1−ᾱ)/ᾱ) (Karras et al. 2022). Timesteps that
    round to the same integer are visited once.
    """
    if not 1 <= steps <= total:
        raise KneegenError(f"--steps {steps}: must be between 1 and the model's {total} timesteps")
    if schedule is None:
        grid = torch.linspace(total - 1, 0, steps).round().long().tolist()
        return list(dict.fromkeys(grid))
    lambdas = schedule.log_snrs  # decreasing in t, (T,)
    if spacing == "karras":
        sigmas = (-lambdas).exp()  # σ = e^{−λ}, increasing in t
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        high, low = sigmas[-1] ** (1 / KARRAS_RHO), sigmas[0] ** (1 / KARRAS_RHO)
        targets = -((high + ramp * (low - high)) ** KARRAS_RHO).log()
    else:
        targets = torch.linspace(lambdas[-1].item(), lambdas[0].item(), steps, dtype=torch.float64)
    nearest = (lambdas[None, :] - targets[:, None]).abs().argmin(dim=1).tolist()
    return list(dict.fromkeys(nearest))


def trailing_timesteps(total: int, steps: int) -> list[int]:
    """t_i = T(N − i)/N − 1, i = 0 … N−1: even in t and "trailing" (Lin et al. 2024, table 2), so no
    step is spent at t = 0, one step from clean, as the uniform grid does. Progressive
    distillation's grid (Salimans & Ho 2022): the grid of N steps is every second point of the
    grid of 2N, so each round's student steps where its teacher did."""
    if not 1 <= steps <= total:
        raise KneegenError(f"--steps {steps}: must be between 1 and the model's {total} timesteps")
    return [math.floor(total * (steps - i) / steps + 0.5) - 1 for i in range(steps)]


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
        # 1. Posterior mean  μ̃ = √ᾱ_s β_{t|s}/(1−ᾱ_t) x̂_0 + √α_{t|s} (1−ᾱ_s)/(1−ᾱ_t) x_t  (eq. 7).
        coef_x0, coef_xt = schedule.posterior_mean_coefs(t, s)
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


def consistency(
    denoise: Denoiser,
    x: Tensor,
    timesteps: Sequence[int],
    schedule: Schedule,
    noise: ImageNoise,
    on_step: StepCallback | None = None,
) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1) for a consistency-distilled student,
    whose x̂_0 from any point of a trajectory is that trajectory's end: take x̂_0, then noise it
    afresh to the next level, x_s = α_s x̂_0 + σ_s z, and ask again; the last x̂_0 is the image.
    One step is x̂_0 of pure noise; every further step refines it with new noise."""
    for i, (t, s) in enumerate(step_pairs(timesteps, x)):
        x0, _ = denoise(x, t)
        if on_step is not None:
            on_step(i, x, x0)
        if int(s[0]) < 0:
            return x0
        alpha_s, sigma_s = schedule.alpha_sigma(s, x)
        x = alpha_s * x0 + sigma_s * noise.randn(x.shape[1:])
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
    history: list[tuple[Tensor, float]] = []  # (x̂_0, h) of the previous steps, newest last
    for i, (t, s) in enumerate(step_pairs(timesteps, x)):
        x0, _ = denoise(x, t)
        if on_step is not None:
            on_step(i, x, x0)
        t_value, s_value = int(t[0]), int(s[0])
        if s_value < 0:
            return x0  # σ_s = 0: the ODE's end point is the data prediction itself
        sigma_t, (alpha_s, sigma_s) = schedule.alpha_sigma_at(t_value)[1], schedule.alpha_sigma_at(s_value)
        h = schedule.log_snr(s_value) - schedule.log_snr(t_value)  # > 0
        phi = math.expm1(-h)  # e^{−h} − 1
        # 1. First order (= DDIM): x_s = (σ_s/σ_t) x_t − α_s (e^{−h} − 1) x̂_0.
        x_next = (sigma_s / sigma_t) * x - alpha_s * phi * x0
        # 2. Higher orders add finite differences of earlier x̂_0 in λ, when there are some.
        if order >= 2 and history:
            x0_1, h_1 = history[-1]
            if order >= 3 and len(history) >= 2:
                d1_0 = (x0 - x0_1) / (h_1 / h)
                x0_2, h_2 = history[-2]
                r0, r1 = h_1 / h, h_2 / h
                d1_1 = (x0_1 - x0_2) / r1
                d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                # 2a. Third order: first and second differences.
                x_next = x_next + alpha_s * (phi / h + 1) * d1 - alpha_s * ((phi + h) / h**2 - 0.5) * d2
            else:
                # 2b. Second order (the midpoint form): D = x̂_0 + (x̂_0 − x̂_0') / (2 r).
                x_next = x_next + second_order_term(x0, x0_1, h / h_1, alpha_s, phi)
        x = x_next
        history.append((x0, h))
    return x


def second_order_term(
    x0: Tensor, x0_previous: Tensor, ratio: Tensor | float, alpha_s: Tensor | float, phi: Tensor | float
) -> Tensor:
    """What DPM-Solver++(2M) adds to a first-order (DDIM) step t → s of size h in λ:
    −½ α_s (e^{−h} − 1) (x̂_0 − x̂_0′) · h / h′, x̂_0′ being the data prediction one step earlier
    (h′ before t in λ). `ratio` is h / h′ and `phi` e^{−h} − 1 (tensors broadcast per image)."""
    return -0.5 * alpha_s * phi * (x0 - x0_previous) * ratio


def dpm_solver_pp_sde(
    denoise: Denoiser,
    x: Tensor,
    timesteps: Sequence[int],
    schedule: Schedule,
    noise: ImageNoise,
    on_step: StepCallback | None = None,
) -> Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", sec. 4 and app. B; k-diffusion's
    `dpmpp_2m_sde`): the multistep solver of the reverse SDE instead of the ODE.

    Its first-order step is the DDPM posterior step (DDIM with η = 1): fresh noise each step
    corrects the errors of an imperfect denoiser instead of carrying them to the end, which the
    deterministic solvers do. The second-order term is DPM-Solver++(2M)'s finite difference of
    x̂_0 in λ, with the SDE's factor (1 − e^{−2h}) in place of the ODE's (1 − e^{−h}).
    """
    previous: tuple[Tensor, float] | None = None  # (x̂_0, h) of the step before
    for i, (t, s) in enumerate(step_pairs(timesteps, x)):
        x0, _ = denoise(x, t)
        if on_step is not None:
            on_step(i, x, x0)
        t_value, s_value = int(t[0]), int(s[0])
        if s_value < 0:
            return x0
        sigma_t, (alpha_s, sigma_s) = schedule.alpha_sigma_at(t_value)[1], schedule.alpha_sigma_at(s_value)
        h = schedule.log_snr(s_value) - schedule.log_snr(t_value)  # > 0
        decay = -math.expm1(-2 * h)  # 1 − e^{−2h}
        # 1. First order: x_s = (σ_s/σ_t) e^{−h} x_t + α_s (1 − e^{−2h}) x̂_0 + σ_s √(1 − e^{−2h}) z.
        x_next = (sigma_s / sigma_t * math.exp(-h)) * x + (alpha_s * decay) * x0
        # 2. Second order: the midpoint difference D = (x̂_0 − x̂_0') / (2 r), r = h' / h.
        if previous is not None:
            x0_1, h_1 = previous
            x_next = x_next + (0.5 * alpha_s * decay * h / h_1) * (x0 - x0_1)
        x = x_next + (sigma_s * math.sqrt(decay)) * noise.randn(x.shape[1:])
        previous = (x0, h)
    return x


def unipc(
    denoise: Denoiser,
    x: Tensor,
    timesteps: Sequence[int],
    schedule: Schedule,
    noise: ImageNoise,
    on_step: StepCallback | None = None,
    *,
    order: int = 2,
) -> Tensor:
    """UniPC with B(h) = e^{−h} − 1 ("bh2"; Zhao et al. 2023, Alg. 2 and 3), on the data prediction.

    Each step first corrects the current x with the network evaluation just made (UniC, no
    extra evaluation), then predicts the next x from the recent x̂_0 (UniP). Orders ramp up
    from 1 as history accumulates and the last step is first order, landing on x̂_0.
    """
    history: list[tuple[Tensor, float]] = []  # (x̂_0, λ) at the visited timesteps, newest last
    previous: tuple[Tensor, int] | None = None  # (x before the last prediction, its order)
    for i, (t, s) in enumerate(step_pairs(timesteps, x)):
        x0, _ = denoise(x, t)
        if on_step is not None:
            on_step(i, x, x0)
        t_value, s_value = int(t[0]), int(s[0])
        # 1. Corrector: redo the last step with x̂_0 at its end point included.
        if previous is not None:
            x = unipc_update(previous[0], history, t_value, schedule, previous[1], x0_end=x0)
        history.append((x0, schedule.log_snr(t_value)))
        if s_value < 0:
            return x0  # σ_s = 0: a first-order step lands exactly on x̂_0
        # 2. Predictor, of the highest order the history and the remaining steps allow.
        step_order = min(order, len(history), len(timesteps) - i)
        previous = (x, step_order)
        x = unipc_update(x, history, s_value, schedule, step_order)
    return x


def unipc_update(
    x: Tensor,
    history: list[tuple[Tensor, float]],
    target: int,
    schedule: Schedule,
    order: int,
    x0_end: Tensor | None = None,
) -> Tensor:
    """One UniP step from the newest history point to `target`, or, given `x0_end` (x̂_0 at
    `target`), the UniC step that also uses it. Coefficients solve the order conditions
    R ρ = b of the paper (eq. 7 and 9), with φ functions of hh = −h."""
    m0, lambda_0 = history[-1]
    lambda_t = schedule.log_snr(target)
    alpha_t, sigma_t = schedule.alpha_sigma_at(target)
    sigma_0 = sigma_of_log_snr(lambda_0)
    h = lambda_t - lambda_0
    # 1. Earlier x̂_0 as scaled differences D_k = (x̂_0^(k) − m0) / r_k, r_k = (λ_k − λ_0)/h.
    ratios, differences = [], []
    for m_k, lambda_k in reversed(history[-order:-1]):
        ratios.append((lambda_k - lambda_0) / h)
        differences.append((m_k - m0) / ratios[-1])
    ratios.append(1.0)
    # 2. Order conditions: R[i, k] = r_k^i, b[i] = i! φ_{i+1}(hh) / B(h).
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = h_phi_1
    h_phi_k, factorial = h_phi_1 / hh - 1, 1
    rows, b = [], []
    for i in range(1, order + 1):
        rows.append([r ** (i - 1) for r in ratios])
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R, b_vec = torch.tensor(rows, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    # 3. First-order part, then the weighted differences (predictor) or with x̂_0_end (corrector).
    x_next = (sigma_t / sigma_0) * x - alpha_t * h_phi_1 * m0
    if x0_end is None:
        if not differences:
            return x_next
        rhos = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], b_vec[:-1]).tolist()
        return x_next - alpha_t * b_h * sum(rho * d for rho, d in zip(rhos, differences))
    rhos = [0.5] if order == 1 else torch.linalg.solve(R, b_vec).tolist()
    correction = sum((rho * d for rho, d in zip(rhos[:-1], differences)), torch.zeros_like(x))
    return x_next - alpha_t * b_h * (correction + rhos[-1] * (x0_end - m0))


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "dpm++2m": functools.partial(dpm_solver_pp, order=2),
    "dpm++3m": functools.partial(dpm_solver_pp, order=3),
    "dpm++2m-sde": dpm_solver_pp_sde,
    "unipc": functools.partial(unipc, order=2),
    # A distilled student's sampler: DDIM on its own grid (`timesteps_for` gives it the trailing grid
    # whatever the spacing). η = 0 is the step it learnt; η = 1 takes ancestral steps from the same
    # x̂_0, which benchmarks/distill.py measured better at 4 steps (FID 82.3 vs 90.5), equal at 2.
    "distilled": ddim,
    "consistency": consistency,  # what `distilled` means for a consistency-distilled student
}


DISTILLED = "distilled"  # a distilled checkpoint's own sampler, on its own grid whatever the spacing
CONSISTENCY = "consistency"
LOG_SNR_SPACED = {"dpm++2m", "dpm++3m", "dpm++2m-sde", "unipc"}  # multistep solvers want even steps in λ


def timesteps_for(name: str, schedule: Schedule, steps: int, spacing: str = "auto") -> list[int]:
    """Timesteps in the given spacing; `auto` is what sampler `name` runs best on: log-SNR for
    the multistep solvers, even in t for DDPM and DDIM (measured: DDIM loses accuracy in λ)."""
    if name in (DISTILLED, CONSISTENCY):
        spacing = "trailing"  # the grid the student learnt, whatever was asked
    if spacing == "auto":
        spacing = "logsnr" if name in LOG_SNR_SPACED else "uniform"
    if spacing == "uniform":
        return sample_timesteps(schedule.timesteps, steps)
    if spacing == "trailing":
        return trailing_timesteps(schedule.timesteps, steps)
    return sample_timesteps(schedule.timesteps, steps, schedule, spacing)


SAMPLER_GROUP = "kneegen.samplers"  # entry-point group through which a package adds a sampler


def registered_samplers() -> dict[str, Callable[..., Tensor]]:
    """The built-in samplers plus every installed `kneegen.samplers` plugin (built-ins win)."""
    plugins = {ep.name: ep for ep in entry_points(group=SAMPLER_GROUP) if ep.name not in SAMPLERS}
    return {**{name: ep.load() for name, ep in plugins.items()}, **SAMPLERS}


def sampler_names() -> list[str]:
    """Every sampler's name, plugins included, without importing the plugins (for `--help`)."""
    return [*SAMPLERS, *sorted({ep.name for ep in entry_points(group=SAMPLER_GROUP)} - set(SAMPLERS))]


def get_sampler(name: str, **options: float) -> Sampler:
    """The sampler registered under `name` with its own options bound (e.g. DDIM's `eta`).

    Options a sampler does not take are dropped here, so one CLI can offer them all.
    """
    known = registered_samplers()
    if name not in known:
        raise KneegenError(f"unknown sampler {name!r}: choose one of {', '.join(sorted(known))}")
    function = known[name]
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
