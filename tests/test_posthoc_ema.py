"""Power-function EMA and post-hoc reconstruction against EDM2's formulas (Karras et al. 2024, sec. 3, app. C)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from kneegen.engine.posthoc_ema import (
    MAX_SIGMA_REL,
    PowerEMA,
    Snapshot,
    combine,
    gamma_of,
    reconstruction_weights,
    sigma_rel_of,
)
from kneegen.errors import KneegenError

T = 1000  # steps of the synthetic run
SNAPSHOT_EVERY = 50
STORED_SIGMA_RELS = (0.05, 0.10)  # the two averages EDM2 stores snapshots of
TARGET_SIGMA_RELS = (0.03, 0.07, 0.15)  # one below, one between, one above the stored ones
NEIGHBOUR_FACTORS = (0.9, 1.1)  # σ_rel a reconstruction must be told apart from
DIM = 32


class Vector(nn.Module):
    """A model that is one parameter vector θ, so a trajectory θ_t can be written into it."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(DIM))


def step_weights(gamma: float, step: int) -> np.ndarray:
    """(step,) w_τ = (1 − β_τ) Π_{s>τ} β_s, the weight of θ_τ in θ̂_step, straight from the recursion."""
    betas = [(1 - 1 / s) ** (gamma + 1) for s in range(1, step + 1)]
    weights = []
    for tau in range(1, step + 1):
        weights.append((1 - betas[tau - 1]) * math.prod(betas[tau:]))
    return np.array(weights)


def synthetic_trajectory() -> np.ndarray:
    """(T, DIM) a slow drift, sinusoids of 1 to 7 periods over the run and fixed per-step noise."""
    rng = np.random.default_rng(0)
    t = np.arange(1, T + 1)[:, None] / T  # (T, 1)
    drift = 2 * t * rng.normal(size=DIM)
    waves = sum(
        0.5 * rng.normal(size=DIM) * np.sin(2 * np.pi * periods * t + rng.uniform(0, 2 * np.pi, size=DIM))
        for periods in (1, 2.5, 4, 7)
    )
    return drift + waves + 0.1 * rng.normal(size=(T, DIM))


@pytest.fixture(scope="module")
def run() -> dict:
    """Power EMAs over the synthetic run: snapshots of the stored σ_rel and the direct averages at step T."""
    model = Vector()
    direct_sigma_rels = {*STORED_SIGMA_RELS, *TARGET_SIGMA_RELS}
    direct_sigma_rels |= {factor * s for s in TARGET_SIGMA_RELS for factor in NEIGHBOUR_FACTORS}
    emas = {sigma_rel: PowerEMA(model, sigma_rel) for sigma_rel in direct_sigma_rels}
    snapshots, state_dicts = [], []
    for step, theta in enumerate(synthetic_trajectory(), start=1):
        model.theta.data.copy_(torch.from_numpy(theta))
        for ema in emas.values():
            ema.update(model, step)
        if step % SNAPSHOT_EVERY == 0:
            for sigma_rel in STORED_SIGMA_RELS:
                snapshots.append(Snapshot(step, sigma_rel))
                state_dicts.append({k: v.clone() for k, v in emas[sigma_rel].model.state_dict().items()})
    direct = {sigma_rel: ema.model.theta.double().numpy() for sigma_rel, ema in emas.items()}
    return {"snapshots": snapshots, "state_dicts": state_dicts, "direct": direct}


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.2, 0.28])
def test_gamma_of_inverts_sigma_rel_of(sigma_rel):
    gamma = gamma_of(sigma_rel)
    assert gamma > 0
    assert sigma_rel_of(gamma) == pytest.approx(sigma_rel, rel=1e-10)


@pytest.mark.parametrize(("gamma", "sigma_rel"), [(16.97, 0.05), (6.94, 0.10)])
def test_gamma_of_gives_edm2s_quoted_exponents(gamma, sigma_rel):
    assert gamma_of(sigma_rel) == pytest.approx(gamma, abs=5e-3)
    assert sigma_rel_of(gamma) == pytest.approx(sigma_rel, abs=1e-4)


def test_gamma_zero_is_the_uniform_average_of_all_steps():
    assert sigma_rel_of(0.0) == pytest.approx(math.sqrt(1 / 12), rel=1e-15)
    assert gamma_of(MAX_SIGMA_REL) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("sigma_rel", [0.0, -0.05, 0.29, 1.0])
def test_gamma_of_refuses_sigma_rel_outside_its_range(sigma_rel):
    with pytest.raises(KneegenError, match=r"give a value in \(0, 0\.2887\]"):
        gamma_of(sigma_rel)


def test_power_ema_is_the_explicit_weighted_average_of_the_trajectory():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = PowerEMA(model, sigma_rel=0.10)
    steps = 40
    weights = torch.from_numpy(step_weights(gamma_of(0.10), steps))
    trajectory = [[torch.randn_like(p) for p in model.parameters()] for _ in range(steps)]
    for step, params in enumerate(trajectory, start=1):
        with torch.no_grad():
            for p, value in zip(model.parameters(), params):
                p.copy_(value)
            model[1].running_mean.fill_(step)
        ema.update(model, step)

    assert weights.sum().item() == pytest.approx(1.0, abs=1e-12)
    for i, ema_param in enumerate(ema.model.parameters()):
        expected = sum(w * params[i].double() for w, params in zip(weights, trajectory))
        torch.testing.assert_close(ema_param.double(), expected, rtol=0, atol=1e-6)
    assert ema.model[1].running_mean.tolist() == [steps, steps]  # buffers are copied, not averaged


@pytest.mark.parametrize("sigma_rel", [0.05, 0.2])
def test_power_ema_step_weights_are_the_continuous_profile_integrated_over_each_step(sigma_rel):
    """The β_t telescope, so reconstruction from the continuous profiles is exact for the recursion."""
    gamma, steps = gamma_of(sigma_rel), 300
    tau = np.arange(1, steps + 1)
    integrals = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / steps ** (gamma + 1)
    np.testing.assert_allclose(step_weights(gamma, steps), integrals, rtol=1e-9, atol=1e-300)


@pytest.mark.parametrize("sigma_rel", TARGET_SIGMA_RELS)
def test_reconstruction_matches_a_power_ema_run_directly(run, sigma_rel):
    weights = reconstruction_weights(run["snapshots"], T, sigma_rel)
    reconstructed = combine(run["state_dicts"], weights)["theta"].double().numpy()
    direct = run["direct"][sigma_rel]

    error = np.linalg.norm(reconstructed - direct)
    # Measured: 1.0e-3 (0.03, below both stored), 5e-5 (0.07), 1.2e-4 (0.15).
    assert error / np.linalg.norm(direct) < 2e-3
    # Measured: at most 0.052 (0.03) of the distance to the average of a σ_rel 10 % away.
    neighbours = [run["direct"][factor * sigma_rel] for factor in NEIGHBOUR_FACTORS]
    assert error < 0.1 * min(np.linalg.norm(neighbour - direct) for neighbour in neighbours)


@pytest.mark.parametrize("sigma_rel", TARGET_SIGMA_RELS)
def test_continuous_fit_agrees_with_edm2s_discrete_fit_at_a_thousand_steps(run, sigma_rel):
    """EDM2 fits per-step weights with sums over steps; the integrals give the same averaging profile."""
    snapshots = run["snapshots"]
    per_step = np.stack([np.pad(step_weights(gamma_of(s.sigma_rel), s.step), (0, T - s.step)) for s in snapshots])
    target = step_weights(gamma_of(sigma_rel), T)  # (T,)
    discrete = np.linalg.lstsq(per_step @ per_step.T, per_step @ target, rcond=None)[0]
    continuous = reconstruction_weights(snapshots, T, sigma_rel)

    # Measured, as fractions of ‖target‖: the two fitted profiles differ by 1.0e-5, 8e-7, 2.4e-6 (0.03, 0.07,
    # 0.15), over a thousand times less than either misses the target by (2.6e-2, 2.5e-3, 5.8e-3).
    gap = np.linalg.norm(continuous @ per_step - discrete @ per_step) / np.linalg.norm(target)
    misfit = np.linalg.norm(continuous @ per_step - target) / np.linalg.norm(target)
    assert gap < 1e-4
    assert gap < 0.01 * misfit
    assert misfit < 0.04


def test_reconstructing_a_stored_profile_returns_that_snapshot(run):
    snapshots, state_dicts = run["snapshots"], run["state_dicts"]
    last = snapshots.index(Snapshot(T, 0.10))
    weights = reconstruction_weights(snapshots, T, 0.10)
    np.testing.assert_allclose(weights, np.eye(len(snapshots))[last], rtol=0, atol=1e-8)
    torch.testing.assert_close(combine(state_dicts, weights)["theta"], state_dicts[last]["theta"], rtol=0, atol=1e-5)


def test_reconstruction_stays_finite_for_short_averages_of_long_runs():
    snapshots = [Snapshot(step, s) for step in range(5_000, 100_001, 5_000) for s in (0.01, 0.05)]
    weights = reconstruction_weights(snapshots, 100_000, 0.02)
    assert np.isfinite(weights).all()
    assert weights.sum() == pytest.approx(1.0, abs=0.05)


def test_combine_keeps_float32_and_takes_integer_buffers_from_the_last_state_dict():
    first = {"weight": torch.ones(2, 3), "num_batches_tracked": torch.tensor(7)}
    second = {"weight": torch.full((2, 3), 3.0), "num_batches_tracked": torch.tensor(9)}
    combined = combine([first, second], np.array([0.25, 0.75]))
    assert combined["weight"].dtype == torch.float32
    torch.testing.assert_close(combined["weight"], torch.full((2, 3), 2.5), rtol=0, atol=0)
    assert combined["num_batches_tracked"].dtype == torch.int64
    assert combined["num_batches_tracked"].item() == 9
