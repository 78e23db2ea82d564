"""Power-function EMA and post-hoc EMA reconstruction (Karras et al. 2024, EDM2, sec. 3, app. C.1–C.3).

Notation:
    t              optimizer steps done, counted from 1
    γ              exponent of the power-function profile p(τ) ∝ τ^γ on [0, t]
    σ_rel          relative standard deviation of that profile (EDM2 eq. 3), the length users choose
    β_t            = (1 − 1/t)^(γ+1), so θ̂_t = β_t θ̂_{t−1} + (1 − β_t) θ_t
    p_i(τ)         = (γ_i+1) τ^γ_i / t_i^(γ_i+1) on [0, t_i], the profile of snapshot i

Unlike a fixed-decay EMA, the power EMA averages a fixed *fraction* of training whatever its
length, so snapshots of two such averages taken along the run span profiles from which a
post-hoc one of any other (t, σ_rel) can be mixed: Σ x_i θ̂_i with x the least-squares fit of p_r.

The continuous profiles are exact, not an approximation, for the discrete recursion: the β_s
telescope, Π_{s=τ+1}^{t} β_s = (τ/t)^(γ+1), so step τ's weight in θ̂_t is
(τ^(γ+1) − (τ−1)^(γ+1)) / t^(γ+1) = ∫_{τ−1}^{τ} p(s) ds. EDM2's appendix fits with sums over
steps instead of integrals; that only changes the metric of the fit, negligibly at hundreds of steps.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from kneegen.errors import KneegenError

STORED_SIGMA_RELS = (0.05, 0.10)  # the two power EMAs training snapshots (EDM2's choice)
MAX_SIGMA_REL = math.sqrt(1 / 12)  # σ_rel at γ = 0: the plain running mean of all steps so far
GAMMA_TOLERANCE = 1e-10  # bisection stops when the bracket on γ is this narrow (relative above γ = 1)


def sigma_rel_of(gamma: float) -> float:
    """σ_rel = √((γ+1) / ((γ+2)² (γ+3))), EDM2 eq. 3; strictly decreasing for γ ≥ 0."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma_of(sigma_rel: float) -> float:
    """The γ ≥ 0 whose profile has this σ_rel, by bisection (σ_rel ≈ 1/γ for large γ bounds the bracket)."""
    if not 0 < sigma_rel <= MAX_SIGMA_REL:
        raise KneegenError(
            f"EMA sigma_rel {sigma_rel} is out of range: give a value in (0, {MAX_SIGMA_REL:.4f}] "
            "(e.g. 0.05 or 0.10; smaller averages a shorter tail of training)"
        )
    low, high = 0.0, 1.0
    while sigma_rel_of(high) > sigma_rel:
        low, high = high, 2 * high
    while high - low > GAMMA_TOLERANCE * max(1.0, low):
        middle = 0.5 * (low + high)
        if sigma_rel_of(middle) > sigma_rel:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


class PowerEMA:
    """A frozen copy of the model holding the power-function EMA θ̂_t of its parameters.

    Buffers (BatchNorm running statistics) are copied rather than averaged, as in `ema.EMA`:
    they are already running averages.
    """

    def __init__(self, model: nn.Module, sigma_rel: float) -> None:
        self.sigma_rel = sigma_rel
        self.gamma = gamma_of(sigma_rel)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """θ̂_t = β_t θ̂_{t−1} + (1 − β_t) θ_t after `step` = t ≥ 1 optimizer steps; β_1 = 0 forgets the init."""
        if step < 1:
            raise ValueError(f"step counts optimizer steps done and starts at 1, got {step}")
        beta = (1 - 1 / step) ** (self.gamma + 1)
        ema_params = list(self.model.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - beta)
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)


@dataclass(frozen=True)
class Snapshot:
    """A stored power EMA: the one of this σ_rel, taken after `step` optimizer steps."""

    step: int
    sigma_rel: float


def profile_inner_products(
    steps_a: np.ndarray, gammas_a: np.ndarray, steps_b: np.ndarray, gammas_b: np.ndarray
) -> np.ndarray:
    """(len(a), len(b)) <p_a, p_b> = ∫ p_a p_b dτ between power profiles (EDM2 app. C.2, continuous form).

    With t_a ≤ t_b the closed form (γ_a+1)(γ_b+1) t_a^(γ_a+γ_b+1) / ((γ_a+γ_b+1) t_a^(γ_a+1) t_b^(γ_b+1))
    equals (γ_a+1)(γ_b+1) / (γ_a+γ_b+1) · (t_a/t_b)^γ_b / t_b: a ratio ≤ 1 to the later profile's
    power, which cannot overflow however large γ is.
    """
    t_a, g_a = steps_a[:, None], gammas_a[:, None]
    t_b, g_b = steps_b[None, :], gammas_b[None, :]
    later_t = np.maximum(t_a, t_b)
    later_gamma = np.where(t_a >= t_b, g_a, g_b)
    ratio = np.minimum(t_a, t_b) / later_t
    return (g_a + 1) * (g_b + 1) / (g_a + g_b + 1) * ratio**later_gamma / later_t


def reconstruction_weights(snapshots: Sequence[Snapshot], step: int, sigma_rel: float) -> np.ndarray:
    """(len(snapshots),) x minimising ‖Σ x_i p_i − p_r‖² for the target profile p_r of (step, σ_rel).

    Solves A x = b, A_ij = <p_i, p_j>, b_i = <p_i, p_r> (EDM2 app. C.3) in float64. Steps are in
    units of the target's and powers are taken of step ratios (`profile_inner_products`): raw
    t^(γ_i+γ_j+1) overflows float64 below σ_rel ≈ 0.02 at a thousand steps. Each profile is then
    scaled to unit norm (x' = x ‖p_i‖), because ‖p_i‖² = (γ_i+1)² / ((2γ_i+1) t_i) spans the
    ratio of the last to the first snapshot's step times that of their γ.
    """
    if not snapshots:
        raise KneegenError("post-hoc EMA got no snapshots: store power-EMA snapshots during training first")
    if step < 1 or any(snapshot.step < 1 for snapshot in snapshots):
        first = min(snapshot.step for snapshot in snapshots)
        raise KneegenError(f"EMA steps count optimizer steps from 1: got target step {step}, first snapshot {first}")
    steps = np.array([snapshot.step for snapshot in snapshots], dtype=np.float64) / step
    gammas = np.array([gamma_of(snapshot.sigma_rel) for snapshot in snapshots])
    target_step, target_gamma = np.ones(1), np.array([gamma_of(sigma_rel)])

    gram = profile_inner_products(steps, gammas, steps, gammas)  # A, (N, N)
    overlap = profile_inner_products(steps, gammas, target_step, target_gamma)[:, 0]  # b, (N,)
    norms = np.sqrt(np.diag(gram))  # ‖p_i‖
    unit_weights = np.linalg.lstsq(gram / np.outer(norms, norms), overlap / norms, rcond=None)[0]
    return unit_weights / norms


def combine(state_dicts: Sequence[dict[str, Tensor]], weights: np.ndarray) -> dict[str, Tensor]:
    """Σ x_i θ̂_i per floating tensor, accumulated in float64 on the CPU and returned in its own dtype and device.

    Integer tensors (BatchNorm's num_batches_tracked) cannot be mixed; they are taken from the
    last state dict, the latest snapshot.
    """
    if len(state_dicts) != len(weights) or not state_dicts:
        raise ValueError(f"need one weight per state dict, got {len(weights)} weights for {len(state_dicts)}")
    last = state_dicts[-1]
    combined = {}
    for name, latest in last.items():
        if not latest.is_floating_point():
            combined[name] = latest.clone()
            continue
        total = torch.zeros(latest.shape, dtype=torch.float64)
        for state_dict, weight in zip(state_dicts, weights):
            total += float(weight) * state_dict[name].detach().to("cpu", torch.float64)
        combined[name] = total.to(latest.device, latest.dtype)
    return combined
