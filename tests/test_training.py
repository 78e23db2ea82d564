"""Training: a tiny model learns, validation is a function of the weights, checkpoints are
safe to load, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kneegen.config import TrainConfig, load_config
from kneegen.data.cache import open_cache
from kneegen.engine.checkpoint import FORMAT, FORMAT_VERSION, load_checkpoint, save_checkpoint
from kneegen.engine.device import Compute
from kneegen.engine.ema import EMA
from kneegen.engine.pixels import to_model_range, to_uint8
from kneegen.engine.posthoc_ema import PowerEMA
from kneegen.engine.schedule import Schedule
from kneegen.engine.trained import load_trained_model
from kneegen.engine.training import create_state, epoch_steps, learning_rate
from kneegen.engine.validation import bucket_timesteps, validation_loss
from kneegen.errors import KneegenError
from kneegen.metrics_log import epoch_records, read_metrics
from kneegen.training_run import run_training

from helpers import TINY_MODEL, tiny_config

CPU = Compute(torch.device("cpu"), None)


def run_validation(network, images, cfg, buckets=None, batch_size=None):
    schedule = Schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps)
    return validation_loss(
        network,
        images,
        schedule,
        cfg.diffusion,
        CPU,
        buckets or cfg.train.val_timesteps,
        batch_size or cfg.train.batch_size,
    )


# --- learning -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_model_learns_on_phantom_slices(prepared, tmp_path):
    cfg = tiny_config(prepared, tmp_path, train={"ema_decay": 0.0, "val_timesteps": 10})
    data = open_cache(prepared)
    train_images, val_images = data.split("train"), data.split("val")
    schedule = Schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps)
    state = create_state(cfg, data.image_shape, CPU)
    initial = run_validation(state.eval_network, val_images, cfg).loss
    assert 0.3 < initial < 1.5  # a zero-output network against v targets
    losses = []
    for _ in range(6):
        losses += [step.loss for step in epoch_steps(state, train_images, schedule, cfg, CPU)]
    final = run_validation(state.eval_network, val_images, cfg).loss
    assert state.epoch == 6 and state.step == 6 * math.ceil(len(train_images) / cfg.train.batch_size)
    assert all(math.isfinite(loss) for loss in losses)
    assert final < 0.8 * initial, f"validation loss {initial:.4f} → {final:.4f}"


def test_validation_loss_is_a_function_of_the_weights_alone(trained_run, prepared, tmp_path):
    model = load_trained_model(trained_run / "last.pt", CPU)
    val_images = open_cache(prepared).split("val")
    first = run_validation(model.network, val_images, model.config)
    second = run_validation(model.network, val_images, model.config)
    assert first.loss == second.loss
    assert first.bucket_losses == second.bucket_losses
    assert first.bucket_timesteps == bucket_timesteps(1000, model.config.train.val_timesteps) == [125, 375, 625, 875]
    assert first.loss == pytest.approx(sum(first.bucket_losses) / len(first.bucket_losses), rel=1e-12)
    # Batching does not change the number beyond rounding.
    rebatched = run_validation(model.network, val_images, model.config, batch_size=3)
    assert rebatched.loss == pytest.approx(first.loss, rel=1e-5)
    # Other weights give another number.
    fresh = create_state(model.config, model.image_shape, CPU).network
    assert run_validation(fresh, val_images, model.config).loss != first.loss


def test_validation_restores_the_training_mode(prepared, tmp_path):
    cfg = tiny_config(prepared, tmp_path)
    network = create_state(cfg, (32, 32), CPU).network.train()
    run_validation(network, open_cache(prepared).split("val")[:2], cfg)
    assert network.training


def test_bucket_timesteps_are_slice_centres():
    assert bucket_timesteps(1000, 10) == [50, 150, 250, 350, 450, 550, 650, 750, 850, 950]
    assert bucket_timesteps(1000, 1) == [500]


# --- small pieces ------------------------------------------------------------------------------


def test_pixels_map_to_minus_one_one_and_back():
    pixels = np.array([[[0, 1, 127, 128, 254, 255]]], dtype=np.uint8)
    model = to_model_range(pixels, torch.device("cpu"))
    assert model.shape == (1, 1, 1, 6) and model.dtype == torch.float32
    assert model[0, 0, 0, 0].item() == -1.0 and model[0, 0, 0, -1].item() == 1.0
    np.testing.assert_array_equal(to_uint8(model), pixels)
    sixteen = np.array([[[0, 65535]]], dtype=np.uint16)
    assert to_model_range(sixteen, torch.device("cpu")).flatten().tolist() == [-1.0, 1.0]


def test_pixels_land_on_the_requested_device():
    """Training and validation put x0 on the compute device via to_model_range."""
    images = to_model_range(np.zeros((2, 4, 4), dtype=np.uint8), torch.device("meta"))
    assert images.device.type == "meta"
    assert images.dtype == torch.float32


def test_learning_rate_warms_up_linearly_then_stays():
    cfg = TrainConfig(lr=1e-3, warmup_steps=4)
    assert [learning_rate(cfg, s, 100) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert learning_rate(TrainConfig(lr=1e-3, warmup_steps=0), 0, 100) == 1e-3


def test_ema_follows_the_warmed_up_decay():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.5)
    expected = 0.0
    for step, value in enumerate([1.0, 2.0, 4.0, 8.0], start=1):  # steps done
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model, step)
        decay = min(0.5, step / (9 + step))
        expected = decay * expected + (1 - decay) * value
        assert ema.model.weight.item() == pytest.approx(expected, rel=1e-6)
    assert not ema.model.weight.requires_grad


def test_ema_length_makes_the_training_ema_a_power_function_one():
    cfg = load_config(None, {"model.unet.channels": 8, "train.ema_length": 0.05})
    state = create_state(cfg, (16, 16), CPU)
    assert isinstance(state.ema, PowerEMA) and state.ema.sigma_rel == 0.05
    assert isinstance(create_state(load_config(None, {"model.unet.channels": 8}), (16, 16), CPU).ema, EMA)


# --- checkpoints ----------------------------------------------------------------------------------


def test_checkpoint_loads_with_weights_only(trained_run):
    payload = torch.load(trained_run / "last.pt", map_location="cpu", weights_only=True)
    assert payload["format"] == FORMAT and payload["format_version"] == FORMAT_VERSION
    assert payload["epoch"] == 2 and payload["step"] == 2 * 4
    assert payload["image_shape"] == [32, 32]
    assert payload["config"]["model"]["unet"]["channels"] == 16
    assert set(payload["model"]) == set(payload["ema"])
    assert load_checkpoint(trained_run / "last.pt")["epoch"] == 2
    assert (trained_run / "best.pt").is_file()
    assert not list(trained_run.glob(".*.tmp"))  # the atomic write left no temporary file


def test_save_checkpoint_writes_a_loadable_dict(tmp_path):
    path = tmp_path / "x.pt"
    save_checkpoint({"weights": torch.arange(3.0), "epoch": 5}, path, then="retry")
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == FORMAT and payload["epoch"] == 5
    assert torch.equal(payload["weights"], torch.arange(3.0))
    save_checkpoint({"epoch": 6}, path, then="retry")  # replaces atomically
    assert load_checkpoint(path)["epoch"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pt"]


@pytest.mark.parametrize(
    "content",
    [b"", b"hello world", b"abc", b"not a checkpoint\n", b"PK\x03\x04" + bytes(60), b"\x89PNG\r\n\x1a\n" + bytes(40)],
    ids=["empty", "hello-world", "abc", "text-line", "broken-zip", "png-header"],
)
def test_load_checkpoint_refuses_files_that_are_not_checkpoints(tmp_path, content):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(KneegenError, match="model.pt"):
        load_checkpoint(path)


def test_load_checkpoint_refuses_random_bytes(tmp_path):
    path = tmp_path / "random.pt"
    failures = []
    for seed in range(40):
        path.write_bytes(np.random.default_rng(seed).bytes(64))
        try:
            load_checkpoint(path)
            failures.append((seed, "loaded"))
        except KneegenError:
            pass
        except Exception as exc:  # anything else reaches the user as a traceback
            failures.append((seed, repr(exc)))
    assert failures == []


@pytest.mark.parametrize(
    "payload",
    [{"model": {}, "epoch": 3}, {"format": "something-else"}, [1, 2, 3], torch.zeros(2)],
    ids=["no-format-key", "other-format", "list", "tensor"],
)
def test_load_checkpoint_refuses_torch_files_without_the_format(tmp_path, payload):
    path = tmp_path / "other.pt"
    torch.save(payload, path)
    with pytest.raises(KneegenError, match="not a kneegen checkpoint"):
        load_checkpoint(path)


def test_load_checkpoint_names_a_missing_file_and_a_newer_format(tmp_path):
    with pytest.raises(KneegenError, match="gone.pt not found"):
        load_checkpoint(tmp_path / "gone.pt")
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION + 1}, tmp_path / "future.pt")
    with pytest.raises(KneegenError, match="upgrade kneegen"):
        load_checkpoint(tmp_path / "future.pt")


def test_trained_model_loads_the_ema_weights(trained_run):
    payload = load_checkpoint(trained_run / "last.pt")
    model = load_trained_model(trained_run / "last.pt", CPU)
    assert model.epoch == 2 and model.image_shape == (32, 32)
    for name, tensor in model.network.state_dict().items():
        assert torch.equal(tensor, payload["ema"][name])
    assert any(not torch.equal(payload["ema"][k], payload["model"][k]) for k in payload["model"])
    assert not model.network.training


# --- runs on disk ---------------------------------------------------------------------------------


def losses_of(run_dir: Path) -> list[tuple[int, list[float], float | None]]:
    records = epoch_records(read_metrics(run_dir / "metrics.jsonl"))
    return [(r["epoch"], r["train_losses"], r["val_loss"]) for r in records]


@pytest.mark.slow
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
def test_resumed_run_equals_an_uninterrupted_one(prepared, tmp_path, dropout):
    model = {"unet": {**TINY_MODEL["unet"], "dropout": dropout}}
    straight = tmp_path / "straight"
    run_training(tiny_config(prepared, tmp_path, model=model, train={"epochs": 4}), straight, resume=False)

    resumed = tmp_path / "resumed"
    run_training(tiny_config(prepared, tmp_path, model=model, train={"epochs": 2}), resumed, resume=False)
    assert [epoch for epoch, _, _ in losses_of(resumed)] == [1, 2]
    run_training(tiny_config(prepared, tmp_path, model=model, train={"epochs": 4}), resumed, resume=True)

    expected, got = losses_of(straight), losses_of(resumed)
    assert [e for e, _, _ in got] == [1, 2, 3, 4]
    assert got == expected  # train_losses and val_loss, exactly
    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(resumed / "last.pt", weights_only=True)
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


@pytest.mark.slow
def test_resume_drops_metrics_written_after_the_checkpoint(prepared, tmp_path):
    run_dir = tmp_path / "run"
    run_training(tiny_config(prepared, tmp_path, train={"epochs": 1}), run_dir, resume=False)
    reference = losses_of(run_dir)
    with (run_dir / "metrics.jsonl").open("a") as handle:  # an epoch 2 that crashed before its checkpoint
        handle.write(json.dumps({"epoch": 2, "train_losses": [9.0], "val_loss": 9.0, "train_loss": 9.0}) + "\n")
    run_training(tiny_config(prepared, tmp_path, train={"epochs": 2}), run_dir, resume=True)
    got = losses_of(run_dir)
    assert [e for e, _, _ in got] == [1, 2]
    assert got[0] == reference[0] and got[1][2] != 9.0


def test_resume_refuses_a_changed_network(trained_run, prepared, tmp_path):
    before = (trained_run / "last.pt").read_bytes()
    cfg = tiny_config(prepared, tmp_path, model={"unet": {**TINY_MODEL["unet"], "channels": 8}}, train={"epochs": 3})
    with pytest.raises(KneegenError, match=r"model\.unet\.channels differ"):
        run_training(cfg, trained_run, resume=True)
    with pytest.raises(KneegenError, match="already has 2 epochs"):
        run_training(tiny_config(prepared, tmp_path, train={"epochs": 2}), trained_run, resume=True)
    assert (trained_run / "last.pt").read_bytes() == before


def test_existing_run_dir_is_not_reused_without_resume(trained_run, prepared, tmp_path):
    files = {p.name: p.read_bytes() for p in trained_run.iterdir() if p.is_file()}
    with pytest.raises(KneegenError, match="--resume"):
        run_training(tiny_config(prepared, tmp_path), trained_run, resume=False)
    assert {p.name: p.read_bytes() for p in trained_run.iterdir() if p.is_file()} == files


def test_resume_of_a_folder_without_checkpoint_or_config_is_refused(prepared, tmp_path):
    with pytest.raises(KneegenError, match="neither a checkpoint nor a config.yaml"):
        run_training(tiny_config(prepared, tmp_path), tmp_path / "never", resume=True)
    assert not (tmp_path / "never").exists()


def test_run_dir_holds_config_metrics_plots_and_checkpoints(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {
        "config.yaml",
        "metrics.jsonl",
        "last.pt",
        "best.pt",
        "loss_train.png",
        "loss_val.png",
        "loss_overlay.png",
    } <= names
    records = read_metrics(trained_run / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    assert [r["step"] for r in records] == [4, 8]
    assert all(len(r["train_losses"]) == 4 for r in records)
    assert all(r["train_loss"] == pytest.approx(sum(r["train_losses"]) / 4) for r in records)
    assert best_epoch_matches(trained_run, records)


def best_epoch_matches(run_dir: Path, records: list[dict]) -> bool:
    best = min(records, key=lambda r: r["val_loss"])
    return torch.load(run_dir / "best.pt", weights_only=True)["epoch"] == best["epoch"]
