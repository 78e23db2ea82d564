"""Latent diffusion end to end on the 32² phantom: an autoencoder trained with `kneegen train`, its
latent cache (encoded once, unit variance, one per autoencoder), a diffusion run in its latents that
samples, illustrates, validates and resumes exactly like a pixel run, and the refusals: another
autoencoder, an autoencoder where a denoiser is expected, settings that only fit pixels."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kneegen.config import load_config
from kneegen.data import latent_cache
from kneegen.data.cache import open_cache
from kneegen.data.latent_cache import latent_folder, open_latents
from kneegen.data.prepare import prepare_folder
from kneegen.engine.autoencoder import ChannelNorm
from kneegen.engine.checkpoint import load_checkpoint, save_checkpoint
from kneegen.engine.device import resolve_compute
from kneegen.engine.latent import load_latent_space
from kneegen.engine.network import build_network
from kneegen.engine.trained import load_trained_model
from kneegen.errors import KneegenError
from kneegen.metrics_log import epoch_records, read_metrics
from kneegen.runs import step_checkpoints
from kneegen.training_run import run_training

from helpers import TINY_MODEL, invoke, prepare_options, tiny_config

COMPUTE = resolve_compute("cpu", "fp32")
VAE = {"factor": 4, "latent_channels": 4, "channels": 8, "crop": 16}
LATENT_MODEL = {**TINY_MODEL, "unet": {**TINY_MODEL["unet"], "patch_size": 1}}  # 8×8 latents: 8 → 4


def vae_run(data: Path, work: Path, run_dir: Path, seed: int = 0) -> Path:
    """An autoencoder trained for 2 epochs on `data` with the tiny settings; its best.pt."""
    cfg = tiny_config(data, work, train={"lr": 2e-3, "seed": seed, "preview_every": 1})
    cfg.model = load_config(None, {"model.arch": "vae", "model.vae": VAE}).model
    run_training(cfg, run_dir)
    return run_dir / "best.pt"


@pytest.fixture(scope="module")
def latent_setup(prepared, tmp_path_factory) -> tuple[Path, Path]:
    """(a copy of the prepared cache, which the latent cache is written into; the autoencoder's best.pt)."""
    work = tmp_path_factory.mktemp("latent")
    data = work / "data"
    shutil.copytree(prepared, data)
    return data, vae_run(data, work, work / "autoencoder")


def latent_config(data: Path, autoencoder: Path, work: Path, **train):
    cfg = tiny_config(data, work, model=LATENT_MODEL, train={"lr": 2e-3, **train})
    cfg.model.autoencoder = str(autoencoder)
    return cfg


def test_an_autoencoder_run_reports_psnr_and_ssim_each_epoch_and_previews_reconstructions(latent_setup):
    _, autoencoder = latent_setup
    records = epoch_records(read_metrics(autoencoder.parent / "metrics.jsonl"))
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(r["val_psnr"] > 5 and 0 < r["val_ssim"] <= 1 for r in records)
    preview = np.asarray(Image.open(autoencoder.parent / "previews" / "epoch-0002.png"))
    assert preview.shape == (2 * 32 + 2, 8 * 32 + 7 * 2)  # 8 val slices above their reconstructions


def test_the_latent_cache_is_encoded_once_per_autoencoder_with_unit_variance(latent_setup, tmp_path, monkeypatch):
    data, autoencoder = latent_setup
    cache = open_cache(data)
    space = load_latent_space(autoencoder, COMPUTE, "test")
    splits = open_latents(cache, space, COMPUTE)
    assert {name: len(split) for name, split in splits.items()} == {"train": 50, "val": 10}
    assert splits["train"].dtype == np.float16 and splits["train"].shape[1:] == (4, 8, 8)
    assert np.std(splits["train"], dtype=np.float64) == pytest.approx(1.0, abs=1e-3)
    encoded = torch.from_numpy(np.asarray(splits["val"][:2], dtype=np.float32))
    expected = space.encode(torch.from_numpy(cache.split("val")[:2] / 127.5 - 1).float().unsqueeze(1), COMPUTE)
    torch.testing.assert_close(encoded, expected, atol=2e-3 * expected.abs().max().item(), rtol=1e-2)

    def refuse_to_encode(*args):
        raise AssertionError("encoded again")

    monkeypatch.setattr(latent_cache, "write_latents", refuse_to_encode)
    assert open_latents(cache, load_latent_space(autoencoder, COMPUTE, "test"), COMPUTE)["train"].shape == (50, 4, 8, 8)
    other = vae_run(data, tmp_path, tmp_path / "other", seed=1)
    with pytest.raises(AssertionError, match="encoded again"):
        open_latents(cache, load_latent_space(other, COMPUTE, "test"), COMPUTE)
    assert latent_folder(cache, load_latent_space(other, COMPUTE, "test")) != latent_folder(cache, space)


@pytest.mark.slow
def test_a_latent_run_samples_illustrates_and_validates_decoded_slices_through_the_cli(latent_setup, tmp_path):
    data, autoencoder = latent_setup
    config = tmp_path / "latent.yaml"
    config.write_text(
        "\n".join(
            [
                f"data: {data}",
                "device: cpu",
                "precision: fp32",
                "model: {arch: unet, autoencoder: " + str(autoencoder) + ", unet: {channels: 16, "
                "channel_mults: [1, 2], blocks_per_level: 1, attention_levels: [], patch_size: 1}}",
                "train: {epochs: 1, batch_size: 16, val_images: 8}",
                "sample: {sampler: ddim, steps: 3, batch_size: 4}",
            ]
        )
    )
    run_dir = tmp_path / "run"
    trained = invoke("train", "--config", config, "--run-dir", run_dir)
    assert trained.exit_code == 0, trained.output
    assert "4x8x8 latents of" in trained.output.replace("\n", "")
    checkpoint = run_dir / "last.pt"
    assert load_checkpoint(checkpoint)["latent"]["shape"] == [4, 8, 8]

    sampled = invoke("sample", "generate", 3, "--checkpoint", checkpoint, "--out", tmp_path / "samples")
    assert sampled.exit_code == 0, sampled.output
    images = [np.asarray(Image.open(tmp_path / "samples" / f"{k:06d}.png")) for k in range(3)]
    assert all(image.shape == (32, 32) and image.dtype == np.uint8 for image in images)
    assert len({image.tobytes() for image in images}) == 3

    illustrated = invoke("sample", "illustrate", 1, "--checkpoint", checkpoint, "--out", tmp_path / "strip")
    assert illustrated.exit_code == 0, illustrated.output
    strip = np.asarray(Image.open(tmp_path / "strip" / "illustrate_000000.png"))
    assert strip.shape[0] >= 2 * 32  # decoded x_t above decoded x̂_0, at the slices' size

    validated = invoke("validate", checkpoint, "--samples", 8)
    assert validated.exit_code == 0, validated.output
    assert "FID" in validated.output


def test_a_resumed_latent_run_continues_with_the_losses_of_a_straight_one(latent_setup, tmp_path):
    data, autoencoder = latent_setup
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    run_training(latent_config(data, autoencoder, tmp_path, epochs=2), straight)
    run_training(latent_config(data, autoencoder, tmp_path, epochs=1), halves)
    run_training(latent_config(data, autoencoder, tmp_path, epochs=2), halves, resume=True)
    losses = [[r["train_losses"], r["val_loss"]] for r in epoch_records(read_metrics(straight / "metrics.jsonl"))]
    resumed = [[r["train_losses"], r["val_loss"]] for r in epoch_records(read_metrics(halves / "metrics.jsonl"))]
    assert resumed == losses


def test_a_latent_model_refuses_an_autoencoder_with_other_weights(latent_setup, tmp_path):
    data, autoencoder = latent_setup
    own = tmp_path / "own.pt"
    shutil.copy(autoencoder, own)
    run_training(latent_config(data, own, tmp_path, epochs=1), tmp_path / "run")
    assert load_trained_model(tmp_path / "run" / "last.pt", COMPUTE).latent is not None

    payload = load_checkpoint(own)
    payload["ema"] = {name: tensor + 0.01 for name, tensor in payload["ema"].items()}
    save_checkpoint({k: v for k, v in payload.items() if k not in ("format", "format_version")}, own, then="retry")
    with pytest.raises(KneegenError, match="was trained with autoencoder .*different weights"):
        load_trained_model(tmp_path / "run" / "last.pt", COMPUTE)
    with pytest.raises(KneegenError, match="was trained with autoencoder"):
        run_training(latent_config(data, own, tmp_path, epochs=2), tmp_path / "run", resume=True)


def test_an_autoencoder_checkpoint_is_refused_where_samples_are_asked_for(latent_setup, trained_run, tmp_path):
    data, autoencoder = latent_setup
    result = invoke("sample", "generate", 1, "--checkpoint", autoencoder, "--out", tmp_path / "out")
    assert result.exit_code != 0 and "is an autoencoder, which draws no samples" in result.output
    with pytest.raises(KneegenError, match="is a unet checkpoint, not an autoencoder's"):
        run_training(latent_config(data, trained_run / "last.pt", tmp_path), tmp_path / "run")
    with pytest.raises(KneegenError, match="autoencoder checkpoint .* not found"):
        run_training(latent_config(data, tmp_path / "missing.pt", tmp_path), tmp_path / "run2")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model.arch": "vae", "model.autoencoder": "ae.pt"}, "an autoencoder .* trains on pixels"),
        ({"model.autoencoder": "ae.pt", "train.augment": ["shift"]}, "train.augment works on pixels"),
        ({"model.arch": "vae", "train.fid_every": 1}, "train.fid_every measures samples"),
        ({"model.autoencoder": 3}, "model.autoencoder must be the path"),
        ({"model.arch": "vae", "model.conditions": ["side"]}, "takes no conditions"),
    ],
)
def test_settings_that_do_not_fit_an_autoencoder_or_latents_are_refused_in_one_line(overrides, message, prepared):
    with pytest.raises(KneegenError, match=message):
        build_network(load_config(None, {"data": str(prepared), **overrides}).model, (32, 32))


def test_a_moved_autoencoder_resumes_and_a_conditional_latent_model_draws_the_side_asked(latent_setup, tmp_path):
    data, autoencoder = latent_setup
    conditional = {**LATENT_MODEL, "conditions": ["side"]}
    cfg = tiny_config(data, tmp_path, model=conditional, train={"lr": 2e-3, "epochs": 1})
    cfg.model.autoencoder = str(autoencoder)
    run_training(cfg, tmp_path / "run")
    moved = tmp_path / "moved.pt"
    shutil.copy(autoencoder, moved)
    cfg.model.autoencoder, cfg.train.epochs = str(moved), 2
    assert run_training(cfg, tmp_path / "run", resume=True).epoch == 2

    result = invoke(
        "sample",
        "generate",
        2,
        "--checkpoint",
        tmp_path / "run" / "last.pt",
        "--side",
        "left",
        "--out",
        tmp_path / "left",
    )
    assert result.exit_code == 0, result.output
    assert '"side": "left"' in (tmp_path / "left" / "000000.json").read_text()
    assert np.asarray(Image.open(tmp_path / "left" / "000001.png")).shape == (32, 32)


def test_a_conditional_latent_model_distils_into_a_student_that_still_draws_the_side_asked(latent_setup, tmp_path):
    data, autoencoder = latent_setup
    cfg = tiny_config(data, tmp_path, model={**LATENT_MODEL, "conditions": ["side"]}, train={"epochs": 2})
    cfg.model.autoencoder = str(autoencoder)
    run_training(cfg, tmp_path / "teacher")
    student = tmp_path / "student"
    distilled = invoke("distill", tmp_path / "teacher", "--steps", 2, "--teacher-steps", 4, "--run-dir", student)
    assert distilled.exit_code == 0, distilled.output
    result = invoke(
        "sample", "generate", 2, "--checkpoint", student / "last.pt", "--side", "right", "--out", tmp_path / "s"
    )
    assert result.exit_code == 0, result.output
    assert "distilled, 2 steps" in result.output and '"side": "right"' in (tmp_path / "s" / "000000.json").read_text()
    assert np.asarray(Image.open(tmp_path / "s" / "000001.png")).shape == (32, 32)  # decoded, not latents


MID_EPOCH = {"batch_size": 4, "epochs": 2, "checkpoint_every_steps": 3, "keep_checkpoints": 3, "lr": 2e-3}
MACHINE_KEYS = ("seconds", "images_per_s", "peak_memory_mb")


def losses(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in MACHINE_KEYS} for r in read_metrics(run_dir / "metrics.jsonl")]


def resumed_mid_epoch_equals_straight(cfg, tmp_path: Path) -> None:
    """Train `cfg` twice; cut the second back to its oldest kept step checkpoint (mid-epoch 2:
    13 steps an epoch) and resume it: the metrics must equal the straight run's."""
    run_training(cfg, tmp_path / "straight")
    run_training(cfg, tmp_path / "cut")
    oldest, *newer = step_checkpoints(tmp_path / "cut")
    for path in [tmp_path / "cut" / "last.pt", tmp_path / "cut" / "best.pt", *newer]:
        path.unlink()
    assert load_checkpoint(oldest)["batch_in_epoch"] not in (0, 13)
    run_training(cfg, tmp_path / "cut", resume=True)
    assert losses(tmp_path / "cut") == losses(tmp_path / "straight")


@pytest.mark.slow
def test_an_autoencoder_resumed_mid_epoch_draws_the_same_crops_and_noise(latent_setup, tmp_path):
    data, _ = latent_setup
    cfg = tiny_config(data, tmp_path, train=MID_EPOCH)
    cfg.model = load_config(None, {"model.arch": "vae", "model.vae": VAE}).model
    resumed_mid_epoch_equals_straight(cfg, tmp_path)


@pytest.mark.slow
def test_a_latent_run_resumed_mid_epoch_continues_exactly(latent_setup, tmp_path):
    data, autoencoder = latent_setup
    resumed_mid_epoch_equals_straight(latent_config(data, autoencoder, tmp_path, **MID_EPOCH), tmp_path)


def test_a_pixel_run_cannot_resume_as_a_latent_one_nor_the_reverse(latent_setup, tmp_path):
    data, autoencoder = latent_setup
    pixel = tiny_config(data, tmp_path, model=LATENT_MODEL, train={"epochs": 1})
    run_training(pixel, tmp_path / "pixel")
    with pytest.raises(KneegenError, match="model.autoencoder differ"):
        run_training(latent_config(data, autoencoder, tmp_path, epochs=2), tmp_path / "pixel", resume=True)
    run_training(latent_config(data, autoencoder, tmp_path, epochs=1), tmp_path / "latent")
    pixel.train.epochs = 2
    with pytest.raises(KneegenError, match="model.autoencoder differ"):
        run_training(pixel, tmp_path / "latent", resume=True)


def test_data_prepared_again_is_encoded_again_and_sizes_off_the_factor_are_refused(
    latent_setup, phantom_src, tmp_path, monkeypatch
):
    _, autoencoder = latent_setup
    data = tmp_path / "data"
    prepare_folder(phantom_src, data, prepare_options())
    space = load_latent_space(autoencoder, COMPUTE, "test")
    encodings = []
    write = latent_cache.write_latents
    monkeypatch.setattr(latent_cache, "write_latents", lambda *args: encodings.append(write(*args)))
    open_latents(open_cache(data), space, COMPUTE)
    open_latents(open_cache(data), space, COMPUTE)
    assert len(encodings) == 1
    prepare_folder(phantom_src, data, prepare_options(seed=1), overwrite=True)
    open_latents(open_cache(data), space, COMPUTE)
    assert len(encodings) == 2 and len(list(data.glob("latents-*"))) == 1

    odd = tmp_path / "odd"
    prepare_folder(phantom_src, odd, prepare_options(size=(30, 32)))
    with pytest.raises(KneegenError, match="do not fit latent diffusion .* prepare the data with --size 32x32"):
        run_training(latent_config(odd, autoencoder, tmp_path), tmp_path / "odd-run")
    assert not (tmp_path / "odd-run").exists() and not list(odd.glob("latents-*"))


def test_an_autoencoder_checkpoint_from_before_the_channel_norm_loads_with_groupnorm(latent_setup, tmp_path):
    """Format 2 checkpoints record no model.vae.norm: their autoencoders had GroupNorm, and must
    keep it although the default is now the channel norm (the parameters have the same shapes)."""
    _, autoencoder = latent_setup
    payload = load_checkpoint(autoencoder)
    assert payload["config"]["model"]["vae"]["norm"] == "channel"
    old = copy.deepcopy(payload)
    del old["config"]["model"]["vae"]["norm"]
    torch.save({**old, "format_version": 2}, tmp_path / "old.pt")
    space = load_latent_space(tmp_path / "old.pt", COMPUTE, "test")
    norms = [module for module in space.autoencoder.modules() if isinstance(module, (ChannelNorm, torch.nn.GroupNorm))]
    assert norms and all(isinstance(module, torch.nn.GroupNorm) for module in norms)
    current = load_latent_space(autoencoder, COMPUTE, "test")
    assert not any(isinstance(module, torch.nn.GroupNorm) for module in current.autoencoder.modules())
