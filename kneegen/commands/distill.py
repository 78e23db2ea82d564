"""`kneegen distill [CHECKPOINT] --steps 4`: a student that samples in a few network calls."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional, get_args

import typer

from kneegen.commands.choices import one_of
from kneegen.commands.run_options import (
    Device,
    Minutes,
    PrecisionOption,
    Resume,
    ResumeFrom,
    RunDir,
    SetOverrides,
    run_flags,
    run_overrides,
)
from kneegen.config import DistillMethod
from kneegen.distill_request import DistillRequest, start_distillation_run


def distill(
    checkpoint: Annotated[
        Optional[Path], typer.Argument(help="The teacher: a checkpoint or run dir; default: the latest run's best.pt.")
    ] = None,
    steps: Annotated[
        Optional[int], typer.Option(help="Network calls per image the student learns (distill.steps); default 4.")
    ] = None,
    teacher_steps: Annotated[
        Optional[int],
        typer.Option(help="DDIM steps of the first round's teacher: steps × 2^rounds (distill.teacher_steps)."),
    ] = None,
    method: Annotated[Optional[str], typer.Option(help=f"{one_of(get_args(DistillMethod))} (distill.method).")] = None,
    epochs: Annotated[
        Optional[int],
        typer.Option(help="Train until this many epochs (train.epochs); default: ⅛ of the teacher's per round."),
    ] = None,
    minutes: Minutes = None,
    data: Annotated[Optional[Path], typer.Option(help="Prepared data dir (data); default: the teacher's.")] = None,
    run_dir: RunDir = None,
    resume: Resume = False,
    resume_from: ResumeFrom = None,
    device: Device = None,
    precision: PrecisionOption = None,
    set_: SetOverrides = None,
) -> None:
    """Distil a trained model into a student that samples in --steps network calls (sampler `distilled`)."""
    flags = {
        "distill.steps": steps,
        "distill.teacher_steps": teacher_steps,
        "distill.method": method,
        **run_flags(epochs, minutes, data, device, precision),
    }
    request = DistillRequest(checkpoint, run_overrides(set_, flags), run_dir, resume, resume_from)
    start_distillation_run(request)
