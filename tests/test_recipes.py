"""The shipped recipes, chosen by the hardware; the training time budget; the CPU memory layout."""

from __future__ import annotations

import types

import pytest
import torch
from typer.testing import CliRunner

from kneegen import training_run
from kneegen.cli import build_app
from kneegen.config import load_config
from kneegen.data.cache import open_cache
from kneegen.engine.device import Compute
from kneegen.engine.network import build_network
from kneegen.engine.plugins import resolve_plugins
from kneegen.engine.training import with_noise_centre
from kneegen.errors import KneegenError
from kneegen.metrics_log import read_metrics
from kneegen.recipes import recipe_for, recipe_names, recipe_path
from kneegen.training_run import run_training

from helpers import tiny_config

DEMO_SIZE = (64, 64)


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_loads_and_builds_for_the_demo_size(name):
    cfg = load_config(recipe_path(name))
    build_network(cfg.model, DEMO_SIZE)


def test_the_recipe_follows_the_precision_the_cpu_computes_in():
    assert recipe_names() == ["cpu-bf16", "cpu-fp32"]
    assert recipe_for(Compute(torch.device("cpu"), torch.bfloat16))[0] == "cpu-bf16"
    assert recipe_for(Compute(torch.device("cpu"), None))[0] == "cpu-fp32"
    assert recipe_for(Compute(torch.device("cuda"), torch.bfloat16)) is None
    assert load_config(recipe_path("cpu-fp32")).precision == "fp32"


def test_channels_last_only_on_gpus():
    """On the CPU, GroupNorm on bf16 channels_last tensors is ~10× slower than contiguous."""
    assert Compute(torch.device("cpu"), torch.bfloat16).memory_format == torch.contiguous_format
    assert Compute(torch.device("cpu"), None).memory_format == torch.contiguous_format
    assert Compute(torch.device("cuda"), torch.bfloat16).memory_format == torch.channels_last


@pytest.mark.slow
def test_train_without_config_announces_the_recipe_for_this_cpu(prepared, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        build_app(),
        [
            "train",
            "--data",
            str(prepared),
            "--epochs",
            "1",
            "--precision",
            "fp32",
            "--set",
            "train.val_images=4",
            "--set",
            "train.val_timesteps=1",
            "--set",
            "train.batch_size=24",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "recipe cpu-fp32" in result.output
    (run,) = (tmp_path / "runs").iterdir()
    recipe = load_config(
        recipe_path("cpu-fp32"),
        {
            "data": str(prepared),
            "train.epochs": 1,
            "train.val_images": 4,
            "train.val_timesteps": 1,
            "train.batch_size": 24,
        },
    )
    measured, note = with_noise_centre(resolve_plugins(recipe, "recipe"), open_cache(prepared).split("train"))
    assert measured == load_config(run / "config.yaml")  # with the network's defaults and the data's noise centre
    assert " ".join(note.split()) in " ".join(result.output.split())  # as the console wrapped it


@pytest.mark.slow
def test_a_recipe_can_be_named_as_the_config(prepared, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        build_app(),
        [
            "train",
            "--config",
            "cpu-bf16",
            "--data",
            str(prepared),
            "--epochs",
            "1",
            "--precision",
            "fp32",
            "--set",
            "train.val_images=4",
            "--set",
            "train.val_timesteps=1",
            "--set",
            "train.batch_size=24",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "no --config" not in result.output
    (run,) = (tmp_path / "runs").iterdir()
    train_images = open_cache(prepared).split("train")
    assert (
        load_config(run / "config.yaml")
        == with_noise_centre(
            resolve_plugins(
                load_config(
                    recipe_path("cpu-bf16"),
                    {
                        "data": str(prepared),
                        "train.epochs": 1,
                        "precision": "fp32",
                        "train.val_images": 4,
                        "train.val_timesteps": 1,
                        "train.batch_size": 24,
                    },
                ),
                "recipe",
            ),
            train_images,
        )[0]
    )


@pytest.mark.slow
def test_a_time_budget_stops_at_an_epoch_end_and_resume_goes_on(prepared, tmp_path, monkeypatch):
    cfg = tiny_config(prepared, tmp_path, train={"epochs": 5, "minutes": 1.0})
    clock = FakeClock(monkeypatch)
    clock.step_seconds = 10.0  # a 4-step epoch lasts 40 s: the first ends at 40 s, a second would pass 60 s
    started = clock.now
    state = run_training(cfg, tmp_path / "run")
    assert state.epoch == 1 and state.batch_in_epoch == 0
    assert clock.now - started < 60
    assert [r["epoch"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "epoch" in r] == [1]
    resumed = run_training(cfg, tmp_path / "run", resume=True)
    assert resumed.epoch == 2


@pytest.mark.slow
def test_a_first_epoch_longer_than_the_budget_stops_amid_it_and_resume_goes_on(prepared, tmp_path, monkeypatch, capfd):
    cfg = tiny_config(prepared, tmp_path, train={"epochs": 5, "minutes": 1.0, "batch_size": 2})
    clock = FakeClock(monkeypatch)
    clock.step_seconds = 25.0  # past 60 s after the third step, long before the epoch's end
    state = run_training(cfg, tmp_path / "run")
    assert (state.epoch, state.batch_in_epoch, state.step) == (0, 3, 3)
    assert "3/3" in capfd.readouterr().err  # the bar ends where the run does, not at 3/125
    saved = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=False)
    assert (saved["epoch"], saved["batch_in_epoch"]) == (0, 3)
    assert not (tmp_path / "run" / "best.pt").exists()  # no validation yet: sampling takes last.pt
    assert not [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "epoch" in r]
    resumed = run_training(cfg, tmp_path / "run", resume=True)
    assert (resumed.step, resumed.batch_in_epoch) == (6, 6)  # the same epoch, three steps on


@pytest.mark.slow
def test_a_time_budget_sets_the_progress_bars_end(prepared, tmp_path, monkeypatch, capfd):
    cfg = tiny_config(prepared, tmp_path, train={"epochs": 100, "minutes": 1.0})
    clock = FakeClock(monkeypatch)
    clock.step_seconds = 2.0  # 8 s an epoch: after epoch 3, 4 more fit in the 36 s left
    state = run_training(cfg, tmp_path / "run")
    assert state.epoch == 7
    assert "28/28" in capfd.readouterr().err  # not 28/400, the steps of train.epochs


class FakeClock:
    """time.perf_counter as training sees it: each optimizer step takes `step_seconds`, so a time
    budget is tested on any machine's speed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now, self.step_seconds = 1000.0, 0.0
        monkeypatch.setattr(training_run, "time", types.SimpleNamespace(perf_counter=self.perf_counter))
        real_steps = training_run.epoch_steps

        def timed_steps(*args, **kwargs):
            for result in real_steps(*args, **kwargs):
                self.now += self.step_seconds
                yield result

        monkeypatch.setattr(training_run, "epoch_steps", timed_steps)

    def perf_counter(self) -> float:
        return self.now


def test_a_negative_time_budget_is_refused_by_name(prepared, tmp_path):
    with pytest.raises(KneegenError, match="train.minutes"):
        run_training(tiny_config(prepared, tmp_path, train={"minutes": -1.0}), tmp_path / "run")
