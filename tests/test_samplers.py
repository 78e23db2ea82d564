"""Samplers driven by the exact denoiser of Gaussian data, where the right answer is known.

With x0 ~ N(μ, s²) per pixel, E[x0 | x_t] = μ + √ᾱ s² / (ᾱ s² + 1 − ᾱ) · (x_t − √ᾱ μ), so a
correct sampler must give back mean μ and standard deviation s (up to its discretisation error).
"""

from __future__ import annotations

import math

import pytest
import torch

from kneegen.config import ModelConfig
from kneegen.engine.denoiser import make_denoiser
from kneegen.engine.device import Compute
from kneegen.engine.network import build_network
from kneegen.engine.samplers import ImageNoise, ddim, ddpm, generate, get_sampler, sample_timesteps, timesteps_for
from kneegen.engine.schedule import Schedule
from kneegen.errors import KneegenError

MU, STD = 0.3, 0.5
CPU = torch.device("cpu")
SHAPE = (1, 4, 4)
N_SAMPLES = 2000


def gaussian_denoiser(schedule: Schedule):
    def denoise(x_t: torch.Tensor, t: torch.Tensor):
        abar = schedule.alpha_bar(t).view(-1, 1, 1, 1).to(x_t)
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        x0 = MU + alpha * STD**2 / (abar * STD**2 + 1 - abar) * (x_t - alpha * MU)
        return x0, (x_t - alpha * x0) / sigma

    return denoise


@pytest.fixture(scope="module")
def cosine() -> Schedule:
    return Schedule("cosine", 1000)


def draw(schedule: Schedule, name: str, steps: int, eta: float = 0.0, n: int = N_SAMPLES) -> torch.Tensor:
    sampler = get_sampler(name, eta=eta)
    timesteps = sample_timesteps(schedule.timesteps, steps)
    return generate(gaussian_denoiser(schedule), sampler, timesteps, schedule, list(range(n)), SHAPE, CPU)


def errors(samples: torch.Tensor) -> tuple[float, float]:
    return abs(samples.mean().item() - MU), abs(samples.std().item() - STD)


# (sampler, steps, eta, mean tolerance, std tolerance): the std tolerance is the sampler's own
# discretisation error with a margin; the mean is unbiased for all of them.
CASES = [
    pytest.param("ddpm", 1000, 0.0, 0.015, 0.015, id="ddpm-1000-eta0.0", marks=pytest.mark.slow),
    pytest.param("ddpm", 100, 0.0, 0.015, 0.035, id="ddpm-100-eta0.0"),
    pytest.param("ddim", 50, 0.0, 0.015, 0.03, id="ddim-50-eta0.0"),
    pytest.param("ddim", 10, 0.0, 0.015, 0.1, id="ddim-10-eta0.0"),
    pytest.param("ddim", 50, 1.0, 0.015, 0.05, id="ddim-50-eta1.0"),
]


@pytest.mark.parametrize("name, steps, eta, mean_tol, std_tol", CASES)
def test_sampler_reproduces_gaussian_data_mean_and_std(cosine, name, steps, eta, mean_tol, std_tol):
    samples = draw(cosine, name, steps, eta)
    assert samples.shape == (N_SAMPLES, *SHAPE)
    assert torch.isfinite(samples).all()
    mean_error, std_error = errors(samples)
    assert mean_error < mean_tol, f"mean {samples.mean().item():.4f} vs {MU}"
    assert std_error < std_tol, f"std {samples.std().item():.4f} vs {STD}"


@pytest.mark.slow
def test_linear_schedule_ddpm_with_all_steps_reproduces_gaussian_data():
    samples = draw(Schedule("linear", 1000), "ddpm", 1000, n=1000)
    mean_error, std_error = errors(samples)
    assert mean_error < 0.02 and std_error < 0.02


def test_ddim_gets_closer_with_more_steps(cosine):
    _, error_10 = errors(draw(cosine, "ddim", 10))
    _, error_50 = errors(draw(cosine, "ddim", 50))
    _, error_200 = errors(draw(cosine, "ddim", 200))
    assert error_200 <= error_50 <= error_10
    assert error_10 > 0.02  # 10 steps do have a visible error: the comparison means something


def test_deterministic_ddim_is_the_scalar_recursion_of_song_et_al(cosine):
    """η = 0: x_s = √ᾱ_s x̂0 + √(1−ᾱ_s) ε̂, computed here independently per scalar in float64."""
    timesteps = sample_timesteps(1000, 7)
    seeds = [3, 4, 5]
    out = generate(gaussian_denoiser(cosine), get_sampler("ddim", eta=0.0), timesteps, cosine, seeds, SHAPE, CPU)
    start = torch.stack([torch.randn(SHAPE, generator=torch.Generator().manual_seed(s)) for s in seeds])
    abar = [cosine.alphas_cumprod[t].item() for t in timesteps] + [1.0]
    expected = []
    for value in start.flatten().tolist():
        x = value
        for a_t, a_s in zip(abar[:-1], abar[1:]):
            x0 = MU + math.sqrt(a_t) * STD**2 / (a_t * STD**2 + 1 - a_t) * (x - math.sqrt(a_t) * MU)
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
            x = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * eps
        expected.append(x)
    torch.testing.assert_close(out.flatten().double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "name, eta",
    [
        ("ddpm", 0.0),
        ("ddim", 0.0),
        ("ddim", 1.0),
        ("dpm++2m", 0.0),
        ("dpm++3m", 0.0),
        ("dpm++2m-sde", 0.0),
        ("unipc", 0.0),
    ],
)
def test_same_seeds_give_identical_images_whatever_the_batch_split(cosine, name, eta):
    timesteps = sample_timesteps(1000, 20)
    sampler = get_sampler(name, eta=eta)
    denoise = gaussian_denoiser(cosine)
    whole = generate(denoise, sampler, timesteps, cosine, [0, 1, 2, 3, 4, 5], SHAPE, CPU)
    first = generate(denoise, sampler, timesteps, cosine, [0, 1, 2], SHAPE, CPU)
    second = generate(denoise, sampler, timesteps, cosine, [3, 4, 5], SHAPE, CPU)
    assert torch.equal(whole, torch.cat([first, second]))
    reordered = generate(denoise, sampler, timesteps, cosine, [5, 0], SHAPE, CPU)
    assert torch.equal(reordered, whole[[5, 0]])


@pytest.mark.parametrize("name, eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0), ("dpm++2m-sde", 0.0)])
def test_different_seeds_give_different_images(cosine, name, eta):
    out = generate(
        gaussian_denoiser(cosine),
        get_sampler(name, eta=eta),
        sample_timesteps(1000, 20),
        cosine,
        [0, 1, 2, 3],
        SHAPE,
        CPU,
    )
    for i in range(4):
        for j in range(i + 1, 4):
            assert (out[i] - out[j]).abs().max().item() > 1e-3


def test_stochastic_samplers_inject_noise_beyond_the_start():
    """DDPM and DDIM(η=1) draw fresh noise each step; DDIM(η=0) is a function of x_T alone."""
    schedule = Schedule("cosine", 1000)
    timesteps = sample_timesteps(1000, 20)
    denoise = gaussian_denoiser(schedule)
    start = torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(0))

    class FixedNoise:
        def __init__(self, seed: int) -> None:
            self.generator = torch.Generator().manual_seed(seed)

        def randn(self, shape):
            return torch.randn((2, *shape), generator=self.generator)

    for sampler, stochastic in [
        (ddpm, True),
        (get_sampler("ddim", eta=1.0), True),
        (get_sampler("dpm++2m-sde"), True),
        (ddim, False),
    ]:
        a = sampler(denoise, start.clone(), timesteps, schedule, FixedNoise(1))
        b = sampler(denoise, start.clone(), timesteps, schedule, FixedNoise(2))
        assert (not torch.equal(a, b)) == stochastic


def sde_std_error(schedule: Schedule, name: str, steps: int, eta: float = 0.0) -> float:
    timesteps = timesteps_for(name, schedule, steps)
    out = generate(
        gaussian_denoiser(schedule), get_sampler(name, eta=eta), timesteps, schedule, list(range(4000)), SHAPE, CPU
    )
    assert abs(out.mean().item() - MU) < 0.01
    return abs(out.std().item() - STD)


@pytest.mark.slow
def test_sde_solver_reproduces_gaussian_data_and_beats_ancestral_ddim_at_the_same_steps(cosine):
    """Measured with 4,000 samples: std error 0.024 at 25 steps and 0.009 at 50, against 0.059 and
    0.033 for DDIM with η = 1; the second-order term is what closes the gap."""
    error_25, error_50 = sde_std_error(cosine, "dpm++2m-sde", 25), sde_std_error(cosine, "dpm++2m-sde", 50)
    assert error_25 < 0.035 and error_50 < 0.015
    assert error_50 < error_25 / 2
    assert error_25 < sde_std_error(cosine, "ddim", 25, eta=1.0) / 2


def test_sde_solver_first_step_is_the_ddpm_posterior_step(cosine):
    """With two timesteps the solver takes one first-order step, then lands on x̂_0: the same
    as DDIM with η = 1 (the DDPM posterior) given the same noise."""
    timesteps = [999, 500]
    denoise = gaussian_denoiser(cosine)
    sde = generate(denoise, get_sampler("dpm++2m-sde"), timesteps, cosine, [0, 1, 2], SHAPE, CPU)
    ancestral = generate(denoise, get_sampler("ddim", eta=1.0), timesteps, cosine, [0, 1, 2], SHAPE, CPU)
    torch.testing.assert_close(sde, ancestral, rtol=0, atol=1e-5)


def test_a_network_denoiser_is_batch_independent_per_seed():
    torch.manual_seed(0)
    cfg = ModelConfig(
        "unet",
        {"unet": dict(channels=16, channel_mults=[1, 2], blocks_per_level=1, attention_levels=[1], patch_size=1)},
    )
    network = build_network(cfg, (16, 16))
    with torch.no_grad():  # the zero-initialised head would make every output 0
        for p in network.parameters():
            p.add_(0.05 * torch.randn_like(p))
    schedule = Schedule("cosine", 1000)
    denoise = make_denoiser(network, schedule, "v", Compute(CPU, None))
    sampler, timesteps = get_sampler("ddim", eta=1.0), sample_timesteps(1000, 4)
    whole = generate(denoise, sampler, timesteps, schedule, [7, 8, 9, 10], (1, 16, 16), CPU)
    parts = torch.cat(
        [generate(denoise, sampler, timesteps, schedule, seeds, (1, 16, 16), CPU) for seeds in ([7], [8, 9, 10])]
    )
    torch.testing.assert_close(whole, parts, rtol=0, atol=1e-5)
    assert (whole[0] - whole[1]).abs().max().item() > 1e-3


def test_unknown_sampler_is_refused_with_the_choices():
    with pytest.raises(KneegenError) as info:
        get_sampler("nope")
    message = str(info.value)
    assert "nope" in message and "ddim" in message and "ddpm" in message


def test_sampler_options_it_does_not_take_are_dropped():
    assert get_sampler("ddpm", eta=0.5).keywords == {}
    assert get_sampler("ddim", eta=0.5).keywords == {"eta": 0.5}


@pytest.mark.parametrize("steps", [0, -3, 1001])
def test_step_counts_outside_1_to_T_are_refused(steps):
    with pytest.raises(KneegenError, match=str(steps)):
        sample_timesteps(1000, steps)


def test_timesteps_run_from_T_minus_1_strictly_down_to_0():
    grid = sample_timesteps(1000, 10)
    assert len(grid) == 10
    assert grid[0] == 999 and grid[-1] == 0
    assert all(a > b for a, b in zip(grid, grid[1:]))
    assert all(isinstance(t, int) for t in grid)
    assert sample_timesteps(1000, 1) == [999]
    assert sample_timesteps(1000, 1000) == list(range(999, -1, -1))


def ode_error(schedule: Schedule, name: str, steps: int) -> float:
    """Largest deviation from the exact probability-flow ODE end point for Gaussian data.

    The ODE maps quantiles of N(√ᾱ_T μ, ᾱ_T s² + 1 − ᾱ_T) to those of N(μ, s²), so
    x_0 = μ + s / √(ᾱ_T s² + 1 − ᾱ_T) · (x_T − √ᾱ_T μ) exactly.
    """
    seeds = list(range(100))
    x_T = ImageNoise(seeds, CPU).randn(SHAPE)
    abar_T = schedule.alphas_cumprod[-1].item()
    exact = MU + STD / math.sqrt(abar_T * STD**2 + 1 - abar_T) * (x_T - math.sqrt(abar_T) * MU)
    timesteps = timesteps_for(name, schedule, steps)
    out = generate(gaussian_denoiser(schedule), get_sampler(name), timesteps, schedule, seeds, SHAPE, CPU)
    return (out - exact).abs().max().item()


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize(
    "name, steps, min_ratio, max_ratio",
    [
        ("ddim", 50, 1.7, 2.3),
        ("dpm++2m", 50, 3.0, 6.0),
        ("dpm++3m", 25, 4.5, 20.0),
        ("unipc", 25, 4.5, 20.0),  # order 2 plus the corrector: third order
    ],
)
def test_deterministic_solvers_converge_at_their_order(kind, name, steps, min_ratio, max_ratio):
    """Doubling the steps divides the error by ~2 (first order), ~4 (second) or more (third);
    3M is checked from 25 steps, as by 100 its error nears float32 resolution."""
    schedule = Schedule(kind, 1000)
    ratio = ode_error(schedule, name, steps) / ode_error(schedule, name, 2 * steps)
    assert min_ratio < ratio < max_ratio, f"{name} on {kind}: error ratio {ratio:.2f}"


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_multistep_solvers_beat_ddim_at_25_steps(kind):
    schedule = Schedule(kind, 1000)
    ddim_error = ode_error(schedule, "ddim", 25)
    assert ode_error(schedule, "dpm++2m", 25) < ddim_error / 2.5
    assert ode_error(schedule, "dpm++3m", 25) < ddim_error / 3.5
    assert ode_error(schedule, "unipc", 25) < ddim_error / 3.5


def test_log_snr_timesteps_are_even_in_log_snr():
    schedule = Schedule("linear", 1000)
    grid = sample_timesteps(1000, 25, schedule)
    assert grid[0] == 999 and grid[-1] == 0
    assert all(a > b for a, b in zip(grid, grid[1:]))
    abar = schedule.alphas_cumprod[grid]
    lambdas = 0.5 * (abar.log() - (1 - abar).log())
    gaps = lambdas[1:] - lambdas[:-1]
    assert (gaps > 0).all() and gaps.max() / gaps.min() < 1.5


def test_seed_lists_and_ranges_parse_in_order():
    from kneegen.sampling import parse_seeds

    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("9, 1,5-6") == [9, 1, 5, 6]
    assert parse_seeds("7") == [7]
    for bad in ["", "a", "3-1", "1,1", "1-2,2"]:
        with pytest.raises(KneegenError):
            parse_seeds(bad)


def test_karras_timesteps_are_even_in_sigma_to_the_one_over_rho():
    """Karras et al. eq. 5: σ_i^{1/7} evenly spaced, σ = √((1−ᾱ)/ᾱ); up to integer rounding.
    Compared with log-SNR spacing it spends more steps at high noise."""
    schedule = Schedule("linear", 1000)
    karras = sample_timesteps(1000, 25, schedule, "karras")
    assert karras[0] == 999 and karras[-1] == 0
    assert all(a > b for a, b in zip(karras, karras[1:]))
    abar = schedule.alphas_cumprod[karras]
    root_sigma = ((1 - abar) / abar).sqrt() ** (1 / 7)
    gaps = root_sigma[:-1] - root_sigma[1:]
    assert gaps.max() / gaps.min() < 1.15
    logsnr = sample_timesteps(1000, 25, schedule, "logsnr")
    assert sum(t > 900 for t in karras) > sum(t > 900 for t in logsnr)


def test_auto_spacing_follows_the_sampler():
    schedule = Schedule("cosine", 1000)
    assert timesteps_for("ddim", schedule, 10) == sample_timesteps(1000, 10)
    assert timesteps_for("dpm++2m", schedule, 10) == sample_timesteps(1000, 10, schedule, "logsnr")
    assert timesteps_for("ddim", schedule, 10, "karras") == sample_timesteps(1000, 10, schedule, "karras")


def test_a_plugin_package_adds_a_sampler_through_entry_points(tmp_path, monkeypatch):
    """A `kneegen.samplers` entry point is usable by name, from flags and from YAML."""
    from kneegen.config import load_config
    from kneegen.engine.plugins import resolve_plugins

    from helpers import install_plugin

    install_plugin(
        tmp_path,
        monkeypatch,
        "kneegen.samplers",
        "halfddim = halfddim_mod:halfddim",
        "halfddim_mod",
        "from kneegen.engine.samplers import ddim\n\n"
        "def halfddim(denoise, x, timesteps, schedule, noise, on_step=None):\n"
        "    return ddim(denoise, x, timesteps[::2], schedule, noise, on_step)\n",
        dist="halfddim",
    )
    schedule = Schedule("cosine", 1000)
    timesteps = sample_timesteps(1000, 20)
    plugin = generate(gaussian_denoiser(schedule), get_sampler("halfddim"), timesteps, schedule, [1, 2], SHAPE, CPU)
    direct = generate(gaussian_denoiser(schedule), get_sampler("ddim"), timesteps[::2], schedule, [1, 2], SHAPE, CPU)
    assert torch.equal(plugin, direct)
    config = tmp_path / "run.yaml"
    config.write_text("sample:\n  sampler: halfddim\n")
    assert resolve_plugins(load_config(config), "run.yaml").sample.sampler == "halfddim"
    config.write_text("sample:\n  sampler: nosuch\n")
    with pytest.raises(KneegenError, match="run.yaml: sample.sampler.*nosuch.*halfddim"):
        resolve_plugins(load_config(config), "run.yaml")
