"""Training options at scale, in one process: Min-SNR-γ weights and offset noise against their
closed forms, the learning-rate schedule, how an epoch is cut into global batches and shares,
gradient accumulation, the non-finite-step guard, fp16 loss scaling, step metrics, previews."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from kneegen.config import TrainConfig, load_config
from kneegen.data.cache import open_cache
from kneegen.engine.device import Compute
from kneegen.engine.distributed import Distributed, check_world_fits
from kneegen.engine.loss import min_snr_weight, per_image_loss
from kneegen.engine.schedule import Schedule
from kneegen.engine.training import (
    create_state,
    draw_noise,
    epoch_batches,
    epoch_steps,
    learning_rate,
    rng_states,
    set_rng_states,
    state_payload,
    steps_per_epoch,
)
from kneegen.errors import KneegenError
from kneegen.metrics_log import epoch_records, read_metrics
from kneegen.training_run import planned_end_step, replanned_end_step, run_training

from helpers import tiny_config

CPU = Compute(torch.device("cpu"), None)


# --- Min-SNR-γ and offset noise -----------------------------------------------------------------


def test_min_snr_weights_match_the_closed_forms():
    alpha_bar = torch.tensor([0.1, 0.5, 0.9, 0.99], dtype=torch.float64)  # SNR = 1/9, 1, 9, 99
    snr = alpha_bar / (1 - alpha_bar)
    gamma = 5.0
    eps = min_snr_weight(snr, gamma, "eps")
    v = min_snr_weight(snr, gamma, "v")
    assert eps.tolist() == pytest.approx([1.0, 1.0, 5 / 9, 5 / 99])  # min(SNR, γ) / SNR
    assert v.tolist() == pytest.approx([0.1, 0.5, 5 / 10, 5 / 100])  # min(SNR, γ) / (SNR + 1)
    below = snr <= gamma
    assert v[below].tolist() == pytest.approx(alpha_bar[below].tolist())  # SNR/(SNR+1) = ᾱ while SNR ≤ γ
    assert eps.dtype == torch.float32
    assert min_snr_weight(snr, 0.0, "v").tolist() == [1.0] * 4  # γ = 0: off


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_weighted_loss_is_min_snr_times_the_x0_error(prediction):
    """The paper's objective: the weighted loss in the network's target equals min(SNR, γ) ‖x0 − x̂0‖²."""
    schedule = Schedule("cosine", 1000)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand((6, 1, 8, 8), generator=generator, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    t = torch.tensor([0, 50, 300, 600, 900, 999])
    x_t = schedule.add_noise(x0, noise, t)
    target = schedule.target(x0, noise, t, prediction)
    output = target + 0.1 * torch.randn(x0.shape, generator=generator, dtype=torch.float64)  # an imperfect network
    x0_hat, _ = schedule.to_x0_eps(output, x_t, t, prediction)
    gamma = 5.0
    alpha_bar = schedule.alpha_bar(t)
    snr = alpha_bar / (1 - alpha_bar)
    torch.testing.assert_close(schedule.snr(t), snr, rtol=1e-12, atol=0)
    weighted = min_snr_weight(schedule.snr(t), gamma, prediction).double() * (output - target).square().flatten(1).mean(
        1
    )
    x0_error = (x0_hat - x0).square().flatten(1).mean(1)
    torch.testing.assert_close(weighted, snr.clamp(max=gamma) * x0_error, rtol=1e-5, atol=1e-12)


def test_offset_noise_adds_one_constant_per_image_and_channel():
    plain = draw_noise(torch.Generator().manual_seed(3), (4, 1, 8, 8), 0.0)
    offset = draw_noise(torch.Generator().manual_seed(3), (4, 1, 8, 8), 0.1)
    shift = offset - plain  # the same ε first, then the offsets
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)
    assert 0 < shift[:, 0, 0, 0].abs().max() < 0.5
    assert not torch.equal(shift[0], shift[1])


# --- learning rate, batches and shares ---------------------------------------------------------


def test_cosine_learning_rate_follows_warmup_then_half_cosine_to_zero():
    cfg = TrainConfig(lr=1.0, warmup_steps=2, lr_schedule="cosine")
    lrs = [learning_rate(cfg, step, 10) for step in range(11)]
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    for step in range(2, 11):
        assert lrs[step] == pytest.approx(0.5 * (1 + math.cos(math.pi * (step - 2) / 8)))
    assert lrs[6] == pytest.approx(0.5) and lrs[10] == pytest.approx(0.0, abs=1e-12)
    constant = TrainConfig(lr=1.0, warmup_steps=2)
    assert [learning_rate(constant, step, 10) for step in range(5)] == pytest.approx([0.5, 1, 1, 1, 1])


def test_cooldown_holds_the_lr_then_falls_linearly_to_zero_over_the_last_fraction():
    cfg = TrainConfig(lr=1.0, warmup_steps=2, cooldown=0.2)
    lrs = [learning_rate(cfg, step, 100) for step in range(100)]
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0]) and lrs[80] == pytest.approx(1.0)
    assert lrs[90] == pytest.approx(0.5) and lrs[99] == pytest.approx(1 / 20)  # (100 − step) / 20
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert learning_rate(cfg, 100, 100) == 0.0


def test_cooldown_with_a_cosine_schedule_is_refused():
    with pytest.raises(KneegenError, match="train.cooldown"):
        load_config(None, {"train.cooldown": 0.2, "train.lr_schedule": "cosine"})


def test_the_time_budget_plans_the_cooldowns_end_from_the_pace_of_an_epoch():
    assert planned_end_step(2, 100, budget_left=50.0, epoch_seconds=10.0, per_epoch=7) == (2 + 5) * 7
    assert planned_end_step(2, 4, budget_left=50.0, epoch_seconds=10.0, per_epoch=7) == 4 * 7  # train.epochs caps
    assert planned_end_step(2, 100, budget_left=3.0, epoch_seconds=10.0, per_epoch=7) == 3 * 7  # at least one more


def test_a_new_plan_moves_the_cooldowns_end_either_way_until_the_lr_falls_then_only_earlier():
    assert replanned_end_step(0, step=20, cooldown=0.2, plan=70) == 70  # the first plan
    assert replanned_end_step(70, step=30, cooldown=0.2, plan=84) == 84  # faster machine: LR still constant
    assert replanned_end_step(70, step=30, cooldown=0.2, plan=63) == 63
    assert replanned_end_step(70, step=56, cooldown=0.2, plan=84) == 70  # falling since step 56: never later
    assert replanned_end_step(70, step=56, cooldown=0.2, plan=63) == 63  # a slower machine still ends in time


@pytest.mark.slow
def test_a_timed_run_with_a_cooldown_ends_at_its_plan_with_the_lr_at_zero(prepared, tmp_path):
    """A budget far above what 4 epochs need: the plan is all 4 epochs, and the LR falls as with --epochs 4."""
    run_dir = tmp_path / "run"
    cfg = tiny_config(prepared, tmp_path, train={"epochs": 4, "minutes": 30.0, "cooldown": 0.5})
    state = run_training(cfg, run_dir)
    assert state.end_step == 4 * steps_per_epoch(50, 16) and state.epoch == 4
    lrs = [record["lr"] for record in epoch_records(read_metrics(run_dir / "metrics.jsonl"))]
    assert lrs[0] == lrs[1] == pytest.approx(2e-3) and lrs[1] > lrs[2] > lrs[3] > 0
    by_epochs = tiny_config(prepared, tmp_path, train={"epochs": 4, "cooldown": 0.5})
    assert lrs[3] == pytest.approx(learning_rate(by_epochs.train, state.end_step - 1, state.end_step))


def test_adam_beta2_reaches_the_optimizer():
    state = create_state(load_config(None, {"model.unet.channels": 8, "train.adam_beta2": 0.99}), (16, 16), CPU)
    assert state.optimizer.param_groups[0]["betas"] == (0.9, 0.99)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_an_epoch_is_global_batches_of_the_shared_order_split_into_shares(world_size):
    train = TrainConfig(batch_size=16, seed=4)
    batches = epoch_batches(50, train, epoch=2, world_size=world_size)  # 3 full batches + 2 images
    expected_steps = 4 if world_size <= 2 else 3  # a last batch smaller than the world is dropped
    assert len(batches) == steps_per_epoch(50, 16, world_size) == expected_steps
    seen = np.concatenate(batches)
    assert len(set(seen.tolist())) == len(seen)  # no image twice in an epoch
    again = epoch_batches(50, train, epoch=2, world_size=world_size)  # what every other process computes
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    for batch in batches:
        shares = [Distributed(rank, rank, world_size).share(len(batch)) for rank in range(world_size)]
        assert np.array_equal(np.concatenate(shares), np.arange(len(batch)))  # contiguous, together all of it
        assert max(map(len, shares)) - min(map(len, shares)) <= 1 and min(map(len, shares)) >= 1


def test_too_many_processes_for_the_batch_are_refused_by_name():
    check_world_fits(batch_size=4, grad_accumulation=2, n_images=50, world_size=2)
    with pytest.raises(KneegenError, match=r"train.batch_size 2 .*4 processes.*--nproc_per_node"):
        check_world_fits(batch_size=2, grad_accumulation=1, n_images=50, world_size=4)
    with pytest.raises(KneegenError, match="train.grad_accumulation 3"):
        check_world_fits(batch_size=4, grad_accumulation=3, n_images=50, world_size=2)


# --- the step --------------------------------------------------------------------------------------


def first_step_gradients(prepared, tmp_path, **train):
    cfg = tiny_config(prepared, tmp_path, train={"grad_clip": 0.0, **train})
    data = open_cache(prepared)
    state = create_state(cfg, data.image_shape, CPU)
    result = next(epoch_steps(state, data.split("train"), Schedule("cosine", 1000), cfg, CPU))
    return result, {name: p.grad.clone() for name, p in state.network.named_parameters() if p.grad is not None}


def test_gradient_accumulation_gives_the_gradient_of_the_whole_batch(prepared, tmp_path):
    whole, whole_grads = first_step_gradients(prepared, tmp_path)
    parts, parts_grads = first_step_gradients(prepared, tmp_path, grad_accumulation=3)
    assert parts.loss == pytest.approx(whole.loss, rel=1e-6) and parts.images == whole.images == 16
    assert whole_grads.keys() == parts_grads.keys()
    for name, grad in whole_grads.items():
        torch.testing.assert_close(parts_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


class PoisonedOnCalls(nn.Module):
    """The network, but with a NaN output on the chosen calls (1-based)."""

    def __init__(self, network: nn.Module, bad_calls: set[int] | None) -> None:
        super().__init__()
        self.network, self.bad_calls, self.calls = network, bad_calls, 0

    def forward(self, x, t):
        self.calls += 1
        output = self.network(x, t)
        return output * math.nan if self.bad_calls is None or self.calls in self.bad_calls else output


def test_a_non_finite_step_is_skipped_and_counted(prepared, tmp_path):
    cfg = tiny_config(prepared, tmp_path)
    data = open_cache(prepared)
    state = create_state(cfg, data.image_shape, CPU)
    state.train_network = PoisonedOnCalls(state.network, bad_calls={2})
    weights, results = [], []
    for result in epoch_steps(state, data.split("train"), Schedule("cosine", 1000), cfg, CPU):
        results.append(result)
        weights.append({k: v.clone() for k, v in state.network.state_dict().items()})
    assert [r.skipped for r in results] == [False, True, False, False]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # the bad step changed nothing
    assert any(not torch.equal(weights[1][k], weights[2][k]) for k in weights[0])  # training went on
    assert state.epoch_skipped == [1] and state.bad_in_a_row == 0 and state.step == 4
    assert all(torch.isfinite(v).all() for v in weights[-1].values())


@pytest.mark.slow
def test_too_many_bad_steps_stop_the_run_and_keep_the_last_good_checkpoint(prepared, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_training(tiny_config(prepared, tmp_path, train={"epochs": 1}), run_dir)
    good = (run_dir / "last.pt").read_bytes()
    metrics = (run_dir / "metrics.jsonl").read_text()

    def nan_loss(prediction, target, kind):
        return per_image_loss(prediction, target, kind) * math.nan

    monkeypatch.setattr("kneegen.engine.training.per_image_loss", nan_loss)
    cfg = tiny_config(prepared, tmp_path, train={"epochs": 2, "max_bad_steps": 3, "checkpoint_every_steps": 1})
    with pytest.raises(KneegenError, match=r"3 steps in a row up to step 7 .*train.max_bad_steps"):
        run_training(cfg, run_dir, resume=True)
    assert (run_dir / "last.pt").read_bytes() == good  # skipped steps are never saved as progress…
    assert (run_dir / "metrics.jsonl").read_text() == metrics


@pytest.mark.slow
def test_fp16_trains_with_loss_scaling_and_checkpoints_the_scaler(prepared, tmp_path):
    """On CUDA without bf16; here on the CPU, where autocast has fp16 too, to run the code path."""
    cfg = tiny_config(prepared, tmp_path)
    data = open_cache(prepared)
    fp16 = Compute(torch.device("cpu"), torch.float16)
    state = create_state(cfg, data.image_shape, fp16)
    assert state.scaler.is_enabled() and not create_state(cfg, data.image_shape, CPU).scaler.is_enabled()
    results = list(epoch_steps(state, data.split("train"), Schedule("cosine", 1000), cfg, fp16))
    assert all(math.isfinite(r.loss) and not r.skipped for r in results)
    assert state_payload(state, [rng_states()])["scaler"]["scale"] == state.scaler.get_scale() > 1
    assert fp16.describe() == "cpu (fp16)"


def test_rng_states_round_trip():
    states = rng_states()
    first = (np.random.rand(), torch.rand(1).item(), random.random())
    set_rng_states(states)
    assert (np.random.rand(), torch.rand(1).item(), random.random()) == first


def test_compile_wraps_the_training_network_only(prepared, tmp_path, monkeypatch):
    compiled = []

    def fake_compile(module):
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    cfg = tiny_config(prepared, tmp_path, train={"compile": True})
    state = create_state(cfg, (32, 32), CPU)
    assert compiled == [state.network] and state.train_network is state.network
    assert not any(key.startswith("_orig_mod") for key in state_payload(state, [])["model"])


# --- what a run writes ------------------------------------------------------------------------------


@pytest.mark.slow
def test_step_records_previews_and_missing_tensorboard(prepared, tmp_path, capsys):
    run_dir = tmp_path / "run"
    cfg = tiny_config(
        prepared, tmp_path, train={"epochs": 1, "log_every_steps": 2, "preview_every": 1, "tensorboard": True}
    )
    run_training(cfg, run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "steps"]
    (epoch,) = epoch_records(records)
    assert [r["step"] for r in steps] == [2, 4] and all(r["epoch"] == 1 for r in steps)
    assert steps[0]["train_loss"] == pytest.approx(sum(epoch["train_losses"][:2]) / 2)
    assert steps[1]["train_loss"] == pytest.approx(sum(epoch["train_losses"][2:]) / 2)
    assert epoch["skipped_steps"] == 0 and all(r["skipped_steps"] == 0 for r in steps)
    with Image.open(run_dir / "previews" / "epoch-0001.png") as grid:
        assert grid.mode == "L" and grid.size == (4 * 32 + 3 * 2, 4 * 32 + 3 * 2)
        assert grid.text["seeds"] == "0-15" and grid.text["epoch"] == "1"
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert not (run_dir / "tensorboard").exists()
    else:
        assert any((run_dir / "tensorboard").iterdir())


@pytest.mark.parametrize(
    "key",
    [
        "train.grad_accumulation=0",
        "diffusion.min_snr_gamma=-1",
        "train.log_every_steps=-1",
        "diffusion.timestep_sampling=sometimes",
    ],
)
def test_out_of_range_options_are_named(prepared, tmp_path, key):
    name, value = key.split("=")
    section, leaf = name.split(".")
    with pytest.raises(KneegenError, match=name):  # a bad choice when the config loads, a bad number before the run
        run_training(tiny_config(prepared, tmp_path, **{section: {leaf: yaml.safe_load(value)}}), tmp_path / "never")
    assert not (tmp_path / "never").exists()
