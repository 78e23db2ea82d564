"""Distribution matching distillation (Yin et al. 2024, "One-step Diffusion with Distribution
Matching Distillation"; its successor DMD2, Yin et al. 2024b): the student's samples are pushed
towards the data's distribution as a whole, not towards the teacher's particular answers.

Progressive and consistency distillation regress the student on what the teacher does from the
same input; where the student cannot follow exactly, it lands on a blurred mean. Distribution
matching instead diffuses the student's x̂_0 to a random level τ and asks two denoisers there: the
teacher (the score of the real data) and a "fake score", a copy of the teacher that keeps learning
to denoise the student's own samples. Their difference is the gradient of the KL divergence from
the student's distribution to the data's (the DMD paper's eq. 7), so the student moves each
sample towards where real data is denser than its own; it can be sharp where regression blurs.

The fake score is a second network trained beside the student with the teacher's own denoising
loss (prediction target, loss kind, Min-SNR weight), `distill.fake_score_updates` times per
student step on that step's samples (DMD2's two time-scale update rule). Like the teacher it is
kept in the distillation's state and in checkpoints, so a resumed run continues it exactly; it is
not part of what sampling loads.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from kneegen.config import LossKind, Prediction
from kneegen.engine.companion import Companion
from kneegen.engine.conditioning import call_network
from kneegen.engine.distributed import SINGLE, Distributed
from kneegen.engine.loss import min_snr_weight, per_image_loss
from kneegen.engine.samplers import Denoiser
from kneegen.engine.schedule import Schedule

# DMD2's range of diffusion levels τ for both players: the ends, all noise or none, say nothing
# about a sample's distribution.
TAU_RANGE = (0.02, 0.98)
SCALE_EPS = 1e-6  # keeps the gradient's normaliser finite where the student already matches the teacher


@dataclass(frozen=True)
class MatchingDraws:
    """The random levels and noise of one global batch (drawn with its t and ε, so every process
    and a resumed run draw alike): τ and ε for the student's distribution-matching term, and for
    each of the fake score's updates on the same samples."""

    tau: Tensor  # (B,)
    noise: Tensor  # (B, C, H, W)
    update_tau: Tensor  # (K, B)
    update_noise: Tensor  # (K, B, C, H, W)
    pair: Tensor  # (B,) the teacher pair a first-step row starts from (engine/teacher_pairs.py); −1: none
    # (B, S − 1, C, H, W) with distill.backward_simulation, else (B, 0, C, H, W): the noise a row's
    # simulated sampling starts from, then the fresh noise of each later step but its own
    path: Tensor

    def part(self, rows: Tensor) -> MatchingDraws:
        return MatchingDraws(
            self.tau[rows],
            self.noise[rows],
            self.update_tau[:, rows],
            self.update_noise[:, rows],
            self.pair[rows],
            self.path[rows],
        )

    def to(self, device: torch.device) -> MatchingDraws:
        fields = (self.tau, self.noise, self.update_tau, self.update_noise, self.pair, self.path)
        return MatchingDraws(*(tensor.to(device) for tensor in fields))


def draw_matching(
    batch: int,
    shape: tuple[int, ...],
    updates: int,
    timesteps: int,
    generator: torch.Generator,
    anchored: Tensor | None = None,
    pairs: int = 0,
    simulated_steps: int = 0,
) -> MatchingDraws:
    """τ uniform over TAU_RANGE of the T timesteps and ε ~ N(0, I), for the student and for each of
    the fake score's `updates`; for the `anchored` rows ((B,) bool), one of `pairs` teacher pairs;
    and the noise of `simulated_steps` steps of the student's own sampling per row (drawn last,
    and nothing at 0 steps: a run without backward simulation draws as before it existed)."""
    low, high = (round(fraction * timesteps) for fraction in TAU_RANGE)
    tau = torch.randint(low, high, (batch,), generator=generator)
    noise = torch.randn((batch, *shape), generator=generator)
    update_tau = torch.randint(low, high, (updates, batch), generator=generator)
    update_noise = torch.randn((updates, batch, *shape), generator=generator)
    pair = torch.full((batch,), -1)
    if anchored is not None and pairs:
        pair = torch.where(anchored, torch.randint(0, pairs, (batch,), generator=generator), pair)
    path = torch.randn((batch, simulated_steps, *shape), generator=generator)
    return MatchingDraws(tau, noise, update_tau, update_noise, pair, path)


def distribution_matching_loss(
    x0: Tensor, real: Denoiser, fake: Denoiser, tau: Tensor, noise: Tensor, schedule: Schedule
) -> Tensor:
    """(B,) a loss whose gradient in the student's x̂_0 (B, C, H, W) is the DMD gradient, per pixel
    (f̂_fake − f̂_real) / mean |x̂_0 − f̂_real| / (C·H·W), with f̂ the two denoisers' x̂_0 of x̂_0 diffused
    to τ. Dividing by the teacher's own error (the paper's eq. 8) gives the gradient one size at
    every level and for every image. Its value, half the squared normalised difference, is 0 while
    the fake score cannot tell the student's samples from the data."""
    sample = x0.detach().float()
    noisy = schedule.add_noise(sample, noise, tau)
    real_x0, _ = real(noisy, tau)
    fake_x0, _ = fake(noisy, tau)
    scale = (sample - real_x0.float()).abs().flatten(1).mean(dim=1).clamp(min=SCALE_EPS)
    gradient = (fake_x0.float() - real_x0.float()) / scale.view(-1, *[1] * (x0.dim() - 1))
    target = (sample - gradient).clone()  # out of the denoisers' inference mode, so autograd may keep it
    return 0.5 * (x0.float() - target).square().flatten(1).mean(dim=1)


@dataclass(kw_only=True)
class FakeScore(Companion):
    """The denoiser of the student's samples (a copy of the teacher at first, with its optimiser
    and loss scaler, a Companion), and the samples of the current step's micro-batches, which its
    own updates then train on. Its epoch loss is its mean denoising loss."""

    schedule: Schedule
    prediction: Prediction  # the teacher's training objective, which the fake score keeps
    loss_kind: LossKind
    min_snr_gamma: float
    updates: int  # distill.fake_score_updates: its optimiser steps per student step
    pending: list[tuple[Tensor, MatchingDraws, Tensor | None]] = field(default_factory=list)

    def keep(self, x0: Tensor, draws: MatchingDraws, conditions: Tensor | None) -> None:
        """The student's samples of one micro-batch, detached, for this step's updates."""
        kept = dataclasses.replace(draws, path=draws.path[:, :0])  # the simulation's noise is spent
        self.pending.append((x0.detach().float(), kept, conditions))

    def step(self, lr: float, batch_images: int, dist: Distributed = SINGLE, skipped: bool = False) -> float:
        """Its updates on this step's samples, each at its own τ and ε (the mean over the global
        batch, as the student's); returns the last update's mean loss. A `skipped` student step
        drops its samples instead, as they may hold NaN; a non-finite loss leaves the weights."""
        pending, self.pending = self.pending, []
        if skipped or not pending:
            return float("nan")
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.network.train().requires_grad_(True)
        mean_loss = float("nan")
        for update in range(self.updates):
            self.optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=self.compute.device)
            for k, (x0, draws, conditions) in enumerate(pending):
                tau, noise = draws.update_tau[update], draws.update_noise[update]
                with dist.no_sync(self.train_network, sync=k == len(pending) - 1):
                    per_image = self.denoising_loss(x0, tau, noise, conditions)  # (b,)
                    weight = min_snr_weight(self.schedule.snr(tau), self.min_snr_gamma, self.prediction)
                    self.scaler.scale((weight * per_image).sum() * (dist.world_size / batch_images)).backward()
                loss_sum += per_image.detach().sum()
            mean_loss = dist.sum(loss_sum) / batch_images
            if math.isfinite(mean_loss):
                self.scaler.step(self.optimizer)
            self.scaler.update()
        if math.isfinite(mean_loss):
            self.epoch_losses.append(mean_loss)
        self.network.eval().requires_grad_(False)
        return mean_loss

    def denoising_loss(self, x0: Tensor, tau: Tensor, noise: Tensor, conditions: Tensor | None) -> Tensor:
        """(b,) the teacher's training loss on the student's samples x0 diffused to τ."""
        noisy = self.schedule.add_noise(x0, noise, tau).to(memory_format=self.compute.memory_format)
        with self.compute.autocast():
            output = call_network(self.train_network, noisy, tau, conditions)
        return per_image_loss(output, self.schedule.target(x0, noise, tau, self.prediction), self.loss_kind)
