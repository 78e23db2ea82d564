"""Consistency distillation (`kneegen distill --method consistency`): its target checked against
the project's DDIM step and the student itself, the multistep consistency sampler in closed form,
a loss that pulls the student towards consistency, and the command end to end: a student that
samples in any number of steps by default and cannot be distilled further."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kneegen.distill_request import distillation_config
from kneegen.engine.checkpoint import load_checkpoint
from kneegen.engine.device import resolve_compute
from kneegen.engine.distillation import CLEAN, one_step_consistency_target
from kneegen.engine.samplers import ImageNoise, consistency, ddim, get_sampler, timesteps_for
from kneegen.engine.schedule import Schedule

from helpers import invoke, one_line_error
from test_distillation import distil_in_workspace, fit_one_batch, smooth_denoiser

COMPUTE = resolve_compute("cpu", "fp32")
CPU = torch.device("cpu")


def other_denoiser(schedule: Schedule):
    """A second fixed 'network', unlike `smooth_denoiser`, to stand for the student."""

    def denoise(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = torch.sin(x) * (1 - t.double().view(-1, 1, 1, 1) / 2000).to(x)
        alpha, sigma = schedule.alpha_sigma(t, x)
        return x0, (x - alpha * x0) / sigma

    return denoise


def test_the_target_is_the_students_x0_where_the_teachers_ddim_step_lands_and_the_teachers_at_the_clean_end():
    schedule = Schedule("cosine", 1000)
    teacher, student = smooth_denoiser(schedule), other_denoiser(schedule)
    x_t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t, following = torch.tensor([999, 499, 249]), torch.tensor([749, 249, CLEAN])
    target = one_step_consistency_target(teacher, student, x_t, t, following, schedule)
    for i in range(2):  # the project's DDIM sampler, η = 0, stopped where it reaches s
        landed: dict[int, torch.Tensor] = {}
        ddim(
            teacher,
            x_t[i : i + 1],
            [int(t[i]), int(following[i])],
            schedule,
            ImageNoise([0], CPU),
            on_step=lambda k, x, x0, landed=landed: landed.setdefault(k, x),
        )
        expected, _ = student(landed[1], following[i : i + 1])
        assert torch.allclose(target[i : i + 1], expected, atol=1e-12)
    assert torch.allclose(target[2:], teacher(x_t[2:], t[2:])[0], atol=1e-12)  # f(x, 0) = x at the clean end


def test_the_consistency_sampler_renoises_each_x0_afresh_to_the_next_level():
    schedule, grid, seeds = Schedule("cosine", 1000), [999, 749, 499, 249], [3, 4]
    image = torch.linspace(-0.5, 0.5, 64).view(1, 1, 8, 8).repeat(2, 1, 1, 1)
    asked = []

    def constant(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        asked.append((x.clone(), int(t[0])))
        alpha, sigma = schedule.alpha_sigma(t, x)
        return image, (x - alpha * image) / sigma

    x_T = torch.randn(2, 1, 8, 8)
    out = consistency(constant, x_T, grid, schedule, ImageNoise(seeds, CPU))
    assert torch.equal(out, image) and [t for _, t in asked] == grid
    noise = ImageNoise(seeds, CPU)  # the same draws, in order: one per step after the first
    for x, t in asked[1:]:
        alpha, sigma = schedule.alpha_sigma(torch.tensor([t, t]), x)
        assert torch.allclose(x, alpha * image + sigma * noise.randn((1, 8, 8)), atol=1e-6)
    assert torch.equal(consistency(constant, x_T, [999], schedule, ImageNoise(seeds, CPU)), image)  # one step
    assert timesteps_for("consistency", schedule, 4, "logsnr") == grid  # the grid it learnt on
    assert get_sampler("consistency").func is consistency  # type: ignore[attr-defined]


def test_the_consistency_loss_pulls_the_student_towards_its_own_next_step(trained_run):
    cfg, origin = distillation_config(
        trained_run / "best.pt", {"distill.steps": 2, "distill.teacher_steps": 8, "distill.method": "consistency"}
    )
    assert "consistency distillation along the teacher's 8 DDIM steps" in " ".join(origin.split())
    distillation, t, weight, history = fit_one_batch(cfg, trained_run / "best.pt", 40)
    assert distillation.rounds == 1 and distillation.student_steps == 2
    assert set(t.tolist()) <= {999, 874, 749, 624, 499, 374, 249, 124} and torch.equal(weight, distillation.weight(t))
    assert history[-1] < 0.8 * history[0], history  # the target moves with the student: a slower fall


@pytest.fixture(scope="module")
def consistent(tmp_path_factory) -> Path:
    """A workspace where a tiny teacher trained, then `kneegen distill --method consistency --steps 2`."""
    root = tmp_path_factory.mktemp("consistency")
    distil_in_workspace(root, "--method", "consistency", "--steps", 2, "--run-dir", "runs/student")
    return root


def test_a_consistency_student_samples_in_any_number_of_steps_by_default(consistent, monkeypatch):
    monkeypatch.chdir(consistent)
    payload = load_checkpoint(consistent / "runs" / "student" / "last.pt")
    assert payload["distillation"]["method"] == "consistency" and payload["distillation"]["steps"] == 2
    student = consistent / "runs" / "student" / "last.pt"
    for steps, shown in ((None, "consistency, 2 steps"), (1, "consistency, 1 steps"), (3, "consistency, 3 steps")):
        flags = ["--steps", steps] if steps else []
        result = invoke("sample", "generate", 2, "--checkpoint", student, *flags, "--out", f"s{steps}")
        assert result.exit_code == 0, result.output
        assert shown in result.output and len(list((consistent / f"s{steps}").glob("0*.png"))) == 2
    validated = invoke("validate", student, "--samples", 8)
    assert validated.exit_code == 0 and "consistency, 2 steps" in validated.output, validated.output


def test_a_consistency_student_is_not_distilled_further(consistent, monkeypatch):
    monkeypatch.chdir(consistent)
    one_line_error(invoke("distill", "runs/student/last.pt", "--steps", 1), "consistency student", "--steps N")
    assert sorted(p.name for p in (consistent / "runs").iterdir()) == ["student", "teacher"]
