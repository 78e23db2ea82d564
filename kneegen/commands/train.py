"""`kneegen train`: a YAML config, overridden by flags, trained into a run dir.

Data-parallel on several GPUs (or CPU processes): `torchrun --nproc_per_node N -m kneegen train …`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from kneegen.commands.choices import DEVICES, PRECISIONS
from kneegen.config import parse_override
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
    minutes: Annotated[
        Optional[float],
        typer.Option(help="Also stop at the epoch end where the next epoch would pass this (train.minutes)."),
    ] = None,
    data: Annotated[Optional[Path], typer.Option(help="Prepared data dir (data).")] = None,
    run_dir: Annotated[Optional[Path], typer.Option(help="Where outputs go; default runs/<time>.")] = None,
    resume: Annotated[
        bool,
        typer.Option(help="Continue the run in --run-dir (default: the latest run) from its newest good checkpoint."),
    ] = False,
    resume_from: Annotated[
        Optional[Path], typer.Option(help="Continue from this run dir, or this checkpoint file (implies --resume).")
    ] = None,
    device: Annotated[Optional[str], typer.Option(help=f"{DEVICES} (device).")] = None,
    precision: Annotated[Optional[str], typer.Option(help=f"{PRECISIONS} (precision).")] = None,
    set_: Annotated[
        Optional[list[str]], typer.Option("--set", help="Override any config key: --set train.lr=3e-4 (repeatable).")
    ] = None,
) -> None:
    """Train a diffusion model; checkpoints, metrics and loss plots go to the run dir."""
    overrides: dict[str, Any] = dict(parse_override(text) for text in set_ or [])
    flags = {
        "train.epochs": epochs,
        "train.minutes": minutes,
        "data": str(data) if data else None,
        "device": device,
        "precision": precision,
    }
    overrides.update({key: value for key, value in flags.items() if value is not None})
    start_training(TrainRequest(config, overrides, run_dir, resume, resume_from, device, precision))
