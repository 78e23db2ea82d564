"""A validation loss that is a function of the weights alone.

The original drew new t and noise at every validation, so its curve swung from epoch to epoch.
Here each held-out image is noised at a fixed grid of timesteps (one per bucket of the T
steps) with noise from its own seed, so the same weights always give the same number, and the
per-bucket losses show where in the noise range the model is weak.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from kneegen.config import DiffusionConfig
from kneegen.engine.autoencoder import Autoencoder, autoencoder_loss
from kneegen.engine.conditioning import call_network
from kneegen.engine.device import Compute, evaluating
from kneegen.engine.distillation import Distillation
from kneegen.engine.loss import per_image_loss
from kneegen.engine.pixels import to_model_range, to_network_input
from kneegen.engine.samplers import trailing_timesteps
from kneegen.engine.schedule import Schedule
from kneegen.engine.ssim import psnr, ssim

VALIDATION_SEED = 20_240_101  # noise of held-out image i comes from VALIDATION_SEED + i


@dataclass
class ValidationResult:
    loss: float  # mean over images and buckets
    bucket_timesteps: list[int]  # the t of each bucket
    bucket_losses: list[float]  # mean loss at that t
    psnr: float | None = None  # an autoencoder's: mean PSNR (dB) and SSIM of its reconstructions
    ssim: float | None = None


def bucket_timesteps(total: int, buckets: int) -> list[int]:
    """The centre of each of `buckets` equal slices of [0, T)."""
    return [int((k + 0.5) * total / buckets) for k in range(buckets)]


def validation_loss(
    network: nn.Module,
    images: np.ndarray,
    schedule: Schedule,
    diffusion: DiffusionConfig,
    compute: Compute,
    buckets: int,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
    conditions: np.ndarray | None = None,
) -> ValidationResult:
    """Mean loss of `network` on `images` ((N, H, W)) over a fixed t grid and fixed noise; a
    conditional network is given each image's `conditions` ((N, K), NaN where unknown)."""
    grid = bucket_timesteps(schedule.timesteps, buckets)
    totals = torch.zeros(len(grid), dtype=torch.float64)
    with evaluating(network), torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x0 = to_network_input(images[start : start + batch_size], compute.device)
            c = None if conditions is None else torch.from_numpy(conditions[start : start + batch_size]).to(x0.device)
            noises = fixed_noise(range(start, start + len(x0)), len(grid), x0.shape[1:])  # (K, B, C, H, W)
            for k, t_value in enumerate(grid):
                t = torch.full((len(x0),), t_value, device=compute.device)
                noise = noises[k].to(compute.device)
                x_t = schedule.add_noise(x0, noise, t)
                with compute.autocast():
                    prediction = call_network(network, x_t.to(memory_format=compute.memory_format), t, c)
                target = schedule.target(x0, noise, t, diffusion.prediction)
                totals[k] += per_image_loss(prediction, target, diffusion.loss).double().sum().cpu()
            if on_batch is not None:
                on_batch(len(x0))
    per_bucket = (totals / len(images)).tolist()
    return ValidationResult(sum(per_bucket) / len(per_bucket), grid, per_bucket)


def distillation_validation(
    network: nn.Module,
    distillation: Distillation,
    images: np.ndarray,
    compute: Compute,
    batch_size: int,
    conditions: np.ndarray | None = None,
) -> ValidationResult:
    """How far a student's one step lands from its teacher's two, on held-out `images`: image k
    noised with its own fixed noise at the student's grid point k mod N (one teacher pair per
    image keeps this cheap), the squared x̂_0 error weighted as training weights it (so the two
    compare), its mean and its mean per grid point. Rounds have different teachers, so compare
    values within a round. A dmd student's is its distribution-matching loss at fixed levels and
    noise per batch: how far apart the teacher and the fake score judge its samples; the fake
    score learns on, so it is the method's own measure, not a fixed yardstick (FID is)."""
    grid = trailing_timesteps(distillation.schedule.timesteps, distillation.student_steps)
    totals, counts = torch.zeros(len(grid), dtype=torch.float64), torch.zeros(len(grid), dtype=torch.float64)
    with evaluating(network), torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x0 = to_network_input(images[start : start + batch_size], compute.device)
            c = None if conditions is None else torch.from_numpy(conditions[start : start + batch_size]).to(x0.device)
            position = torch.arange(start, start + len(x0)) % len(grid)  # (B,) grid index of each image
            t = torch.tensor(grid)[position].to(compute.device)
            noise = fixed_noise(range(start, start + len(x0)), 1, x0.shape[1:])[0].to(compute.device)
            x_t = distillation.schedule.add_noise(x0, noise, t)
            with compute.autocast():
                output = call_network(network, x_t.to(memory_format=compute.memory_format), t, c)
            fixed = torch.Generator().manual_seed(VALIDATION_SEED + start)
            draws = distillation.draw_matching(
                t.cpu(), tuple(x0.shape[1:]), fixed, updates=0, anchored=False, simulated=False
            )
            draws = draws.to(compute.device) if draws is not None else None
            losses = (distillation.loss(output, x_t, t, c, draws)[0] * distillation.weight(t)).double().cpu()  # (B,)
            totals.index_add_(0, position, losses)
            counts.index_add_(0, position, torch.ones_like(losses))
    per_point = (totals / counts.clamp(min=1)).tolist()
    return ValidationResult(float(totals.sum() / counts.sum()), grid, per_point)


def fixed_noise(image_indices: range, count: int, image_shape: torch.Size) -> torch.Tensor:
    """`count` noise draws per image from that image's own seed: (count, B, *image_shape)."""
    per_image = [
        torch.randn((count, *image_shape), generator=torch.Generator().manual_seed(VALIDATION_SEED + i))
        for i in image_indices
    ]
    return torch.stack(per_image, dim=1)


def reconstruction_validation(
    network: Autoencoder, images: np.ndarray, compute: Compute, batch_size: int
) -> ValidationResult:
    """An autoencoder's loss on whole held-out `images` ((N, H, W)), decoding the posterior mean
    (no draw, so the same weights give the same number), with the mean PSNR and SSIM."""
    totals = torch.zeros(3, dtype=torch.float64)  # loss, PSNR, SSIM summed over images
    with evaluating(network), torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x0 = to_model_range(images[start : start + batch_size], compute.device)
            with compute.autocast():
                mean, logvar = network.posterior(x0.to(memory_format=compute.memory_format))
                reconstruction = network.decode(mean)
            reconstruction = reconstruction.float().clamp(-1.0, 1.0)
            loss = autoencoder_loss(reconstruction, x0, mean, logvar, network.cfg, compute.autocast)
            totals += torch.stack([loss.sum(), psnr(reconstruction, x0).sum(), ssim(reconstruction, x0).sum()]).cpu()
    loss, mean_psnr, mean_ssim = (totals / len(images)).tolist()
    return ValidationResult(loss, [], [], mean_psnr, mean_ssim)
