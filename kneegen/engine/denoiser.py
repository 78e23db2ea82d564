"""Wrap a network as a denoiser (x_t, t) → (x̂_0, ε̂), the interface every sampler uses."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kneegen.config import Prediction
from kneegen.engine.conditioning import call_network, null_conditions
from kneegen.engine.device import Compute
from kneegen.engine.fold import without_fold
from kneegen.engine.samplers import Denoiser
from kneegen.engine.schedule import Schedule


def make_denoiser(
    network: nn.Module,
    schedule: Schedule,
    prediction: Prediction,
    compute: Compute,
    conditions: Tensor | None = None,
    guidance: float = 1.0,
    clip: bool = True,
    guide: nn.Module | None = None,
    autoguidance: float = 1.0,
    autoguidance_sigma_max: float = math.inf,
    fold: int = 1,
) -> Denoiser:
    """Runs the network in eval/inference mode with the device's settings; with `clip`, x̂_0 is
    clipped to the data range [-1, 1] and ε̂ recomputed from it, which keeps few-step samplers on
    the data (latents, unit-variance but unbounded, are not clipped).

    A conditional network is asked for `conditions` ((B, K), NaN where not given) with
    classifier-free guidance w = `guidance` (Ho & Salimans 2022): out = out_∅ + w (out_c − out_∅),
    the conditional and unconditional halves in one batched call. ε, v and x̂_0 are linear in the
    output at a fixed x_t, so guiding the output is guiding ε̂. w = 1 is the plain conditional
    model (one call), w = 0 the unconditional one.

    With a `guide` (the same network, less trained: `train.guide_at`) and `autoguidance` w ≠ 1,
    the output is autoguided (Karras et al. 2024): out = out_guide + w (out − out_guide). The
    guide makes the model's own kind of errors, only more of them, so stepping away from it
    removes those errors instead of steering towards a condition; it works without conditions.
    Each of the two networks is asked with the classifier-free guidance above. Autoguidance acts
    only at noise levels σ_t = √((1 − ᾱ_t)/ᾱ_t) ≤ `autoguidance_sigma_max` (a guidance interval,
    Kynkäänniemi et al. 2024): the young guide's errors that are worth removing are in the fine
    detail decided at low noise; above it the plain model steps alone, at one network call.

    With `fold` p > 1 (the network's patch size), x̂_0 loses its components at the patch fold's
    frequencies before the clipping (engine/fold.py): the pixel alternation a patch network leaves."""
    network.eval()
    if guide is not None:
        guide.eval()

    def predict(x_t: Tensor, t: Tensor) -> Tensor:
        x_t = x_t.to(memory_format=compute.memory_format)
        output = predict_with(network, x_t, t)
        if guide is None or autoguidance == 1.0:
            return output
        inside = schedule.snr(t).rsqrt() <= autoguidance_sigma_max  # (B,) σ_t within the interval
        if not inside.any():
            return output
        weak = predict_with(guide, x_t, t).float()
        guided = weak + autoguidance * (output.float() - weak)
        return torch.where(inside.view(-1, *[1] * (guided.dim() - 1)), guided, output.float())

    def predict_with(model: nn.Module, x_t: Tensor, t: Tensor) -> Tensor:
        if conditions is None or guidance == 1.0:
            return call_network(model, x_t, t, conditions)
        if guidance == 0.0:
            return call_network(model, x_t, t, null_conditions(*conditions.shape, conditions.device))
        both = model(
            torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([conditions, torch.full_like(conditions, math.nan)])
        )
        conditional, unconditional = both.float().chunk(2)  # (B, C, H, W) each
        return unconditional + guidance * (conditional - unconditional)

    def denoise(x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        with torch.inference_mode(), compute.autocast():
            output = predict(x_t, t)
        x0, eps = schedule.to_x0_eps(output.float(), x_t, t, prediction)
        if fold == 1 and not clip:
            return x0, eps
        x0 = without_fold(x0, fold)
        if clip:
            x0 = x0.clamp(-1.0, 1.0)
        return x0, schedule.eps_from_x0(x0, x_t, t)

    return denoise
