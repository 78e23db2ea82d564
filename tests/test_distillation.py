"""Progressive distillation (`kneegen distill`): the maths of one round checked against the DDIM
sampler itself, a student that learns its teacher's two steps, the command end to end (the student
samples with its own step count by default and refuses others), exact resume across a round's
end, and the settings a distillation cannot take."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import Result

from kneegen.config import RunConfig, load_config, to_dict
from kneegen.data.cache import open_cache
from kneegen.distill_request import distillation_config, further_steps
from kneegen.engine.checkpoint import load_checkpoint
from kneegen.engine.device import resolve_compute
from kneegen.engine.distillation import CLEAN, Distillation, halvings, start_distillation, two_step_target
from kneegen.engine.samplers import ImageNoise, ddim, dpm_solver_pp, get_sampler, timesteps_for, trailing_timesteps
from kneegen.engine.schedule import Schedule
from kneegen.engine.trained import load_trained_model
from kneegen.engine.validation import distillation_validation
from kneegen.errors import KneegenError
from kneegen.runs import step_checkpoints
from kneegen.training_run import run_training

from helpers import invoke, one_line_error, tiny_run_dict
from test_training_resume import keep_checkpoints_up_to, losses, train_with_torchrun

COMPUTE = resolve_compute("cpu", "fp32")


# --- the maths of a round ------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 16])
def test_a_students_grid_is_every_second_point_of_its_teachers(steps):
    grid, teacher = trailing_timesteps(1000, steps), trailing_timesteps(1000, 2 * steps)
    assert grid == teacher[::2] and len(grid) == steps and len(set(teacher)) == 2 * steps
    assert grid[0] == 999 and all(0 <= t <= 999 for t in teacher)
    assert trailing_timesteps(1000, 4) == [999, 749, 499, 249]  # t_i = T(N − i)/N − 1


def test_the_trailing_grid_is_any_samplers_to_ask_and_the_distilled_samplers_whatever_is_asked():
    schedule, trailing = Schedule("cosine", 1000), [999, 749, 499, 249]
    assert timesteps_for("ddim", schedule, 4, "trailing") == trailing
    assert timesteps_for("ddim", schedule, 4, "uniform")[-1] == 0  # the uniform grid spends a step at t = 0
    assert timesteps_for("distilled", schedule, 4, "logsnr") == timesteps_for("distilled", schedule, 4) == trailing


def smooth_denoiser(schedule: Schedule):
    """A fixed, nonlinear 'network': x̂_0 depends on x and t; ε̂ follows from x̂_0 as a sampler's would."""

    def denoise(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = torch.tanh(0.8 * x + t.double().view(-1, 1, 1, 1) / 700).to(x)
        alpha, sigma = schedule.alpha_sigma(t, x)
        return x0, (x - alpha * x0) / sigma

    return denoise


@pytest.mark.parametrize("t, middle, following", [(999, 874, 749), (499, 374, 249), (249, 124, CLEAN)])
@pytest.mark.parametrize("solver", ["ddim", "dpm++2m"])
def test_one_ddim_step_to_the_two_step_target_lands_where_the_teachers_two_steps_land(t, middle, following, solver):
    """The teacher's two steps are the project's own sampler's: DDIM, or DPM-Solver++(2M), whose
    second step adds its multistep term."""
    schedule = Schedule("cosine", 1000)
    teacher = smooth_denoiser(schedule)
    x_t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    column = torch.full((3,), t)
    grid_after = (torch.full((3,), middle), torch.full((3,), following))
    target = two_step_target(teacher, x_t, column, grid_after, schedule, second_order=solver == "dpm++2m")

    def landing(denoise, timesteps: list[int], sampler=ddim) -> torch.Tensor:
        """Where `sampler` from x_t over `timesteps` lands at `following`."""
        if following == CLEAN:
            return sampler(
                denoise, x_t, timesteps, schedule, ImageNoise([0], torch.device("cpu"))
            )  # its last step goes to clean
        seen: list[torch.Tensor] = []
        sampler(
            denoise,
            x_t,
            [*timesteps, following],
            schedule,
            ImageNoise([0], torch.device("cpu")),
            lambda i, x, _: seen.append(x),
        )
        return seen[len(timesteps)]  # x when the network is called at `following`

    def student(x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha, sigma = schedule.alpha_sigma(s, x)
        return target, (x - alpha * target) / sigma

    two_steps = landing(teacher, [t, middle], ddim if solver == "ddim" else dpm_solver_pp)
    one_step = landing(student, [t])
    assert torch.allclose(one_step, two_steps, atol=1e-9)
    if following != CLEAN:  # the multistep term changes the landing (at the clean end both return x̂_0)
        other = landing(teacher, [t, middle], dpm_solver_pp if solver == "ddim" else ddim)
        assert not torch.allclose(one_step, other, atol=1e-4)
    assert not torch.allclose(teacher(x_t, column)[0], target, atol=1e-3)  # the target is no single-step x̂_0


def test_the_second_order_target_of_a_mixed_batch_is_each_images_own():
    """Training draws a t per image: the multistep term takes each image's grid points."""
    schedule = Schedule("cosine", 1000)
    teacher = smooth_denoiser(schedule)
    x_t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t, middle, following = torch.tensor([999, 499, 249]), torch.tensor([874, 374, 124]), torch.tensor([749, 249, CLEAN])
    mixed = two_step_target(teacher, x_t, t, (middle, following), schedule, second_order=True)
    for i in range(3):
        alone = two_step_target(
            teacher, x_t[i : i + 1], t[i : i + 1], (middle[i : i + 1], following[i : i + 1]), schedule, True
        )
        assert torch.allclose(mixed[i : i + 1], alone, atol=1e-12)


def test_the_distilled_sampler_takes_eta_as_ddim_does_on_its_own_grid():
    schedule, cpu = Schedule("cosine", 1000), torch.device("cpu")
    denoise, x = smooth_denoiser(schedule), torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    grid = timesteps_for("distilled", schedule, 4)
    for eta in (0.0, 1.0):
        ours = get_sampler("distilled", eta=eta)(denoise, x, grid, schedule, ImageNoise([3, 4], cpu))
        assert torch.equal(ours, ddim(denoise, x, grid, schedule, ImageNoise([3, 4], cpu), eta=eta))
    deterministic = get_sampler("distilled", eta=0.0)(denoise, x, grid, schedule, ImageNoise([5, 6], cpu))
    assert not torch.allclose(deterministic, ours)


# --- a round of training -------------------------------------------------------------------------


def test_the_distillation_loss_pulls_the_students_step_onto_its_teachers_two(trained_run):
    """Gradient steps on the loss of one fixed batch: the student's x̂_0 must close a good part of its gap
    to the two-step target (a sign or weighting error would not)."""
    cfg, _ = distillation_config(trained_run / "best.pt", {"distill.steps": 4, "distill.teacher_steps": 8})
    _, _, _, history = fit_one_batch(cfg, trained_run / "best.pt", 30)
    assert history[-1] < 0.6 * history[0], history


def fit_one_batch(
    cfg: RunConfig, teacher: Path, steps: int
) -> tuple[Distillation, torch.Tensor, torch.Tensor, list[float]]:
    """A student started from `teacher`, `steps` Adam steps on the weighted distillation loss of one
    fixed batch of 8 random images: its distillation, the batch's t and weights, the loss of each
    step. The student must still be in training mode after each loss (a target evaluated in eval
    mode gives it back)."""
    student = load_trained_model(teacher, COMPUTE).network.train().requires_grad_(True)
    distillation, _ = start_distillation(student, cfg, COMPUTE)
    generator = torch.Generator().manual_seed(0)
    t, weight = distillation.draw(8, generator)
    x_t = distillation.schedule.add_noise(
        torch.rand(8, 1, 32, 32, generator=generator) * 2 - 1, torch.randn(8, 1, 32, 32, generator=generator), t
    )
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    history = []
    for _ in range(steps):
        loss = (distillation.loss(student(x_t, t), x_t, t, None)[0] * weight).mean()
        assert student.training
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    return distillation, t, weight, history


def test_a_distillation_run_trains_a_student_closer_to_its_teacher_on_held_out_slices(trained_run, prepared, tmp_path):
    teacher = trained_run / "best.pt"
    cfg, origin = distillation_config(teacher, {"distill.steps": 4, "distill.teacher_steps": 8, "train.epochs": 12})
    assert "1 round of progressive distillation from 8 DDIM steps" in origin
    run_training(cfg, tmp_path / "student")

    # The student's x̂_0 error against the two-step target on held-out slices, before and after.
    start = load_trained_model(teacher, COMPUTE).network
    distillation, _ = start_distillation(copy.deepcopy(start), cfg, COMPUTE)
    images = open_cache(prepared).split("val")[:16]
    before = distillation_validation(start, distillation, images, COMPUTE, 8)
    student = load_trained_model(tmp_path / "student" / "last.pt", COMPUTE)
    after = distillation_validation(student.network, distillation, images, COMPUTE, 8)
    assert after.loss < 0.95 * before.loss, (before.loss, after.loss)
    assert student.distilled_steps == 4 and student.config.sample.sampler == "distilled"


MID_ROUND = {"batch_size": 4, "checkpoint_every_steps": 3, "keep_checkpoints": 10}


@pytest.mark.slow
def test_a_distillation_resumed_in_either_round_continues_exactly(trained_run, tmp_path):
    """Two rounds (16 → 8 → 4) over 2 epochs of 13 steps: the second round starts at step 13, with
    the first round's student as its teacher, which only the checkpoints hold."""
    overrides = {"distill.steps": 4, "distill.teacher_steps": 16, "train.epochs": 2}
    overrides.update({f"train.{key}": value for key, value in MID_ROUND.items()})
    cfg, _ = distillation_config(trained_run / "best.pt", overrides)
    run_training(cfg, tmp_path / "straight")
    assert load_checkpoint(tmp_path / "straight" / "last.pt")["distillation"]["round"] == 1
    for cut_at in (9, 18):  # round 1 (the boundary is passed after resuming), round 2
        run_dir = tmp_path / f"cut-{cut_at}"
        run_training(cfg, run_dir)
        keep_checkpoints_up_to(run_dir, cut_at)
        assert load_checkpoint(step_checkpoints(run_dir)[-1])["distillation"]["round"] == int(cut_at > 13)
        resumed = invoke("distill", "--resume-from", run_dir)
        assert resumed.exit_code == 0, resumed.output
        assert losses(run_dir) == losses(tmp_path / "straight")


# --- the command ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def distilled(tmp_path_factory) -> Path:
    """A workspace where `kneegen prepare` and `train` ran, then `kneegen distill --steps 2` with
    every default (the teacher is the latest run's best.pt); returns the workspace."""
    root = tmp_path_factory.mktemp("distill")
    result = distil_in_workspace(root, "--steps", 2, "--run-dir", "runs/student")
    assert "into a 2-step student: 3 rounds of progressive distillation from 16 DDIM steps" in " ".join(
        result.output.split()
    )
    return root


def distil_in_workspace(root: Path, *distill_args) -> Result:
    """In `root`: `kneegen prepare` a small phantom, `train` a tiny teacher for 4 epochs into
    runs/teacher, then `kneegen distill *distill_args` (the teacher by default); its result."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        prepared = invoke("prepare", "--phantom", 40, "--size", 32, "--val-fraction", 0.5, "--test-fraction", 0)
        assert prepared.exit_code == 0, prepared.output
        (root / "tiny.yaml").write_text(yaml.safe_dump(tiny_run_dict("data/prepared", train={"epochs": 4})))
        trained = invoke("train", "--config", "tiny.yaml", "--run-dir", "runs/teacher")
        assert trained.exit_code == 0, trained.output
        result = invoke("distill", *distill_args)
        assert result.exit_code == 0, result.output
    return result


def test_distill_writes_a_run_whose_config_says_what_it_distilled(distilled):
    saved = yaml.safe_load((distilled / "runs" / "student" / "config.yaml").read_text())
    assert saved["distill"]["teacher"] == str((distilled / "runs" / "teacher" / "best.pt").resolve())
    assert saved["distill"]["steps"] == 2 and saved["distill"]["teacher_steps"] == 16
    assert saved["sample"] == {**saved["sample"], "sampler": "distilled", "steps": 2, "eta": 1.0}
    assert saved["train"]["epochs"] == 2  # 3 rounds × ⅛ of the teacher's 4 epochs, rounded up
    assert "distill" not in yaml.safe_load((distilled / "runs" / "teacher" / "config.yaml").read_text())
    payload = load_checkpoint(distilled / "runs" / "student" / "last.pt")
    assert payload["distillation"]["round"] == 2 and payload["distillation"]["steps"] == 2
    assert payload["ema"] is None


def test_a_student_samples_and_validates_with_its_own_steps_by_default(distilled, monkeypatch):
    monkeypatch.chdir(distilled)
    student = distilled / "runs" / "student" / "last.pt"
    result = invoke("sample", "generate", 3, "--checkpoint", student, "--out", "student-samples")
    assert result.exit_code == 0, result.output
    assert "distilled, 2 steps" in result.output and len(list((distilled / "student-samples").glob("0*.png"))) == 3
    other = invoke("sample", "generate", 2, "--checkpoint", student, "--sampler", "ddim", "--steps", 5, "--out", "x")
    assert other.exit_code == 0 and "ddim, 5 steps" in other.output  # other samplers stay open to it
    validated = invoke("validate", student, "--samples", 8)
    assert validated.exit_code == 0, validated.output
    assert "distilled, 2 steps" in validated.output


@pytest.mark.parametrize(
    "args, named",
    [
        (["sample", "single", "--checkpoint", "runs/student/last.pt", "--steps", 4], "distilled for 2 steps"),
        (["sample", "single", "--checkpoint", "runs/student/last.pt", "--steps", 1], "distil it to 1 (kneegen distill"),
        (["distill", "runs/student/last.pt", "--steps", 3], "give --steps 1"),  # its 2 steps halve to 1 only
        (["sample", "single", "--checkpoint", "runs/teacher/best.pt", "--sampler", "distilled"], "no distilled"),
        (["distill", "runs/student/last.pt", "--steps", 1, "--teacher-steps", 4], "--teacher-steps 4"),
        (["distill", "runs/teacher", "--steps", 4, "--teacher-steps", 12], "distill.teacher_steps 12"),
        (["distill", "runs/teacher", "--set", "train.ema_decay=0.99"], "train.ema_decay"),
        (["distill", "runs/teacher", "--steps", 0], "distill.steps"),
        (["distill", "runs/nowhere"], "runs/nowhere"),
    ],
)
def test_what_a_student_cannot_do_is_refused_in_one_line(distilled, monkeypatch, args, named):
    monkeypatch.chdir(distilled)
    one_line_error(invoke(*args), named)
    assert sorted(p.name for p in (distilled / "runs").iterdir()) == ["student", "teacher"]  # no run was begun


def test_a_student_distils_further_only_by_halving_and_an_odd_one_is_sent_to_its_teacher():
    assert halvings(12) == [6, 3] and halvings(3) == [] and halvings(1) == []
    odd = further_steps(Path("s.pt"), 3, {"distill": {"teacher": "/runs/t/best.pt"}})
    assert "odd count" in odd and "distil its teacher (/runs/t/best.pt)" in odd and "--steps 1" not in odd
    assert "give --steps 6 or 3" in further_steps(Path("s.pt"), 12, {})


def test_a_student_distils_further_from_its_own_steps(distilled, monkeypatch):
    monkeypatch.chdir(distilled)
    result = invoke("distill", "runs/student/last.pt", "--steps", 1, "--run-dir", "runs/one-step")
    assert result.exit_code == 0, result.output
    assert "1 round of progressive distillation from 2 DDIM steps" in " ".join(result.output.split())
    saved = yaml.safe_load((distilled / "runs" / "one-step" / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 1  # one round: ⅛ of the 4 epochs the teacher's lineage trained
    single = invoke("sample", "single", "--checkpoint", "runs/one-step/last.pt", "--out", "one.png")
    assert single.exit_code == 0 and "distilled, 1 steps" in single.output


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"distill.teacher_steps": 12}, "distill.teacher_steps 12"),
        ({"distill.teacher_steps": 4}, "distill.teacher_steps 4"),
        ({"train.ema_length": 0.05}, "keeps no EMA"),
        ({"sample.steps": 8}, "sample.steps 8"),
        ({"model.arch": "vae"}, "autoencoder"),
    ],
)
def test_settings_a_distillation_cannot_take_are_refused(overrides, named):
    base = {"distill.teacher": "teacher.pt", "distill.steps": 4, "train.ema_decay": 0.0, "train.ema_length": 0.0}
    base.update({"sample.sampler": "distilled", "sample.steps": 4})
    with pytest.raises(KneegenError, match=named):
        load_config(None, {**base, **overrides})
    load_config(None, base)  # the same settings without the bad one are fine


@pytest.mark.slow
def test_two_processes_distil_exactly_as_one(trained_run, tmp_path):
    """torchrun, 2 CPU processes (gloo), each with half of every batch, against one process with
    the same halves as micro-batches: bit-identical students, through two rounds. The distillation
    config (the teacher's with its `distill` section) also runs through `kneegen train --config`."""
    overrides = {"distill.steps": 2, "distill.teacher_steps": 8, "train.epochs": 2}
    cfg, _ = distillation_config(trained_run / "best.pt", overrides)
    ddp_dir = tmp_path / "ddp"
    train_with_torchrun(to_dict(cfg), tmp_path / "distill.yaml", ddp_dir)
    cfg.train.grad_accumulation = 2
    run_training(cfg, tmp_path / "one")

    ddp, one = load_checkpoint(ddp_dir / "last.pt"), load_checkpoint(tmp_path / "one" / "last.pt")
    assert ddp["distillation"]["round"] == one["distillation"]["round"] == 1
    assert all(torch.equal(ddp["model"][k], one["model"][k]) for k in one["model"])
    assert all(torch.equal(ddp["distillation"]["teacher"][k], one["distillation"]["teacher"][k]) for k in one["model"])


def test_a_distillation_whose_teacher_moved_resumes_with_its_new_place(trained_run, tmp_path):
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes((trained_run / "best.pt").read_bytes())
    overrides = {"distill.steps": 2, "distill.teacher_steps": 4, "train.epochs": 1}
    run_training(distillation_config(teacher, overrides)[0], tmp_path / "student")
    moved = teacher.rename(tmp_path / "moved.pt")
    resume = ["distill", "--resume-from", tmp_path / "student", "--epochs", 2]
    one_line_error(invoke(*resume), "distill.teacher", "--set distill.teacher=PATH")
    resumed = invoke(*resume, "--set", f"distill.teacher={moved}")
    assert resumed.exit_code == 0, resumed.output
    assert load_checkpoint(tmp_path / "student" / "last.pt")["epoch"] == 2
