"""Noise → image pairs of the teacher's probability-flow ODE: the regression anchor of distribution
matching distillation (Yin et al. 2024, DMD, sec. 3.3).

The distribution-matching gradient moves each sample of the student towards where the data is
denser, but says nothing about which sample a given noise should become; from the teacher's
weights, whose x̂_0 of pure noise is nearly the same blurred mean for every noise, the student's
first step then collapses onto a few modes (measured: README, "Few-step sampling"). DMD's answer
is a regression of the student's first step, from noise z, on the image the teacher's
deterministic sampler makes of the same z: the teacher's ODE gives every noise its own image, so
the student keeps the data's variety. The pairs are drawn once, before the first step, from seeds
of their own (not those `sample` and the benchmarks draw from), and kept in the checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kneegen.engine.samplers import Denoiser, ImageNoise, generate, get_sampler, timesteps_for
from kneegen.engine.schedule import Schedule

SOLVER = "dpm++2m"  # deterministic, second order: the teacher's ODE in few steps (24.9 FID at 40, 30.3 at 16)
STEPS = 25  # the teacher's default step count
SEED_BASE = 10**9  # pair k of a run of train.seed s comes from seed SEED_BASE + s · 2^20 + k
SEED_STRIDE = 2**20
BATCH = 64


@dataclass
class TeacherPairs:
    """(M, C, H, W) noises z and the teacher's ODE images of them, on the CPU."""

    noise: Tensor
    images: Tensor

    def __len__(self) -> int:
        return len(self.noise)

    def state_dict(self) -> dict[str, Tensor]:
        return {"noise": self.noise, "images": self.images}


def draw_teacher_pairs(
    teacher: Denoiser,
    schedule: Schedule,
    count: int,
    image_shape: Sequence[int],
    seed: int,
    device: torch.device,
    on_batch: Callable[[int], None] | None = None,
) -> TeacherPairs:
    """`count` pairs: z from its own seed, as `sample` draws x_T, and the teacher's STEPS-step
    DPM-Solver++(2M) image of it; `on_batch(done)` after each batch of BATCH."""
    sampler, timesteps = get_sampler(SOLVER), timesteps_for(SOLVER, schedule, STEPS)
    first = SEED_BASE + seed * SEED_STRIDE
    noises, images = [], []
    for start in range(0, count, BATCH):
        seeds = range(first + start, first + min(start + BATCH, count))
        noises.append(ImageNoise(seeds, torch.device("cpu")).randn(image_shape))  # the x_T that `generate` draws
        images.append(generate(teacher, sampler, timesteps, schedule, seeds, image_shape, device).float().cpu())
        if on_batch is not None:
            on_batch(start + len(seeds))
    return TeacherPairs(torch.cat(noises), torch.cat(images))
