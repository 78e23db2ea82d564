"""kneegen's deterministic samplers against an independent implementation: Hugging Face diffusers.

The same denoiser (the exact one for Gaussian data, returning ε) drives diffusers' schedulers
and kneegen's samplers from the same x_T over the same timesteps; the trajectories' end points
must agree to float tolerance. diffusers is a test-only dependency (the `test` extra).
"""

from __future__ import annotations

import pytest
import torch

from kneegen.engine.samplers import generate, get_sampler, sample_timesteps
from kneegen.engine.schedule import Schedule

diffusers = pytest.importorskip("diffusers")

MU, STD = 0.3, 0.5
SHAPE = (1, 4, 4)
SEEDS = list(range(8))
CPU = torch.device("cpu")


def exact_x0(schedule: Schedule, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    abar = schedule.alpha_bar(t).view(-1, 1, 1, 1).to(x_t)
    return MU + abar.sqrt() * STD**2 / (abar * STD**2 + 1 - abar) * (x_t - abar.sqrt() * MU)


def kneegen_run(schedule: Schedule, name: str, timesteps: list[int]) -> torch.Tensor:
    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = exact_x0(schedule, x_t, t)
        return x0, schedule.eps_from_x0(x0, x_t, t)

    return generate(denoise, get_sampler(name), timesteps, schedule, SEEDS, SHAPE, CPU)


def diffusers_run(schedule: Schedule, scheduler, timesteps: list[int]) -> torch.Tensor:
    """diffusers' own loop: ε = model(x, t); x = scheduler.step(ε, t, x)."""
    x = torch.stack([torch.randn(SHAPE, generator=torch.Generator().manual_seed(s)) for s in SEEDS])
    for t in timesteps:
        t_batch = torch.full((len(SEEDS),), int(t))
        x0 = exact_x0(schedule, x, t_batch)
        eps = schedule.eps_from_x0(x0, x, t_batch)
        x = scheduler.step(eps, int(t), x).prev_sample
    return x


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("steps", [10, 25])
def test_dpm_solver_pp_matches_diffusers(kind, order, steps):
    schedule = Schedule(kind, 1000)
    timesteps = sample_timesteps(1000, steps, schedule)
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        trained_betas=schedule.betas.numpy(),
        solver_order=order,
        prediction_type="epsilon",
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        lower_order_final=False,
        final_sigmas_type="zero",
    )
    scheduler.set_timesteps(timesteps=timesteps)
    expected = diffusers_run(schedule, scheduler, timesteps)
    actual = kneegen_run(schedule, f"dpm++{order}m", timesteps)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_matches_diffusers(kind, steps):
    schedule = Schedule(kind, 1000)
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=1000,
        trained_betas=schedule.betas.numpy(),
        clip_sample=False,
        set_alpha_to_one=True,
        prediction_type="epsilon",
    )
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.tolist()  # diffusers' own "leading" spacing, ending at 0
    expected = diffusers_run(schedule, scheduler, timesteps)
    actual = kneegen_run(schedule, "ddim", timesteps)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


# diffusers builds ᾱ in float32, and the cosine schedule's last β = 0.999 makes 1 − β lose
# ~1e-5 of relative precision there; the linear schedule shows the true agreement (~1e-7).
UNIPC_TOLERANCE = {"linear": 1e-5, "cosine": 3e-4}


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [10, 25])
def test_unipc_bh2_matches_diffusers(kind, steps):
    schedule = Schedule(kind, 1000)
    scheduler = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000,
        trained_betas=schedule.betas.numpy(),
        solver_order=2,
        prediction_type="epsilon",
        predict_x0=True,
        solver_type="bh2",
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    scheduler.set_timesteps(steps)  # this scheduler takes no custom timesteps: use its own
    timesteps = scheduler.timesteps.tolist()
    expected = diffusers_run(schedule, scheduler, timesteps)
    actual = kneegen_run(schedule, "unipc", timesteps)
    torch.testing.assert_close(actual, expected, rtol=0, atol=UNIPC_TOLERANCE[kind])


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_ddpm_ancestral_matches_diffusers_with_the_same_per_image_generators(kind):
    """diffusers draws each image's noise from that image's generator, as kneegen does, so
    with generators seeded alike the two stochastic trajectories coincide."""
    schedule = Schedule(kind, 1000)
    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=1000,
        trained_betas=schedule.betas.numpy(),
        variance_type="fixed_small",
        clip_sample=False,
        prediction_type="epsilon",
    )
    scheduler.set_timesteps(1000)
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    x = torch.stack([torch.randn(SHAPE, generator=g) for g in generators])
    for t in scheduler.timesteps.tolist():
        t_batch = torch.full((len(SEEDS),), t)
        eps = schedule.eps_from_x0(exact_x0(schedule, x, t_batch), x, t_batch)
        x = scheduler.step(eps, t, x, generator=generators).prev_sample
    actual = kneegen_run(schedule, "ddpm", list(range(999, -1, -1)))
    tolerance = {"linear": 1e-4, "cosine": 1e-3}[kind]  # 1000 float32 steps on diffusers' side, see UNIPC_TOLERANCE
    torch.testing.assert_close(actual, x, rtol=0, atol=tolerance)
