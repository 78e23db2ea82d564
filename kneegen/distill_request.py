"""What `kneegen distill` asks for, turned into a run config: the teacher checkpoint's own config
with a `distill` section, the training settings a distillation run wants, and the student's
sampler; then the same training run as `kneegen train` (run dir, resume, DDP, metrics, plots)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kneegen.config import RunConfig, SampleConfig, config_from_mapping, set_dotted
from kneegen.engine.checkpoint import load_checkpoint
from kneegen.engine.distillation import distillation_rounds, halvings, root_epochs
from kneegen.engine.plugins import check_overrides
from kneegen.engine.samplers import DISTILLED
from kneegen.engine.training import TrainState
from kneegen.errors import KneegenError
from kneegen.runs import resolve_checkpoint
from kneegen.train_request import TrainPlan, TrainRequest, plan_training
from kneegen.training_run import run_training

DEFAULT_STEPS = 4
FIRST_TEACHER_STEPS = 16  # round 0's teacher samples with at least this many DDIM steps
# Default length: per round, this share of the epochs the teacher's model trained for; a step costs
# ~1.8 training steps (two teacher calls, no backward through them), so 16 → 4 costs ~45 % of training.
ROUND_SHARE = 0.125
# A round is a short fine-tuning of a network that is already right almost everywhere: a lower LR
# than training's, a short warm-up, and the LR brought linearly to 0 over each round (the paper's
# schedule); no EMA, since each round's end hands the student's own weights on.
STUDENT_ETA = 1.0  # a student samples with ancestral steps from its x̂_0: measured better than η = 0 at 4 steps
DISTILLATION_TRAIN = {
    "lr": 2e-4,
    "warmup_steps": 10,
    "lr_schedule": "constant",
    "cooldown": 1.0,
    "ema_length": 0.0,
    "ema_decay": 0.0,
    "ema_snapshots": False,
    "guide_at": 0.0,
    "minutes": 0.0,
    "best_by": "val_loss",
}
# Distribution matching moves the student by a gradient of one size everywhere, with nothing to
# hold it near the teacher's weights: at 2e-4 it sampled noise after 4 epochs, at 5e-5 it did not
# (README, "Few-step sampling").
DMD_LR = 5e-5


@dataclass
class DistillRequest:
    """The distill command's options: the teacher (default: the latest run's best.pt), dotted-key
    overrides (the flags, the student's steps among them, already folded in), where to write, and
    what to resume."""

    teacher: Path | None
    overrides: dict[str, Any]
    run_dir: Path | None = None
    resume: bool = False
    resume_from: Path | None = None


def start_distillation_run(request: DistillRequest) -> TrainState:
    """A new distillation run from the teacher, or the interrupted one continued as `train --resume` would."""
    if request.resume or request.resume_from is not None:
        flag = "--resume" if request.resume_from is None else f"--resume-from {request.resume_from}"
        if request.teacher is not None:
            raise KneegenError(
                f"kneegen distill {request.teacher} {flag}: CHECKPOINT starts a new student and {flag} continues one "
                "(with the teacher it began with): give one of them"
            )
        plan = plan_training(
            TrainRequest(None, request.overrides, request.run_dir, request.resume, request.resume_from)
        )
        check_resumes_a_distillation(plan, request, flag)
        return plan.run()
    teacher = resolve_checkpoint(request.teacher)
    cfg, origin = distillation_config(teacher, request.overrides)
    return run_training(cfg, request.run_dir, origin=origin)


def check_resumes_a_distillation(plan: TrainPlan, request: DistillRequest, flag: str) -> None:
    """`distill --resume` continues a distillation run; a plain training run would train on as
    one (its checkpoints replaced, --steps ignored), which is `kneegen train --resume`'s job."""
    if plan.cfg.distill.teacher:
        return
    resumed = request.resume_from or plan.run_dir
    kind = "from a training run" if plan.checkpoint is not None else "a training run"
    again = f"kneegen train {flag}" + (f" --run-dir {plan.run_dir}" if plan.run_dir is not None else "")
    raise KneegenError(
        f"{flag}: {resumed} is {kind}, not a distillation: continue its training with {again}, "
        f"or distil it into a new student with kneegen distill {resumed}"
    )


def distillation_config(teacher: Path, overrides: dict[str, Any]) -> tuple[RunConfig, str]:
    """The teacher's config as a distillation run, overridden by the user's keys (`distill.steps`
    among them, default DEFAULT_STEPS); and the line that says what will happen."""
    payload = load_checkpoint(teacher)
    raw = payload.get("config") or {}
    teacher_epochs = root_epochs(payload)
    student_of = (payload.get("distillation") or {}).get("steps")  # distilling a student further
    method = (payload.get("distillation") or {}).get("method")
    if method in ("consistency", "dmd"):  # one-stage students: no grid to halve, and fewer steps already theirs
        counts = "any number of steps" if method == "consistency" else "its own steps or any count that divides them"
        raise KneegenError(
            f"{teacher} is a {method} student, which samples in {counts}: sample it with --steps N (1 is its "
            "fewest) instead of distilling it further"
        )
    steps = overrides.get("distill.steps", DEFAULT_STEPS)
    if student_of and isinstance(steps, int) and steps not in halvings(int(student_of)):
        given = "" if "distill.steps" in overrides else " (the default)"
        raise KneegenError(f"--steps {steps}{given}: {further_steps(teacher, int(student_of), raw)}")
    sample = raw.get("sample") or {}  # the teacher's, as checked when it trained
    guided = float(sample.get("autoguidance", 1.0)) if payload.get("guide") is not None else 1.0
    guided_below = float(sample.get("autoguidance_sigma_max", SampleConfig.autoguidance_sigma_max))
    if not isinstance(steps, int) or steps < 1:
        steps = DEFAULT_STEPS  # for the derived keys only: the config check refuses the value itself
    derived = {
        "distill.teacher": str(teacher.resolve()),
        "distill.steps": steps,
        "distill.teacher_steps": int(student_of) if student_of else first_teacher_steps(steps),
        "distill.autoguidance": guided,  # the teacher's steps as it samples them
        "distill.autoguidance_sigma_max": guided_below,
        **{f"train.{key}": value for key, value in DISTILLATION_TRAIN.items()},
        **({"train.lr": DMD_LR} if overrides.get("distill.method") == "dmd" else {}),
        "sample.sampler": DISTILLED,
        "sample.steps": steps,
        "sample.eta": STUDENT_ETA,
        "sample.autoguidance": 1.0,  # a student needs no guide: it learnt the teacher's guided steps
    }
    for dotted, value in derived.items():
        set_dotted(raw, dotted, value)
    cfg = config_from_mapping(raw, str(teacher), overrides)
    check_overrides(overrides, cfg.model.arch)
    distill = cfg.distill
    if student_of and distill.teacher_steps != student_of:
        raise KneegenError(
            f"{teacher}: a student distilled for {student_of} steps teaches with {student_of} steps, not "
            f"--teacher-steps {distill.teacher_steps}: leave --teacher-steps out"
        )
    if not student_of:
        check_teacher_steps(cfg, teacher, given="distill.teacher_steps" in overrides)
    if distill.backward_simulation and distill.method != "dmd":
        raise KneegenError(
            f"distill.backward_simulation: only --method dmd simulates its student's own steps, not {distill.method}: "
            "leave it out, or give --method dmd"
        )
    rounds = distillation_rounds(distill.teacher_steps, distill.steps)  # consistency trains as long, in one stage
    if "train.epochs" not in overrides:
        cfg.train.epochs = max(1, math.ceil(teacher_epochs * ROUND_SHARE * rounds))
    guided = ""
    if distill.autoguidance != 1.0:
        below = f" at σ ≤ {distill.autoguidance_sigma_max:g}" if math.isfinite(distill.autoguidance_sigma_max) else ""
        guided = f", autoguided with w {distill.autoguidance:g}{below}"
    if distill.method == "dmd":
        how = (
            f"distribution matching on its own {distill.steps} steps{guided}, judged against a fake score "
            f"updated {distill.fake_score_updates}× per step"
        )
        if distill.regression_weight:
            how += (
                f", its first step regressed at weight {distill.regression_weight:g} on the teacher's ODE images "
                f"of {distill.regression_pairs} noises"
            )
        if distill.backward_simulation and distill.steps > 1:
            how += ", its later steps learnt from its own earlier ones (backward simulation)"
    elif distill.method == "consistency":
        how = (
            f"consistency distillation along the teacher's {distill.teacher_steps} DDIM steps{guided} (it samples "
            f"in any number of steps, {distill.steps} by default)"
        )
    else:
        how = (
            f"{rounds} round{'s' * (rounds > 1)} of progressive distillation from {distill.teacher_steps} "
            f"{'DDIM' if distill.teacher_solver == 'ddim' else 'DPM-Solver++(2M)'} steps (each round halves them)"
            f"{guided}"
        )
    if distill.adversarial_weight:
        how += f", its x̂_0 judged by a patch discriminator at weight {distill.adversarial_weight:g}"
    origin = (
        f"distilling {teacher} (from {teacher_epochs} epochs of training) into a {distill.steps}-step student: "
        f"{how}, over {cfg.train.epochs} epochs"
    )
    return cfg, origin


def further_steps(student: Path, steps: int, raw: dict[str, Any]) -> str:
    """What a student of `steps` can be distilled further to (each round halves its steps), and
    where else to go for another count: the teacher it was distilled from."""
    fewer = halvings(steps)
    origin = (raw.get("distill") or {}).get("teacher")
    elsewhere = f"; for another count distil its teacher ({origin}) with that --steps" if origin else ""
    if not fewer:
        return f"{student} was distilled for {steps} steps, an odd count, which no round can halve{elsewhere}"
    return f"{student} was distilled for {steps} steps: give --steps {' or '.join(map(str, fewer))}{elsewhere}"


def check_teacher_steps(cfg: RunConfig, teacher: Path, given: bool) -> None:
    """Round 0's teacher samples with `distill.teacher_steps` DDIM steps, which its model's
    `diffusion.timesteps` must hold: refused here, before a run dir exists, naming the flag that
    set it (--teacher-steps, or --steps when the teacher's steps were derived from it)."""
    steps, teacher_steps, timesteps = cfg.distill.steps, cfg.distill.teacher_steps, cfg.diffusion.timesteps
    if teacher_steps <= timesteps:
        return
    fitting = steps * 2
    while fitting * 2 <= timesteps:
        fitting *= 2
    hint = f"give --teacher-steps {fitting}" if fitting <= timesteps else f"give --steps {timesteps // 2} or fewer"
    culprit = (
        f"--teacher-steps {teacher_steps} (distill.teacher_steps): more DDIM steps"
        if given
        else f"--steps {steps}: its first teacher would take {teacher_steps} DDIM steps (--teacher-steps), more"
    )
    raise KneegenError(
        f"{culprit} than the {timesteps} timesteps (diffusion.timesteps) of the model in {teacher}: {hint}"
    )


def first_teacher_steps(steps: int) -> int:
    """Round 0's teacher steps: `steps` doubled at least once, and until there are FIRST_TEACHER_STEPS."""
    teacher_steps = 2 * steps
    while teacher_steps < FIRST_TEACHER_STEPS:
        teacher_steps *= 2
    return teacher_steps
