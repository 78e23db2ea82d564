"""The autoencoder's patch discriminator: its losses in closed form, the adaptive weight as the
ratio it is, a discriminator that learns to tell slices from blurred ones, a generator term whose
gradient reaches the autoencoder only, and an adversarial autoencoder run that resumes exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kneegen.config import load_config, to_dict
from kneegen.data.cache import open_cache
from kneegen.engine.adversary import (
    SMALLEST_SIDE,
    PatchDiscriminator,
    adaptive_weight,
    discriminator_loss,
    generator_loss,
    make_adversary,
)
from kneegen.engine.autoencoder import Autoencoder, AutoencoderConfig
from kneegen.engine.device import resolve_compute
from kneegen.engine.distributed import SINGLE
from kneegen.engine.pixels import to_network_input
from kneegen.engine.training import create_state
from kneegen.errors import KneegenError
from kneegen.metrics_log import epoch_records, read_metrics
from kneegen.training_run import run_training

from helpers import tiny_config
from test_training_resume import train_with_torchrun

COMPUTE = resolve_compute("cpu", "fp32")
VAE = {"factor": 4, "latent_channels": 4, "channels": 8, "crop": 24, "discriminator_channels": 8}


def test_hinge_losses_have_their_closed_forms():
    confident = discriminator_loss(torch.full((2, 1, 3, 3), 2.0), torch.full((2, 1, 3, 3), -2.0))
    assert torch.equal(confident, torch.zeros(2))  # both sides beyond the margin: nothing to learn
    undecided = discriminator_loss(torch.zeros(2, 1, 3, 3), torch.zeros(2, 1, 3, 3))
    assert torch.equal(undecided, torch.full((2,), 2.0))
    fooled = discriminator_loss(torch.full((1, 1, 2, 2), -1.0), torch.full((1, 1, 2, 2), 0.5))
    assert torch.allclose(fooled, torch.tensor([2.0 + 1.5]))
    logits = torch.tensor([[[[1.0, 3.0]]], [[[-2.0, 0.0]]]])  # (2, 1, 1, 2)
    assert torch.allclose(generator_loss(logits), torch.tensor([-2.0, 1.0]))


def test_adaptive_weight_is_the_ratio_of_the_two_gradient_norms_at_the_last_layer():
    w = torch.tensor([3.0, 4.0], requires_grad=True)
    reconstruction = (w**2).sum()  # gradient 2w = (6, 8): norm 10
    adversarial = 0.5 * w[0]  # gradient (0.5, 0): norm 0.5
    weight = adaptive_weight(reconstruction, adversarial, w)
    assert torch.allclose(weight, torch.tensor(10.0 / (0.5 + 1e-4)))
    assert not weight.requires_grad
    assert adaptive_weight(reconstruction, 0.0 * w.sum(), w) == 1e4  # no adversarial gradient: the clamp


def test_the_discriminator_judges_overlapping_patches_of_any_size():
    discriminator = PatchDiscriminator(1, 8)
    assert discriminator(torch.zeros(2, 1, 32, 32)).shape == (2, 1, 2, 2)
    assert discriminator(torch.zeros(1, 1, 64, 48)).shape == (1, 1, 6, 4)
    assert discriminator(torch.zeros(1, 1, SMALLEST_SIDE, SMALLEST_SIDE)).shape == (1, 1, 1, 1)


def test_crops_too_small_to_judge_are_refused_by_key(prepared, tmp_path):
    cfg = tiny_config(prepared, tmp_path)
    cfg.model = load_config(
        None, {"model.arch": "vae", "model.vae": {**VAE, "crop": 16, "adversarial_weight": 0.5}}
    ).model
    with pytest.raises(KneegenError, match="model.vae.adversarial_weight.*set model.vae.crop to 24"):
        create_state(cfg, (32, 32), COMPUTE)


def test_the_discriminator_learns_to_tell_slices_from_blurred_ones(prepared):
    torch.manual_seed(0)
    adversary = make_adversary(1, 8, 1.0, 0, 2e-3, COMPUTE, SINGLE)
    slices = to_network_input(open_cache(prepared).split("train")[:16], torch.device("cpu"))  # (16, 1, 32, 32)
    blurred = F.interpolate(F.avg_pool2d(slices, 4), scale_factor=4, mode="nearest")
    losses = []
    for _ in range(40):
        adversary.pending.append((slices, blurred))
        losses.append(adversary.step(2e-3, len(slices)))
    assert losses[0] > 1.5  # undecided at first (≈ 2)
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]
    assert all(not p.requires_grad for p in adversary.network.parameters())  # frozen again between steps


def test_the_generator_term_reaches_the_autoencoder_and_not_the_discriminator():
    torch.manual_seed(0)
    autoencoder = Autoencoder(AutoencoderConfig(**VAE))
    adversary = make_adversary(1, 8, 0.5, 0, 1e-3, COMPUTE, SINGLE)
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    reconstruction, _, _ = autoencoder(images, torch.zeros(2, 4, 8, 8))
    reconstruction_loss = (reconstruction - images).abs().mean(dim=(1, 2, 3))
    term = adversary.generator_term(images, reconstruction, reconstruction_loss, autoencoder.last_layer())
    assert term.shape == (2,)
    term.sum().backward()
    assert autoencoder.last_layer().grad is not None and autoencoder.encoder.stem.weight.grad is not None
    assert all(p.grad is None for p in adversary.network.parameters())
    ((real, fake),) = adversary.pending  # kept, detached, for the discriminator's own step
    assert torch.equal(real, images) and not fake.requires_grad


def adversarial_run(data: Path, work: Path, run_dir: Path, epochs: int, resume: bool = False) -> None:
    cfg = tiny_config(data, work, train={"lr": 2e-3, "epochs": epochs, "batch_size": 10})
    cfg.model = load_config(
        None, {"model.arch": "vae", "model.vae": {**VAE, "adversarial_weight": 0.5, "adversarial_start": 1}}
    ).model
    run_training(cfg, run_dir, resume=resume)


def test_an_adversarial_autoencoder_run_resumed_mid_way_continues_with_the_losses_of_a_straight_one(prepared, tmp_path):
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    adversarial_run(prepared, tmp_path, straight, epochs=3)
    adversarial_run(prepared, tmp_path, halves, epochs=2)  # one epoch plain, one judged
    adversarial_run(prepared, tmp_path, halves, epochs=3, resume=True)
    keys = ("train_losses", "val_loss", "discriminator_loss")
    losses = [[r[k] for k in keys] for r in epoch_records(read_metrics(straight / "metrics.jsonl"))]
    resumed = [[r[k] for k in keys] for r in epoch_records(read_metrics(halves / "metrics.jsonl"))]
    assert resumed == losses
    judged = [loss for _, _, loss in losses]
    assert judged[0] is None and all(0 <= loss < 2.5 for loss in judged[1:])  # judging from the second epoch
    checkpoint = torch.load(straight / "last.pt", weights_only=True)
    assert set(checkpoint["adversary"]) == {"network", "optimizer", "scaler", "epoch_losses"}
    assert checkpoint["adversary"]["optimizer"]["state"]  # the discriminator has stepped


@pytest.mark.slow
def test_two_processes_train_the_autoencoder_and_its_discriminator_exactly_as_one(prepared, tmp_path):
    """torchrun, 2 CPU processes (gloo), each with half of every batch, against one process with the
    same halves as micro-batches: bit-identical autoencoders and discriminators."""
    cfg = tiny_config(prepared, tmp_path, train={"lr": 2e-3, "epochs": 2, "batch_size": 10})
    cfg.model = load_config(
        None, {"model.arch": "vae", "model.vae": {**VAE, "adversarial_weight": 0.5, "adversarial_start": 1}}
    ).model
    train_with_torchrun(to_dict(cfg), tmp_path / "vae.yaml", tmp_path / "ddp")
    cfg.train.grad_accumulation = 2
    run_training(cfg, tmp_path / "one")
    ddp, one = (torch.load(tmp_path / name / "last.pt", weights_only=True) for name in ("ddp", "one"))
    assert all(torch.equal(ddp["model"][k], one["model"][k]) for k in one["model"])
    discriminators = ddp["adversary"]["network"], one["adversary"]["network"]
    assert all(torch.equal(discriminators[0][k], discriminators[1][k]) for k in discriminators[1])
