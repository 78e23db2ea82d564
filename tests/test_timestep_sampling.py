"""Timestep sampling: uniform t is exactly `torch.randint`, as before the option; log-normal t follows
EDM's noise-level distribution; importance-sampled
t follows p_t ∝ √E[L_t²] of the last H losses (Improved DDPM, sec. 3.3) with weights that keep the
expected loss; its history survives checkpoints, so a resumed run and data-parallel processes draw
alike."""

from __future__ import annotations

import io
import math
from collections import deque

import numpy as np
import pytest
import torch

from kneegen.config import load_config
from kneegen.data.cache import open_cache
from kneegen.engine.checkpoint import load_checkpoint
from kneegen.engine.device import Compute
from kneegen.engine.distributed import SINGLE
from kneegen.engine.pixels import model_range_std
from kneegen.engine.schedule import Schedule
from kneegen.engine.timesteps import HISTORY, UNIFORM_SHARE, TimestepSampler
from kneegen.engine.training import create_state, with_noise_centre
from kneegen.errors import KneegenError
from kneegen.metrics_log import read_metrics
from kneegen.runs import step_checkpoint, step_checkpoints
from kneegen.training_run import run_training

from helpers import tiny_config, tiny_run_dict
from test_training_resume import losses, train_with_torchrun

T = 8


def filled_sampler(profile: torch.Tensor) -> TimestepSampler:
    """An importance sampler whose H losses at t are profile[t] × (1 + k/10), k = 0 … H−1."""
    sampler = TimestepSampler(len(profile), "importance")
    for k in range(HISTORY):
        sampler.update(torch.arange(len(profile)), profile * (1 + k / 10))
    return sampler


PROFILE = torch.arange(T, dtype=torch.float64)  # L_t ∝ t; nothing at t = 0, where only ε keeps p > 0


def closed_form_p(profile: torch.Tensor) -> torch.Tensor:
    """√E[L_t²] = profile[t] · √mean((1 + k/10)²), so p_t ∝ profile[t], then mixed with uniform."""
    return (1 - UNIFORM_SHARE) * profile / profile.sum() + UNIFORM_SHARE / len(profile)


# --- the sampler -------------------------------------------------------------------------------------


def test_uniform_draws_are_torch_randint_of_the_same_generator():
    sampler = TimestepSampler(T, "uniform")
    for _ in range(HISTORY):
        sampler.update(torch.arange(T), PROFILE)  # even a full history leaves uniform t alone
    ours, reference = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for size in (16, 3, 16):
        t, weight = sampler.draw(size, ours)
        assert torch.equal(t, torch.randint(0, T, (size,), generator=reference))
        assert torch.equal(weight, torch.ones(size))
    assert torch.equal(ours.get_state(), reference.get_state())  # nothing else drawn: ε follows as before


def test_importance_draws_stay_uniform_until_every_t_has_a_full_history():
    sampler = TimestepSampler(T, "importance")
    for _ in range(HISTORY):
        sampler.update(torch.arange(1, T), PROFILE[1:])  # t = 0 never seen
    sampler.update(torch.zeros(HISTORY - 1, dtype=torch.int64), torch.ones(HISTORY - 1))  # one short
    ours, reference = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    t, weight = sampler.draw(32, ours)
    assert not sampler.ready and torch.equal(weight, torch.ones(32))
    assert torch.equal(t, torch.randint(0, T, (32,), generator=reference))
    sampler.update(torch.zeros(1, dtype=torch.int64), torch.ones(1))
    assert sampler.ready and not torch.equal(sampler.draw(32, ours)[1], torch.ones(32))


def test_importance_draws_follow_p_from_the_stored_losses_with_weights_one_over_T_p():
    sampler = filled_sampler(PROFILE)
    p = closed_form_p(PROFILE)
    torch.testing.assert_close(sampler.probabilities(), p, rtol=1e-12, atol=0)
    draws = 200_000
    t, weight = sampler.draw(draws, torch.Generator().manual_seed(2))
    frequency = torch.bincount(t, minlength=T).double() / draws
    assert (frequency - p).abs().max() < 5 * (0.25 / draws) ** 0.5  # five standard errors at most
    assert torch.equal(weight, (1 / (T * sampler.probabilities()[t])).float())
    torch.testing.assert_close(weight, (1 / (T * p[t])).float(), rtol=1e-6, atol=0)
    assert weight[t == 0].unique().item() == pytest.approx(1 / UNIFORM_SHARE)  # the uniform share alone


def test_importance_weights_keep_the_expected_loss_of_uniform_t():
    profile = torch.tensor([0.9, 0.05, 0.3, 0.01, 2.0, 0.2, 0.0, 0.6], dtype=torch.float64)
    sampler = filled_sampler(profile)
    p = sampler.probabilities()
    assert p.sum().item() == pytest.approx(1.0, abs=1e-15)
    every_t = torch.arange(T)
    weights = (1 / (T * p[every_t])).float().double()  # as `draw` returns them, per t
    expected_weighted = (p * weights * profile).sum()  # E_p[w_t L_t], exactly
    assert expected_weighted.item() == pytest.approx(profile.mean().item(), rel=1e-6)


def test_update_keeps_the_last_H_losses_of_each_t_in_batch_order():
    sampler = TimestepSampler(5, "importance")
    seen: list[deque[float]] = [deque(maxlen=HISTORY) for _ in range(5)]
    generator = torch.Generator().manual_seed(3)
    for size in (1, 7, 40, 3, 25):  # batches of 40 repeat a t more than H times
        t = torch.randint(0, 5, (size,), generator=generator)
        batch_losses = torch.rand(size, generator=generator)
        sampler.update(t, batch_losses)
        for ti, loss in zip(t.tolist(), batch_losses.double().tolist()):
            seen[ti].append(loss)
    for ti in range(5):
        slots = [(sampler.seen[ti].item() - len(seen[ti]) + k) % HISTORY for k in range(len(seen[ti]))]
        assert sampler.losses[ti, slots].tolist() == list(seen[ti])  # oldest to newest around the ring


def test_state_dict_round_trip_continues_the_same_draws():
    sampler = filled_sampler(PROFILE)
    buffer = io.BytesIO()
    torch.save(sampler.state_dict(), buffer)  # as inside a checkpoint
    restored = TimestepSampler(T, "importance")
    restored.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    first, second = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for _ in range(3):
        (t, weight), (t_again, weight_again) = sampler.draw(16, first), restored.draw(16, second)
        assert torch.equal(t, t_again) and torch.equal(weight, weight_again)
        sampler.update(t, t.double())
        restored.update(t_again, t_again.double())
    saved = sampler.state_dict()
    sampler.update(torch.arange(T), torch.full((T,), 9.0))
    assert not torch.equal(saved["losses"], sampler.losses)  # a copy, not a view of the live history


def test_sum_tensor_of_one_process_is_its_tensor_in_fp32_on_the_cpu():
    values = torch.tensor([0.0, 1.5, 0.0, 2.25], dtype=torch.float64)
    summed = SINGLE.sum_tensor(values)
    assert summed.dtype == torch.float32 and summed.device.type == "cpu"
    assert summed.tolist() == values.tolist()


# --- in training -------------------------------------------------------------------------------------

# T = 8 and batches of 16 on 50 images: every t has its 10 losses within 3 epochs.
IMPORTANCE = {"timesteps": 8, "timestep_sampling": "importance"}


@pytest.mark.slow
def test_importance_run_resumed_mid_run_gives_the_losses_of_a_straight_run(prepared, tmp_path):
    cfg = tiny_config(
        prepared,
        tmp_path,
        diffusion=IMPORTANCE,
        train={"epochs": 4, "checkpoint_every_steps": 3, "keep_checkpoints": 10},
    )
    run_dir = tmp_path / "run"
    run_training(cfg, run_dir)
    straight, straight_last = losses(run_dir), load_checkpoint(run_dir / "last.pt")
    mid_epoch = [path for path in step_checkpoints(run_dir) if load_checkpoint(path)["batch_in_epoch"] > 0]
    resume_from = mid_epoch[-1]
    history = load_checkpoint(resume_from)["timestep_sampler"]
    assert (history["seen"] >= HISTORY).all()  # importance draws from the restored history after the resume

    run_training(cfg, run_dir, resume=True, checkpoint=resume_from)
    assert losses(run_dir) == straight
    again = load_checkpoint(run_dir / "last.pt")
    assert all(torch.equal(again["model"][k], straight_last["model"][k]) for k in straight_last["model"])
    for key in ("losses", "seen"):
        assert torch.equal(again["timestep_sampler"][key], straight_last["timestep_sampler"][key])


@pytest.mark.slow
def test_a_checkpoint_without_a_timestep_history_resumes_with_an_empty_one(prepared, tmp_path):
    cfg = tiny_config(prepared, tmp_path, diffusion=IMPORTANCE, train={"epochs": 1})
    run_dir = tmp_path / "run"
    run_training(cfg, run_dir)
    payload = torch.load(run_dir / "last.pt", weights_only=True)
    del payload["timestep_sampler"]
    torch.save(payload, run_dir / "last.pt")
    state = run_training(
        tiny_config(prepared, tmp_path, diffusion=IMPORTANCE, train={"epochs": 2}), run_dir, resume=True
    )
    assert state.timestep_sampler.seen.sum().item() == 50  # the second epoch's images only


@pytest.mark.slow
def test_two_processes_draw_importance_sampled_t_like_one(prepared, tmp_path):
    """torchrun, 2 CPU processes (gloo), against one process with 2 micro-batches: `sum_tensor`
    hands each process the losses of the other's share, so histories, draws and weights stay
    identical (rank 0's history is the one process's; rank 1's draws give the same gradients)."""
    two_epochs = {"epochs": 2, "keep_checkpoints": 2}  # keeps the checkpoints of both epoch ends
    sections = {"diffusion": {**IMPORTANCE, "timesteps": 3}, "train": two_epochs}  # T = 3: full in epoch 1
    ddp_dir = tmp_path / "ddp"
    train_with_torchrun(tiny_run_dict(prepared, **sections), tmp_path / "tiny.yaml", ddp_dir)
    one_dir = tmp_path / "one"
    one_sections = {**sections, "train": {**two_epochs, "grad_accumulation": 2}}
    run_training(tiny_config(prepared, tmp_path, **one_sections), one_dir)

    ddp, one = load_checkpoint(ddp_dir / "last.pt"), load_checkpoint(one_dir / "last.pt")
    first_epoch = load_checkpoint(step_checkpoint(one_dir, 4))["timestep_sampler"]
    assert (first_epoch["seen"] >= HISTORY).all()  # the second epoch's t were importance-sampled
    for key in ("losses", "seen"):
        assert torch.equal(ddp["timestep_sampler"][key], one["timestep_sampler"][key]), key
    assert all(torch.equal(ddp["model"][k], one["model"][k]) for k in one["model"])
    assert [r["train_losses"] for r in read_metrics(ddp_dir / "metrics.jsonl")] == [
        r["train_losses"] for r in read_metrics(one_dir / "metrics.jsonl")
    ]


@pytest.mark.parametrize(("mean", "std", "below_1"), [(-1.2, 1.2, 0.841), (-1.85, 1.2, 0.938), (-0.5, 0.8, 0.734)])
def test_lognormal_draws_the_t_whose_noise_level_follows_the_configured_log_normal(mean, std, below_1):
    schedule = Schedule("cosine", 1000)
    sampler = TimestepSampler(1000, "lognormal", schedule.log_sigmas(), (mean, std))
    t, weights = sampler.draw(200_000, torch.Generator().manual_seed(0))
    assert torch.equal(weights, torch.ones(len(t)))
    log_sigma = 0.5 * torch.log((1 - schedule.alphas_cumprod[t]) / schedule.alphas_cumprod[t])
    # The nearest t moves ln σ by at most half a grid step, far below P_std; the tails are cut at the grid's ends.
    assert log_sigma.mean().item() == pytest.approx(mean, abs=0.02)
    assert log_sigma.std().item() == pytest.approx(std, abs=0.02)
    assert (log_sigma < 0).double().mean().item() == pytest.approx(below_1, abs=0.01)  # Φ(−P_mean / P_std)


def test_lognormal_picks_the_nearest_noise_level_and_repeats_for_a_seed():
    schedule = Schedule("linear", 1000)
    sampler = TimestepSampler(1000, "lognormal", schedule.log_sigmas(), (-1.2, 1.2))
    t, _ = sampler.draw(64, torch.Generator().manual_seed(3))
    again, _ = sampler.draw(64, torch.Generator().manual_seed(3))
    assert torch.equal(t, again)
    z = torch.randn(64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    wanted = -1.2 + 1.2 * z
    table = sampler.log_sigmas
    assert torch.equal(t, (table[None, :] - wanted[:, None]).abs().argmin(dim=1))


def test_lognormal_needs_the_schedule_and_its_parameters():
    with pytest.raises(ValueError, match="ln σ_t"):
        TimestepSampler(1000, "lognormal", lognormal=(-1.2, 1.2))
    with pytest.raises(ValueError, match="P_mean"):
        TimestepSampler(1000, "lognormal", Schedule("cosine", 1000).log_sigmas())


def test_training_draws_from_the_configs_log_normal_and_old_configs_keep_edms():
    shape, cpu = (16, 16), Compute(torch.device("cpu"), None)
    base = {"model.unet.channels": 8, "diffusion.timestep_sampling": "lognormal"}
    shifted = create_state(load_config(None, {**base, "diffusion.lognormal_mean": -1.85}), shape, cpu)
    edm = create_state(load_config(None, base), shape, cpu)  # a config without the keys, as before they existed
    assert shifted.timestep_sampler.lognormal_params == (-1.85, 1.2) and edm.timestep_sampler.lognormal_params == (
        -1.2,
        1.2,
    )
    t_shifted, _ = shifted.timestep_sampler.draw(4096, torch.Generator().manual_seed(0))
    t_edm, _ = edm.timestep_sampler.draw(4096, torch.Generator().manual_seed(0))
    assert (t_shifted <= t_edm).all() and (t_shifted < t_edm).float().mean() > 0.9  # lower noise, draw for draw


def test_auto_centres_the_log_normal_on_the_training_images_spread():
    """ln(0.6 σ_data), EDM's centre: images half black and half white span [-1, 1] with σ = 1
    exactly, a quarter white σ = √3/2; a latent model's σ_data is 1 (latents are scaled to it)."""
    halves = np.zeros((4, 8, 8), np.uint8)
    halves[:, :, 4:] = 255
    quarters = np.zeros((4, 8, 8), np.uint8)
    quarters[:, :, 6:] = 255
    auto = load_config(None, {"diffusion.lognormal_mean": "auto", "data": "somewhere"})
    cfg, note = with_noise_centre(auto, halves)
    assert cfg.diffusion.lognormal_mean == round(math.log(0.6), 3) and "ln(0.6 × 1.000)" in note
    cfg, _ = with_noise_centre(auto, quarters)
    assert cfg.diffusion.lognormal_mean == round(math.log(0.6 * math.sqrt(3) / 2), 3)
    latent = load_config(None, {"diffusion.lognormal_mean": "auto", "model.autoencoder": "vae.pt"})
    assert with_noise_centre(latent, quarters)[0].diffusion.lognormal_mean == round(math.log(0.6), 3)
    fixed = load_config(None, {"diffusion.lognormal_mean": -1.5})
    assert with_noise_centre(fixed, quarters) == (fixed, "")


def test_auto_refuses_images_without_spread_and_other_words():
    with pytest.raises(KneegenError, match="all one value.*lognormal_mean=-1.2"):
        with_noise_centre(load_config(None, {"diffusion.lognormal_mean": "auto"}), np.full((3, 8, 8), 40, np.uint8))
    with pytest.raises(KneegenError, match="lognormal_mean must be float or auto; got 'middle'"):
        load_config(None, {"diffusion.lognormal_mean": "middle"})
    with pytest.raises(KneegenError, match="lognormal_mean = 12.0 must be"):
        load_config(None, {"diffusion.lognormal_mean": 12})


def test_a_run_records_the_centre_it_measured(prepared, tmp_path):
    """The run dir's config holds the number, not `auto`: a resumed run draws the same levels
    whatever the data has become."""
    cfg = tiny_config(prepared, tmp_path, diffusion={"timestep_sampling": "lognormal", "lognormal_mean": "auto"})
    cfg.train.epochs = 1
    run_training(cfg, tmp_path / "run")
    saved = load_config(tmp_path / "run" / "config.yaml")
    images = open_cache(prepared).split("train")
    assert saved.diffusion.lognormal_mean == round(math.log(0.6 * model_range_std(images)), 3)
    assert -3 < saved.diffusion.lognormal_mean < -0.5
