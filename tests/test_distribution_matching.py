"""Distribution matching distillation (`kneegen distill --method dmd`): its gradient checked in
closed form, the fake score learning the student's samples by a loss that must drop, the first
step's regression anchor on the teacher's ODE pairs (inputs, loss and the pairs themselves), and the
method end to end: a run that trains the fake score beside the student and logs its loss, a
student that samples on its own grid or a coarser one within it, a mid-way resume that continues
exactly, and a student that is not distilled further."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kneegen import training_run
from kneegen.config import RunConfig
from kneegen.distill_request import distillation_config
from kneegen.engine.checkpoint import load_checkpoint
from kneegen.engine.denoiser import make_denoiser
from kneegen.engine.distillation import start_distillation
from kneegen.engine.fake_score import TAU_RANGE, distribution_matching_loss, draw_matching
from kneegen.engine.samplers import ImageNoise, consistency, generate, get_sampler, timesteps_for, trailing_timesteps
from kneegen.engine.schedule import Schedule
from kneegen.engine.teacher_pairs import SEED_BASE, SEED_STRIDE, SOLVER, STEPS, TeacherPairs, draw_teacher_pairs
from kneegen.engine.trained import load_trained_model
from kneegen.errors import KneegenError
from kneegen.interruption import Interrupted, StopRequest
from kneegen.metrics_log import epoch_records, read_metrics
from kneegen.training_run import run_training

from helpers import invoke, one_line_error
from test_consistency import other_denoiser
from test_distillation import COMPUTE, smooth_denoiser
from test_training_resume import distillation_cut_and_resumed, losses

CPU = torch.device("cpu")
MATCHING = {
    "distill.method": "dmd",
    "distill.fake_score_updates": 2,
    "distill.regression_weight": 0.5,
    "distill.regression_pairs": 8,
}


def distillation(teacher: Path, **overrides: object) -> RunConfig:
    """A 4-step dmd distillation of `teacher` over 2 epochs of batch 4, checkpointed every 3 steps."""
    settings = {"distill.steps": 4, "train.epochs": 2, "train.batch_size": 4}
    settings |= {"train.checkpoint_every_steps": 3, "train.keep_checkpoints": 10}
    cfg, origin = distillation_config(teacher, MATCHING | settings | overrides)
    assert "distribution matching on its own 4 steps" in origin and "fake score updated 2× per step" in origin
    assert "its first step regressed at weight 0.5 on the teacher's ODE images of 8 noises" in origin
    return cfg


def test_dmd_takes_its_measured_defaults_and_the_users_keys_over_them(trained_run):
    cfg, _ = distillation_config(trained_run / "best.pt", {"distill.method": "dmd"})
    assert (cfg.train.lr, cfg.distill.fake_score_updates, cfg.distill.regression_weight) == (5e-5, 5, 1.0)
    cfg, _ = distillation_config(trained_run / "best.pt", {"distill.method": "dmd", "train.lr": 1e-4})
    assert cfg.train.lr == 1e-4
    assert distillation_config(trained_run / "best.pt", {})[0].train.lr == 2e-4  # progressive's


def test_the_gradient_is_the_normalised_difference_of_the_fake_and_real_x0():
    schedule = Schedule("cosine", 1000)
    real, fake = smooth_denoiser(schedule), other_denoiser(schedule)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 1, 8, 8, generator=generator, dtype=torch.float64).mul(2).sub(1).requires_grad_(True)
    tau, noise = torch.tensor([20, 500, 979]), torch.randn(3, 1, 8, 8, generator=generator, dtype=torch.float64)
    loss = distribution_matching_loss(x0, real, fake, tau, noise, schedule)
    loss.sum().backward()
    noisy = schedule.add_noise(x0.detach(), noise, tau)
    real_x0, fake_x0 = real(noisy, tau)[0], fake(noisy, tau)[0]
    scale = (x0.detach() - real_x0).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = (fake_x0 - real_x0) / scale / 64  # the mean over 64 pixels
    assert torch.allclose(x0.grad.double(), expected, rtol=1e-4, atol=1e-7)  # computed in fp32
    assert torch.allclose(loss.double(), 0.5 * ((fake_x0 - real_x0) / scale).square().mean(dim=(1, 2, 3)), rtol=1e-5)
    same = distribution_matching_loss(x0.detach(), real, real, tau, noise, schedule)
    assert torch.equal(same, torch.zeros(3))  # a fake score that cannot tell the samples from data moves nothing


def test_the_levels_are_drawn_inside_the_range_and_alike_from_the_same_generator():
    draws = [draw_matching(64, (1, 4, 4), 3, 1000, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert draws[0].update_tau.shape == (3, 64) and draws[0].update_noise.shape == (3, 64, 1, 4, 4)
    for tau in (draws[0].tau, draws[0].update_tau):
        assert tau.min() >= TAU_RANGE[0] * 1000 and tau.max() < TAU_RANGE[1] * 1000
    assert torch.equal(draws[0].noise, draws[1].noise) and torch.equal(draws[0].update_tau, draws[1].update_tau)
    part = draws[0].part(torch.tensor([2, 5]))
    assert torch.equal(part.update_noise, draws[0].update_noise[:, [2, 5]])


def test_the_fake_score_learns_the_students_samples(trained_run):
    teacher = trained_run / "best.pt"
    student = load_trained_model(teacher, COMPUTE).network
    distill, _ = start_distillation(student, distillation(teacher, **{"train.lr": 1e-3}), COMPUTE)
    fake = distill.fake_score
    ramp = torch.linspace(-1, 1, 32)
    samples = torch.stack([ramp.view(1, 32, 1).expand(1, 32, 32) * (-1) ** k for k in range(8)])  # unlike slices
    fixed = draw_matching(8, (1, 32, 32), 1, 1000, torch.Generator().manual_seed(2))
    before = fake.denoising_loss(samples, fixed.tau, fixed.noise, None).mean().item()
    for step in range(20):
        fake.keep(
            samples, draw_matching(8, (1, 32, 32), fake.updates, 1000, torch.Generator().manual_seed(10 + step)), None
        )
        fake.step(1e-3, 8)
    with torch.no_grad():
        after = fake.denoising_loss(samples, fixed.tau, fixed.noise, None).mean().item()
    assert after < 0.6 * before
    assert len(fake.epoch_losses) == 20 and not fake.pending
    assert all(not p.requires_grad for p in fake.network.parameters())  # frozen outside its updates
    teacher_weights = load_checkpoint(teacher)["ema"] or load_checkpoint(teacher)["model"]
    assert all(torch.equal(distill.teacher.state_dict()[k], teacher_weights[k]) for k in teacher_weights)


def test_first_step_rows_start_from_the_pairs_noise_and_are_regressed_on_the_teachers_images(trained_run):
    teacher = trained_run / "best.pt"
    student = load_trained_model(teacher, COMPUTE).network
    distill, _ = start_distillation(student, distillation(teacher), COMPUTE)
    generator = torch.Generator().manual_seed(3)
    distill.anchor = TeacherPairs(torch.randn(5, 1, 32, 32, generator=generator), torch.rand(5, 1, 32, 32) * 2 - 1)
    t = torch.tensor([999, 749, 999, 249])
    draws = distill.draw_matching(t, (1, 32, 32), generator)
    assert (draws.pair[[1, 3]] == -1).all() and (draws.pair[[0, 2]] >= 0).all() and draws.pair.max() < 5
    x_t = torch.randn(4, 1, 32, 32, generator=generator)
    anchored, _ = distill.anchored_inputs(x_t, None, draws)
    assert torch.equal(anchored[[1, 3]], x_t[[1, 3]])
    assert torch.equal(anchored[[0, 2]], distill.anchor.noise[draws.pair[[0, 2]]])
    output = student(anchored, t)
    with_regression, x0 = distill.loss(output, anchored, t, None, draws)
    distill.regression_weight = 0.0
    without, _ = distill.loss(output, anchored, t, None, draws)
    images = distill.anchor.images[draws.pair[[0, 2]]]
    expected = 0.5 * (x0[[0, 2]] - images).square().mean(dim=(1, 2, 3))  # the test's weight 0.5
    assert torch.allclose((with_regression - without)[[0, 2]], expected, rtol=1e-5)
    assert torch.equal(with_regression[[1, 3]], without[[1, 3]])
    unanchored = distill.draw_matching(t, (1, 32, 32), generator, anchored=False)
    assert (unanchored.pair == -1).all()


class GivenNoise:
    """The fresh noise a sampler asks for: the given tensors, one per call, in order."""

    def __init__(self, draws: list[torch.Tensor]) -> None:
        self.draws = draws

    def randn(self, image_shape: tuple[int, ...]) -> torch.Tensor:
        return self.draws.pop(0)


def test_backward_simulation_gives_each_later_step_what_the_students_own_sampler_reaches_there(trained_run):
    teacher = trained_run / "best.pt"
    student = load_trained_model(teacher, COMPUTE).network.train()
    distill, _ = start_distillation(student, distillation(teacher, **{"distill.backward_simulation": True}), COMPUTE)
    grid = trailing_timesteps(1000, 4)  # [999, 749, 499, 249]
    t = torch.tensor([999, 749, 499, 249, 749])
    draws = distill.draw_matching(t, (1, 32, 32), torch.Generator().manual_seed(4))
    assert draws.path.shape == (5, 3, 1, 32, 32)  # the start, then the noise of the steps to 749 and 499
    plain = distill.draw_matching(t, (1, 32, 32), torch.Generator().manual_seed(4), simulated=False)
    assert plain.path.shape == (5, 0, 1, 32, 32) and torch.equal(plain.update_noise, draws.update_noise)
    generator = torch.Generator().manual_seed(5)
    x_t, noise = torch.randn(5, 1, 32, 32, generator=generator), torch.randn(5, 1, 32, 32, generator=generator)
    path = draws.path.clone()
    simulated = distill.simulated_inputs(x_t, t, noise, None, draws)
    assert torch.equal(simulated[0], x_t[0]) and student.training  # the first step meets noise anyway
    assert torch.equal(draws.path, path)
    assert distill.fold == 2  # the tiny model's patch size: its sampler takes the fold out of x̂_0
    denoise = make_denoiser(student, distill.schedule, distill.prediction, COMPUTE, clip=True, fold=2)
    for row in range(1, 5):
        step = grid.index(int(t[row]))
        fresh = [draws.path[row : row + 1, k] for k in range(1, step)] + [noise[row : row + 1]]
        reached: dict[int, torch.Tensor] = {}
        consistency(
            denoise,
            draws.path[row : row + 1, 0],
            grid[: step + 1],
            distill.schedule,
            GivenNoise(fresh),  # type: ignore[arg-type]
            on_step=lambda i, x, x0, reached=reached: reached.setdefault(i, x),
        )
        torch.testing.assert_close(simulated[row : row + 1], reached[step], rtol=1e-4, atol=1e-5)
    student.eval()
    assert torch.equal(distill.simulated_inputs(x_t, t, noise, None, plain), x_t)  # nothing to simulate with
    with pytest.raises(KneegenError, match="distill.backward_simulation: only --method dmd"):
        distillation_config(teacher, {"distill.backward_simulation": True})


def test_the_teacher_pairs_are_its_ode_images_of_noises_of_their_own_seeds():
    schedule = Schedule("cosine", 1000)
    teacher = smooth_denoiser(schedule)
    pairs = draw_teacher_pairs(teacher, schedule, 3, (1, 8, 8), seed=2, device=torch.device("cpu"))
    seeds = [SEED_BASE + 2 * SEED_STRIDE + k for k in range(3)]
    assert torch.equal(pairs.noise, ImageNoise(seeds, torch.device("cpu")).randn((1, 8, 8)))
    expected = generate(
        teacher, get_sampler(SOLVER), timesteps_for(SOLVER, schedule, STEPS), schedule, seeds, (1, 8, 8), CPU
    )
    assert torch.equal(pairs.images, expected.float())
    assert not torch.equal(pairs.noise[0], ImageNoise([0], CPU).randn((1, 8, 8))[0])  # not `sample`'s seeds


def test_a_dmd_distillation_trains_the_fake_score_and_its_student_samples_on_its_grid(trained_run, tmp_path):
    run_dir = tmp_path / "dmd"
    run_training(distillation(trained_run / "best.pt"), run_dir)
    payload = load_checkpoint(run_dir / "last.pt")
    assert payload["distillation"]["method"] == "dmd" and payload["distillation"]["steps"] == 4
    fake = payload["distillation"]["fake_score"]
    assert fake["optimizer"]["state"]  # it took steps
    assert any(not torch.equal(fake["network"][k], payload["distillation"]["teacher"][k]) for k in fake["network"])
    assert any(not torch.equal(payload["model"][k], payload["distillation"]["teacher"][k]) for k in payload["model"])
    records = epoch_records(read_metrics(run_dir / "metrics.jsonl"))
    assert len(records) == 2 and all(r["fake_score_loss"] > 0 for r in records)
    anchor = payload["distillation"]["anchor"]
    assert anchor["noise"].shape == anchor["images"].shape == (8, 1, 32, 32)  # distill.regression_pairs 8
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        two = invoke("sample", "single", "--checkpoint", run_dir / "last.pt", "--steps", 2, "--out", "two")
        assert two.exit_code == 0, two.output
        three = invoke("sample", "single", "--checkpoint", run_dir / "last.pt", "--steps", 3, "--out", "three")
        message = one_line_error(three)
        assert "--steps 3:" in message and "those of 1, 2, 4 steps only" in message
        further = invoke("distill", run_dir / "last.pt", "--steps", 2)
        assert "is a dmd student" in one_line_error(further)
    assert list((tmp_path / "two").glob("*.png")) and not (tmp_path / "three").exists()


@pytest.mark.slow
@pytest.mark.parametrize("simulated", [False, True])
def test_a_dmd_distillation_resumed_mid_way_continues_exactly(trained_run, tmp_path, simulated):
    cfg = distillation(trained_run / "best.pt", **{"distill.backward_simulation": simulated})
    straight, cut = distillation_cut_and_resumed(cfg, tmp_path, after_step=9)
    assert losses(cut) == losses(straight)  # the fake score's losses and the validation among them
    assert [r["fake_score_loss"] for r in epoch_records(read_metrics(cut / "metrics.jsonl"))][0] is not None


def test_a_stopped_distillation_names_the_distill_command_that_continues_it(trained_run, tmp_path, monkeypatch):
    class StoppedAtOnce(StopRequest):
        def __enter__(self) -> StopRequest:
            self.requested = "SIGTERM"  # as if the signal came during the first step
            return self

    monkeypatch.setattr(training_run, "StopRequest", StoppedAtOnce)
    with pytest.raises(Interrupted, match=f"continue with: kneegen distill --resume --run-dir {tmp_path / 'run'}$"):
        run_training(distillation(trained_run / "best.pt"), tmp_path / "run")
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 1
