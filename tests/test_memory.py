"""Memory planning: the saved-tensor count, the networks trained or called beside the run's own,
and micro-batches when a batch would not fit."""

from __future__ import annotations

import pytest
import torch

from kneegen.config import ModelConfig, load_config
from kneegen.distill_request import distillation_config
from kneegen.engine import memory
from kneegen.engine.device import Compute
from kneegen.engine.distillation import start_distillation
from kneegen.engine.memory import (
    BYTES_PER_PARAMETER,
    COMPANION_BYTES_PER_PARAMETER,
    FROZEN_BYTES_PER_PARAMETER,
    HEADROOM,
    MemoryPlan,
    fit_batch_in_memory,
    parameter_count,
    plan_memory,
    saved_bytes_per_image,
)
from kneegen.engine.network import build_network
from kneegen.engine.perceptual import perceptual_distance
from kneegen.engine.training import create_state
from kneegen.errors import KneegenError
from kneegen.evaluation.features import bundled_weights
from kneegen.metrics_log import read_metrics
from kneegen.training_run import run_training

from helpers import tiny_config

CPU = Compute(torch.device("cpu"), None)
TINY_UNET = dict(channels=16, channel_mults=[1, 2], blocks_per_level=1, attention_levels=[1], patch_size=1)
TINY = ModelConfig("unet", {"unet": TINY_UNET})


def test_saved_bytes_grow_with_the_image_and_leave_the_rng_and_weights_alone():
    torch.manual_seed(0)
    network = build_network(ModelConfig("unet", {"unet": {**TINY_UNET, "attention_levels": []}}), (16, 16)).train()
    before = [p.detach().clone() for p in network.parameters()]
    state = torch.random.get_rng_state()
    small = saved_bytes_per_image(network, (16, 16), CPU)
    large = saved_bytes_per_image(network, (32, 32), CPU)
    assert torch.equal(torch.random.get_rng_state(), state) and network.training
    assert all(torch.equal(a, b) for a, b in zip(before, network.parameters()))
    # Convolutions keep memory in proportion to the pixels (×4); the middle block's attention
    # keeps an (HW)² matrix, which makes it a little more.
    assert 3.9 < large / small < 4.5
    # At least the first conv's output in fp32 is kept: 16 channels × 16 × 16 pixels × 4 bytes.
    assert small > 16 * 16 * 16 * 4
    # Attention on a finer level too: more of the memory grows with (HW)².
    attending = build_network(TINY, (16, 16))
    assert (
        saved_bytes_per_image(attending, (32, 32), CPU) / saved_bytes_per_image(attending, (16, 16), CPU)
        > large / small
    )


def plan(per_image: int, available: int) -> MemoryPlan:
    return MemoryPlan(per_image=per_image, fixed=0, available=available)


def test_a_batch_that_fits_is_left_as_it_is(tmp_path):
    cfg = tiny_config("data", tmp_path, train={"batch_size": 8})
    assert fit_batch_in_memory(cfg, plan(100, 10_000)) == (cfg, "")


def test_a_batch_too_large_is_split_into_the_fewest_micro_batches_that_fit(tmp_path):
    cfg = tiny_config("data", tmp_path, train={"batch_size": 8})
    room = int(3 * HEADROOM * 100 / 0.85) + 1  # three images fit, four do not
    fitted, note = fit_batch_in_memory(cfg, plan(100, room))
    assert fitted.train.grad_accumulation == 3 and fitted.train.batch_size == 8  # micro-batches of 3, 3, 2
    assert "3 micro-batches" in note and "train.grad_accumulation 3" in note


def test_a_single_image_that_does_not_fit_is_refused(tmp_path):
    cfg = tiny_config("data", tmp_path, train={"batch_size": 8})
    with pytest.raises(KneegenError, match="one training image needs"):
        fit_batch_in_memory(cfg, plan(10_000, 1_000))


@pytest.mark.slow
def test_training_with_little_memory_makes_the_updates_of_the_full_batch(prepared, tmp_path, monkeypatch):
    """Planned micro-batches are grad_accumulation, which is tested to give the same updates: the
    losses equal those of the same run given that accumulation by hand."""
    by_hand = run_training(tiny_config(prepared, tmp_path, train={"grad_accumulation": 2}), tmp_path / "by-hand")
    saved = saved_bytes_per_image(by_hand.network, (32, 32), CPU)
    batch = tiny_config(prepared, tmp_path).train.batch_size
    little = int(((batch + 1) // 2) * HEADROOM * saved / 0.85) + 1  # half a batch fits, no more
    monkeypatch.setattr("kneegen.engine.memory.free_memory", lambda device, processes: little)
    monkeypatch.setattr("kneegen.engine.memory.BYTES_PER_PARAMETER", 0)
    run_training(tiny_config(prepared, tmp_path), tmp_path / "planned")
    losses = [
        [r["train_losses"] for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "epoch"]
        for run in (tmp_path / "by-hand", tmp_path / "planned")
    ]
    assert losses[0] == losses[1]


def autoencoder_config(tmp_path, **loss_weights: float):
    cfg = tiny_config("data", tmp_path, train={"batch_size": 8})
    vae = {"factor": 4, "latent_channels": 4, "channels": 8, "crop": 32, "discriminator_channels": 8}
    cfg.model = load_config(None, {"model.arch": "vae", "model.vae": {**vae, **loss_weights}}).model
    return cfg


def test_an_autoencoders_discriminator_is_planned_for_and_can_split_a_batch_that_fits_without_it(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "free_memory", lambda device, processes: 1 << 40)
    alone_cfg, judged_cfg = autoencoder_config(tmp_path), autoencoder_config(tmp_path, adversarial_weight=0.5)
    torch.manual_seed(0)
    alone = plan_memory(create_state(alone_cfg, (32, 32), CPU), (1, 32, 32), CPU, 1)
    torch.manual_seed(0)
    state = create_state(judged_cfg, (32, 32), CPU)
    judged = plan_memory(state, (1, 32, 32), CPU, 1)
    discriminator = state.adversary.network
    # The discriminator's judgement of the reconstruction is part of the autoencoder's backward
    # pass: measured through its frozen weights, at least the reconstruction it keeps.
    judging = saved_bytes_per_image(discriminator, (1, 32, 32), CPU)
    assert judging >= 32 * 32 * 4 and not any(p.requires_grad for p in discriminator.parameters())
    assert judged.per_image == max(alone.per_image + judging, 2 * judging)
    assert judged.fixed == alone.fixed + COMPANION_BYTES_PER_PARAMETER * parameter_count(discriminator)
    # Room for the batch of 8 in one pass without the discriminator, but not with it.
    room = MemoryPlan(alone.per_image, alone.fixed, 0).step_bytes(8) / 0.85 + 1
    assert fit_batch_in_memory(alone_cfg, MemoryPlan(alone.per_image, alone.fixed, int(room)))[0] == alone_cfg
    fitted, note = fit_batch_in_memory(judged_cfg, MemoryPlan(judged.per_image, judged.fixed, int(room)))
    assert fitted.train.grad_accumulation > 1 and "micro-batches" in note


@pytest.mark.skipif(bundled_weights() is None, reason="default_1.pt not installed")
def test_an_autoencoders_perceptual_distance_is_planned_for_as_part_of_its_backward_pass(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "free_memory", lambda device, processes: 1 << 40)
    torch.manual_seed(0)
    alone = plan_memory(create_state(autoencoder_config(tmp_path), (32, 32), CPU), (1, 32, 32), CPU, 1)
    torch.manual_seed(0)
    state = create_state(autoencoder_config(tmp_path, perceptual_weight=1.0), (32, 32), CPU)
    perceiving = plan_memory(state, (1, 32, 32), CPU, 1)
    inception = perceptual_distance(CPU.device)
    through = saved_bytes_per_image(inception, (1, 32, 32), CPU)
    assert through >= 32 * 32 * 4  # at least the reconstruction it reads
    assert perceiving.per_image == alone.per_image + through
    assert perceiving.fixed == alone.fixed + FROZEN_BYTES_PER_PARAMETER * parameter_count(inception)


def test_a_dmd_distillation_plans_for_its_teacher_fake_score_and_teacher_pairs(trained_run, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "free_memory", lambda device, processes: 1 << 40)
    settings = {"distill.method": "dmd", "distill.regression_pairs": 8, "distill.fake_score_updates": 1}
    cfg, _ = distillation_config(trained_run / "best.pt", settings)
    state = create_state(cfg, (32, 32), CPU)
    student = saved_bytes_per_image(state.network, (1, 32, 32), CPU)
    plain = plan_memory(state, (1, 32, 32), CPU, 1)
    assert (plain.per_image, plain.fixed) == (student, BYTES_PER_PARAMETER * parameter_count(state.network))
    guided = plan_memory(state, (1, 32, 32), CPU, 1, keeps_guide=True)  # train.guide_at: a copy kept later
    assert guided.fixed == plain.fixed + FROZEN_BYTES_PER_PARAMETER * parameter_count(state.network)
    state.distillation, _ = start_distillation(state.network, cfg, CPU)
    planned = plan_memory(state, (1, 32, 32), CPU, 1)
    # Student, fake score and teacher are the same network: weights, gradients, moments and EMA;
    # weights, gradients and moments; weights; plus the 8 pairs of fp32 noise and image.
    n = parameter_count(state.network)
    guide = state.distillation.guide
    frozen = n + (parameter_count(guide) if guide is not None else 0)
    expected = (BYTES_PER_PARAMETER + COMPANION_BYTES_PER_PARAMETER) * n + FROZEN_BYTES_PER_PARAMETER * frozen
    assert planned.fixed == expected + 8 * 32 * 32 * 2 * 4
    assert planned.per_image == student  # the fake score's updates are the same network's pass
