"""Autoguidance: a run keeps its own less-trained weights as a guide (train.guide_at), and sampling
steps away from them (sample.autoguidance), Karras et al. 2024."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn
from typer.testing import CliRunner

from kneegen.cli import build_app
from kneegen.config import TrainConfig, config_from_mapping, load_config
from kneegen.distill_request import distillation_config
from kneegen.engine.checkpoint import load_checkpoint
from kneegen.engine.denoiser import make_denoiser
from kneegen.engine.device import Compute
from kneegen.engine.distillation import start_distillation, two_step_target
from kneegen.engine.network import build_network
from kneegen.engine.samplers import trailing_timesteps
from kneegen.engine.schedule import Schedule
from kneegen.engine.trained import load_trained_model
from kneegen.errors import KneegenError
from kneegen.evaluation.evaluate import ValidateRequest
from kneegen.sampling import choose_sampler
from kneegen.training_run import run_progress, run_training

from helpers import tiny_config, tiny_run_dict

CPU = torch.device("cpu")
FP32 = Compute(CPU, None)
GUIDED = {"guide_at": 0.5, "keep_checkpoints": 10}


class Constant(nn.Module):
    """A network that answers `value` everywhere and counts its calls."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value, self.calls = value, 0

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        return torch.full_like(x, self.value)


def test_autoguided_output_steps_from_the_guide_by_w():
    schedule, x_t, t = Schedule("cosine", 1000), torch.randn(2, 1, 4, 4), torch.tensor([500, 900])
    main, guide = Constant(0.3), Constant(-0.1)
    guided = make_denoiser(main, schedule, "v", FP32, guide=guide, autoguidance=2.5, clip=False)(x_t, t)
    expected = schedule.to_x0_eps(torch.full_like(x_t, -0.1 + 2.5 * (0.3 + 0.1)), x_t, t, "v")
    torch.testing.assert_close(guided, expected)

    plain = make_denoiser(main, schedule, "v", FP32, guide=guide, autoguidance=1.0, clip=False)(x_t, t)
    torch.testing.assert_close(plain, schedule.to_x0_eps(torch.full_like(x_t, 0.3), x_t, t, "v"))
    assert guide.calls == 1  # w = 1 never asks the guide


def test_autoguidance_acts_only_at_noise_levels_up_to_its_sigma_max():
    schedule, x_t = Schedule("cosine", 1000), torch.randn(2, 1, 4, 4)
    low, high = 100, 900
    sigma = lambda t: schedule.snr(torch.tensor(t)).rsqrt().item()  # noqa: E731
    assert sigma(low) < 1.0 < sigma(high)
    main, guide = Constant(0.3), Constant(-0.1)
    denoise = make_denoiser(
        main, schedule, "v", FP32, guide=guide, autoguidance=2.0, autoguidance_sigma_max=1.0, clip=False
    )
    t = torch.tensor([low, high])
    expected = torch.cat([torch.full_like(x_t[:1], -0.1 + 2.0 * 0.4), torch.full_like(x_t[1:], 0.3)])
    torch.testing.assert_close(denoise(x_t, t), schedule.to_x0_eps(expected, x_t, t, "v"))

    guide.calls = 0
    above = torch.tensor([high, high])
    torch.testing.assert_close(denoise(x_t, above), schedule.to_x0_eps(torch.full_like(x_t, 0.3), x_t, above, "v"))
    assert guide.calls == 0  # above the interval the guide is not asked: one network call per step


@pytest.fixture(scope="module")
def guided_run(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, 2 epochs, keeping its guide halfway and every epoch's checkpoint."""
    work = tmp_path_factory.mktemp("guided")
    cfg = tiny_config(prepared, work, train=GUIDED, sample={"autoguidance": 2.0})
    run_training(cfg, work / "run", resume=False)
    return work / "run"


def test_the_guide_is_the_ema_as_it_was_when_guide_at_of_the_run_was_done(guided_run):
    first_epoch = min((guided_run / "checkpoints").glob("step-*.pt"))
    halfway, last = load_checkpoint(first_epoch), load_checkpoint(guided_run / "last.pt")
    assert halfway["epoch"] == 1 and halfway["guide"] is not None
    for name, weights in last["guide"].items():
        torch.testing.assert_close(weights, halfway["ema"][name], rtol=0, atol=0)
    assert any(not torch.equal(last["ema"][name], weights) for name, weights in last["guide"].items())


def test_a_run_keeps_no_guide_before_guide_at_nor_at_its_end(prepared, tmp_path):
    cfg = tiny_config(prepared, tmp_path, train={"epochs": 2, "guide_at": 0.9})
    run_training(cfg, tmp_path / "run", resume=False)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["guide"] is None
    model = load_trained_model(tmp_path / "run" / "last.pt", FP32)
    assert model.guide is None and choose_sampler(model, None, None, None).autoguidance == 1.0


def test_a_resumed_run_keeps_its_guide(guided_run, tmp_path):
    cfg = load_config(guided_run / "config.yaml", {"train.epochs": 3})
    run_training(cfg, guided_run, resume=True)
    before = load_checkpoint(min((guided_run / "checkpoints").glob("step-*.pt")))
    after = load_checkpoint(guided_run / "last.pt")
    assert after["epoch"] == 3
    for name, weights in after["guide"].items():
        torch.testing.assert_close(weights, before["guide"][name], rtol=0, atol=0)


def test_sampling_takes_the_runs_autoguidance_and_the_flag(guided_run):
    model = load_trained_model(guided_run / "last.pt", FP32)
    assert model.guide is not None
    assert choose_sampler(model, None, None, None).autoguidance == 2.0
    assert choose_sampler(model, None, None, None, autoguidance=3.0).autoguidance == 3.0
    assert "autoguidance 3" in choose_sampler(model, None, None, None, autoguidance=3.0).describe()
    with pytest.raises(KneegenError, match="--autoguidance 0.5"):
        choose_sampler(model, None, None, None, autoguidance=0.5)
    assert choose_sampler(model, None, None, None).autoguidance_sigma_max == 1.0  # the key's default
    wider = choose_sampler(model, None, None, None, autoguidance_sigma_max=float("inf"))
    assert wider.autoguidance_sigma_max == float("inf") and "σ ≤" not in wider.describe()
    assert "autoguidance 2 at σ ≤ 0.5" in choose_sampler(model, None, None, None, autoguidance_sigma_max=0.5).describe()
    with pytest.raises(KneegenError, match="--autoguidance-sigma-max 0"):
        choose_sampler(model, None, None, None, autoguidance_sigma_max=0.0)


def test_validate_scores_with_the_asked_autoguidance_else_the_runs(guided_run):
    model = load_trained_model(guided_run / "last.pt", FP32)
    asked = ValidateRequest([guided_run / "last.pt"], None, 8, None, None, 0, None, None, 1.5, 0.5)
    assert (asked.sampler_of(model).autoguidance, asked.sampler_of(model).autoguidance_sigma_max) == (1.5, 0.5)
    own = ValidateRequest([guided_run / "last.pt"], None, 8, None, None, 0, None)
    assert (own.sampler_of(model).autoguidance, own.sampler_of(model).autoguidance_sigma_max) == (2.0, 1.0)


def test_sample_writes_the_autoguidance_it_used(guided_run, tmp_path):
    out = tmp_path / "samples"
    args = ["sample", "single", "--checkpoint", guided_run / "last.pt", "--out", out, "--device", "cpu"]
    result = CliRunner().invoke(build_app(), [str(a) for a in [*args, "--autoguidance", "1.5"]])
    assert result.exit_code == 0, result.output
    info = json.loads((out / "000000.json").read_text())
    assert info["autoguidance"] == "1.5" and info["autoguidance_sigma_max"] == "1"
    guided = load_image(out / "000000.png")
    result = CliRunner().invoke(build_app(), [str(a) for a in [*args, "--autoguidance", "1", "--overwrite"]])
    assert result.exit_code == 0, result.output
    assert (guided != load_image(out / "000000.png")).any()  # the guide changed the image
    every_step = [*args, "--autoguidance", "1.5", "--autoguidance-sigma-max", "inf", "--overwrite"]
    result = CliRunner().invoke(build_app(), [str(a) for a in every_step])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "000000.json").read_text())["autoguidance_sigma_max"] == "inf"
    assert (guided != load_image(out / "000000.png")).any()  # guided at high noise too: another image


def test_autoguidance_on_a_checkpoint_without_a_guide_is_one_clear_line(trained_run, tmp_path):
    args = ["sample", "single", "--checkpoint", trained_run / "last.pt", "--out", tmp_path, "--autoguidance", "2"]
    result = CliRunner().invoke(build_app(), [str(a) for a in args])
    assert result.exit_code != 0 and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "holds no guide" in lines[0] and "train.guide_at" in lines[0], result.output
    assert not list(tmp_path.glob("*.png"))


def test_guide_keys_out_of_range_are_refused(prepared, tmp_path):
    with pytest.raises(KneegenError, match="train.guide_at"):
        tiny_config(prepared, tmp_path, train={"guide_at": 1.0})
    with pytest.raises(KneegenError, match="sample.autoguidance"):
        tiny_config(prepared, tmp_path, sample={"autoguidance": 0.5})
    with pytest.raises(KneegenError, match="sample.autoguidance_sigma_max = 0.0 must be > 0"):
        tiny_config(prepared, tmp_path, sample={"autoguidance_sigma_max": 0})
    with pytest.raises(KneegenError, match="sample.autoguidance_sigma_max = nan is not a finite number"):
        tiny_config(prepared, tmp_path, sample={"autoguidance_sigma_max": "nan"})
    raw = tiny_run_dict(prepared, train={"guide_at": 0.3})
    raw["model"] = {"arch": "vae"}
    with pytest.raises(KneegenError, match="train.guide_at"):
        config_from_mapping(raw, "vae.yaml")


def test_a_student_learns_its_teachers_guided_steps_and_needs_no_guide(guided_run):
    cfg, origin = distillation_config(guided_run / "last.pt", {})
    assert cfg.distill.autoguidance == 2.0 and cfg.distill.autoguidance_sigma_max == 1.0
    assert "autoguided with w 2 at σ ≤ 1" in origin
    assert cfg.train.guide_at == 0.0 and cfg.sample.autoguidance == 1.0
    distillation, _ = start_distillation(build_network(cfg.model, (32, 32), 1), cfg, FP32)
    assert distillation.guide is not None

    torch.manual_seed(0)
    x_t, output = torch.randn(2, 1, 32, 32), 0.1 * torch.randn(2, 1, 32, 32)
    t = torch.tensor(trailing_timesteps(1000, distillation.student_steps)[-2:])  # σ ≤ 1: guided steps
    guided, _ = distillation.loss(output, x_t, t, None)
    teacher = make_denoiser(
        distillation.teacher,
        distillation.schedule,
        "v",
        FP32,
        guide=distillation.guide,
        autoguidance=2.0,
        autoguidance_sigma_max=1.0,
    )
    target = two_step_target(teacher, x_t, t, distillation.teacher_grid_after(t), distillation.schedule)
    x0, _ = distillation.schedule.to_x0_eps(output, x_t, t, "v")
    torch.testing.assert_close(guided, ((x0 - target) ** 2).flatten(1).mean(1))
    distillation.autoguidance = 1.0
    assert not torch.allclose(distillation.loss(output, x_t, t, None)[0], guided)


def test_guided_distillation_of_a_teacher_without_a_guide_is_refused(trained_run):
    cfg, _ = distillation_config(trained_run / "last.pt", {"distill.autoguidance": 2.0})
    with pytest.raises(KneegenError, match="holds no guide"):
        start_distillation(build_network(cfg.model, (32, 32), 1), cfg, FP32)


def load_image(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image).copy()


def test_run_progress_is_the_nearer_of_the_planned_steps_and_the_time_budget():
    state = SimpleNamespace(step=30, end_step=0)
    by_epochs = TrainConfig(epochs=10)
    assert run_progress(state, by_epochs, per_epoch=10, seconds=1e6) == pytest.approx(0.3)
    by_time = TrainConfig(epochs=100_000, minutes=2.0)
    assert run_progress(state, by_time, per_epoch=10, seconds=60.0) == pytest.approx(0.5)
    state.end_step = 40  # a cooldown's plan
    assert run_progress(state, by_time, per_epoch=10, seconds=6.0) == pytest.approx(0.75)
