"""The forward process against its closed forms (Ho et al. 2020, Nichol & Dhariwal 2021)."""

from __future__ import annotations

import math

import pytest
import torch

from kneegen.engine.schedule import Schedule, make_betas

T = 1000


def test_linear_betas_run_from_1e4_to_0_02_at_1000_steps():
    betas = make_betas("linear", T)
    assert betas.dtype == torch.float64
    assert len(betas) == T
    assert betas[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    steps = betas[1:] - betas[:-1]
    torch.testing.assert_close(steps, torch.full_like(steps, (0.02 - 1e-4) / (T - 1)), rtol=0, atol=1e-15)


def test_linear_betas_keep_their_end_points_scaled_for_other_lengths():
    betas = make_betas("linear", 500)
    assert betas[0].item() == pytest.approx(2e-4, abs=1e-15)
    assert betas[-1].item() == pytest.approx(0.04, abs=1e-15)


def test_cosine_alpha_bar_matches_the_cos_squared_formula():
    schedule = Schedule("cosine", T)
    s = 0.008

    def f(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    # ᾱ of the 0-based step t is the paper's ᾱ_{t+1} = f((t+1)/T) / f(0), wherever β was not clipped.
    unclipped = (schedule.betas < 0.999).nonzero().flatten().tolist()
    assert len(unclipped) >= T - 2  # only the very last step(s) are clipped
    expected = torch.tensor([f((t + 1) / T) / f(0) for t in unclipped], dtype=torch.float64)
    torch.testing.assert_close(schedule.alphas_cumprod[unclipped], expected, rtol=0, atol=1e-6)
    assert schedule.betas.max().item() == pytest.approx(0.999)
    assert schedule.alphas_cumprod[-1].item() > 0


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_alpha_bar_before_the_first_step_is_one(kind):
    schedule = Schedule(kind, T)
    assert schedule.alpha_bar(torch.tensor([-1])).tolist() == [1.0]
    got = schedule.alpha_bar(torch.tensor([0, 499, 999]))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, schedule.alphas_cumprod[[0, 499, 999]], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_alphas_cumprod_is_the_product_of_one_minus_beta(kind):
    schedule = Schedule(kind, T)
    betas = schedule.betas.tolist()
    product, expected = 1.0, []
    for beta in betas:
        product *= 1.0 - beta
        expected.append(product)
    torch.testing.assert_close(schedule.alphas_cumprod, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("t_value", [0, 50, 300, 700, 999])
def test_add_noise_draws_from_q_xt_given_x0(t_value):
    schedule = Schedule("cosine", T)
    generator = torch.Generator().manual_seed(t_value)
    x0 = torch.tensor([-0.9, -0.2, 0.0, 0.4, 1.0]).view(1, 1, 1, 5)
    draws = 40_000
    noise = torch.randn((draws, 1, 1, 5), generator=generator)
    t = torch.full((draws,), t_value)
    x_t = schedule.add_noise(x0.expand(draws, -1, -1, -1), noise, t)
    abar = schedule.alphas_cumprod[t_value].item()
    mean, var = x_t.mean(dim=0).flatten(), x_t.var(dim=0).flatten()
    # 5 standard errors of mean and variance, N = 40k
    torch.testing.assert_close(
        mean, math.sqrt(abar) * x0.flatten(), rtol=0, atol=5 * math.sqrt((1 - abar) / draws) + 1e-7
    )
    torch.testing.assert_close(
        var, torch.full((5,), 1 - abar), rtol=0, atol=5 * (1 - abar) * math.sqrt(2 / draws) + 1e-7
    )


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_posterior_variance_of_neighbouring_steps_is_beta_tilde(kind):
    schedule = Schedule(kind, T)
    betas = schedule.betas.tolist()
    abar, product = [], 1.0
    for beta in betas:
        product *= 1.0 - beta
        abar.append(product)
    t = torch.arange(1, T)
    expected = torch.tensor([betas[i] * (1 - abar[i - 1]) / (1 - abar[i]) for i in range(1, T)], dtype=torch.float64)
    torch.testing.assert_close(schedule.posterior_variance(t, t - 1), expected, rtol=1e-9, atol=1e-15)
    # The last step onto clean data has no variance.
    assert schedule.posterior_variance(torch.tensor([0]), torch.tensor([-1])).tolist() == [0.0]


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_target_and_to_x0_eps_round_trip(prediction, kind):
    schedule = Schedule(kind, T)
    generator = torch.Generator().manual_seed(1)
    t = torch.tensor([0, 1, 10, 250, 500, 900, 998, 999])
    x0 = torch.rand((len(t), 1, 6, 6), generator=generator, dtype=torch.float64) * 2 - 1
    eps = torch.randn((len(t), 1, 6, 6), generator=generator, dtype=torch.float64)
    x_t = schedule.add_noise(x0, eps, t)
    output = schedule.target(x0, eps, t, prediction)
    x0_hat, eps_hat = schedule.to_x0_eps(output, x_t, t, prediction)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-5)
    torch.testing.assert_close(schedule.eps_from_x0(x0, x_t, t), eps, rtol=0, atol=1e-5)


def test_v_target_is_alpha_eps_minus_sigma_x0():
    schedule = Schedule("linear", T)
    t = torch.tensor([400])
    x0 = torch.full((1, 1, 2, 2), 0.5, dtype=torch.float64)
    eps = torch.full((1, 1, 2, 2), -1.5, dtype=torch.float64)
    abar = schedule.alphas_cumprod[400].item()
    expected = math.sqrt(abar) * -1.5 - math.sqrt(1 - abar) * 0.5
    torch.testing.assert_close(schedule.target(x0, eps, t, "v"), torch.full_like(x0, expected), rtol=0, atol=1e-12)
    assert torch.equal(schedule.target(x0, eps, t, "eps"), eps)


def test_float32_round_trip_is_accurate_away_from_the_end():
    schedule = Schedule("cosine", T)
    generator = torch.Generator().manual_seed(2)
    t = torch.arange(0, 900, 50)
    x0 = torch.rand((len(t), 1, 4, 4), generator=generator) * 2 - 1
    eps = torch.randn((len(t), 1, 4, 4), generator=generator)
    x_t = schedule.add_noise(x0, eps, t)
    assert x_t.dtype == torch.float32
    for prediction in ("eps", "v"):
        x0_hat, eps_hat = schedule.to_x0_eps(schedule.target(x0, eps, t, prediction), x_t, t, prediction)
        torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-4)
        torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-4)
