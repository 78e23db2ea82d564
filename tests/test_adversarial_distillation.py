"""A distillation's discriminator (`distill.adversarial_weight`): its term reaches the student and
not itself, it learns alongside the student with its loss logged per epoch, it is kept in the
checkpoints, so a distillation resumed mid-epoch continues exactly (its logged loss too), and
inputs too small to judge are refused by key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kneegen.config import RunConfig
from kneegen.distill_request import distillation_config
from kneegen.engine.adversary import make_adversary
from kneegen.engine.checkpoint import load_checkpoint
from kneegen.engine.distillation import start_distillation
from kneegen.engine.distributed import SINGLE
from kneegen.engine.trained import load_trained_model
from kneegen.engine.training import create_state
from kneegen.errors import KneegenError
from kneegen.metrics_log import epoch_records, read_metrics
from kneegen.training_run import run_training

from test_distillation import COMPUTE
from test_training_resume import distillation_cut_and_resumed, losses

JUDGED = {"distill.adversarial_weight": 0.5, "distill.discriminator_channels": 8}


def distillation(teacher: Path, **overrides: object) -> RunConfig:
    """A one-round 8 → 4 distillation of `teacher` over 2 epochs of batch 4, checkpointed every 3 steps."""
    settings = {"distill.steps": 4, "distill.teacher_steps": 8, "train.epochs": 2, "train.batch_size": 4}
    settings |= {"train.checkpoint_every_steps": 3, "train.keep_checkpoints": 10}
    cfg, origin = distillation_config(teacher, settings | overrides)
    assert ("judged by a patch discriminator at weight 0.5" in origin) == ("distill.adversarial_weight" in overrides)
    return cfg


def test_the_judgement_of_the_students_x0_reaches_the_student_and_not_the_discriminator(trained_run):
    teacher = trained_run / "best.pt"
    student = load_trained_model(teacher, COMPUTE).network.train().requires_grad_(True)
    distill, _ = start_distillation(student, distillation(teacher), COMPUTE)
    generator = torch.Generator().manual_seed(0)
    t, weight = distill.draw(4, generator)
    x_t, real = torch.randn(4, 1, 32, 32, generator=generator), torch.rand(4, 1, 32, 32, generator=generator) * 2 - 1
    per_image, x0 = distill.loss(student(x_t, t), x_t, t, None)
    adversary = make_adversary(1, 8, 0.5, 0, 1e-3, COMPUTE, SINGLE)
    term = adversary.generator_term(real, x0, weight * per_image, x0)
    assert term.shape == (4,)
    term.sum().backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in adversary.network.parameters())
    ((kept_real, kept_fake),) = adversary.pending  # what the discriminator's own step learns from
    assert torch.equal(kept_real, real) and torch.equal(kept_fake, x0.detach())


def test_a_judged_distillation_trains_its_discriminator_and_another_student(trained_run, tmp_path):
    run_training(distillation(trained_run / "best.pt", **JUDGED), tmp_path / "judged")
    run_training(distillation(trained_run / "best.pt"), tmp_path / "plain")
    judged, plain = (load_checkpoint(tmp_path / name / "last.pt") for name in ("judged", "plain"))
    assert judged["adversary"]["optimizer"]["state"] and plain["adversary"] is None
    assert judged["adversary"]["network"]["layers.0.weight"].shape[:2] == (8, 1)  # 8 channels, judging 1
    assert any(not torch.equal(judged["model"][k], plain["model"][k]) for k in plain["model"])
    judged_log, plain_log = (
        epoch_records(read_metrics(tmp_path / name / "metrics.jsonl")) for name in ("judged", "plain")
    )
    assert all(0 <= r["discriminator_loss"] < 2.5 for r in judged_log)  # the mean hinge loss: 2 = undecided
    assert all(r["discriminator_loss"] is None for r in plain_log)


@pytest.mark.slow
def test_a_judged_distillation_resumed_mid_way_continues_exactly(trained_run, tmp_path):
    straight, cut = distillation_cut_and_resumed(distillation(trained_run / "best.pt", **JUDGED), tmp_path, 9)
    assert losses(cut) == losses(straight)


def test_inputs_too_small_to_judge_are_refused_by_key(trained_run):
    cfg = distillation(trained_run / "best.pt", **JUDGED)
    with pytest.raises(KneegenError, match="distill.adversarial_weight: .* 24 px .* this run trains on 16 px"):
        create_state(cfg, (16, 16), COMPUTE)
