"""`kneegen train`: a YAML config, overridden by flags, trained into a run dir.

Data-parallel on several GPUs (or CPU processes): `torchrun --nproc_per_node N -m kneegen train …`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

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
from kneegen.recipes import recipe_names
from kneegen.train_request import TrainRequest, start_training


def train(
    config: Annotated[
        Optional[Path],
        typer.Option(
            help=f"YAML run config (see examples/) or a recipe: {', '.join(recipe_names())}. "
            "Default: the recipe for this CPU, or the built-in defaults on a GPU."
        ),
    ] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Train until this many epochs (train.epochs).")] = None,
    minutes: Minutes = None,
    data: Annotated[Optional[Path], typer.Option(help="Prepared data dir (data).")] = None,
    run_dir: RunDir = None,
    resume: Resume = False,
    resume_from: ResumeFrom = None,
    device: Device = None,
    precision: PrecisionOption = None,
    set_: SetOverrides = None,
) -> None:
    """Train a diffusion model; checkpoints, metrics and loss plots go to the run dir."""
    overrides = run_overrides(set_, run_flags(epochs, minutes, data, device, precision))
    start_training(TrainRequest(config, overrides, run_dir, resume, resume_from, device, precision))
