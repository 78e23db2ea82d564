"""`kneegen train`: a YAML config, overridden by flags, trained into a run dir.

Data-parallel on several GPUs (or CPU processes): `torchrun --nproc_per_node N -m kneegen train …`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from kneegen.config import RunConfig, config_from_mapping, load_config, parse_override
from kneegen.engine.checkpoint import checkpoint_config
from kneegen.engine.device import resolve_compute
from kneegen.errors import KneegenError
from kneegen.recipes import recipe_for, recipe_names, recipe_path
from kneegen.runs import CONFIG, home_run_of, latest_run_dir
from kneegen.training_run import run_training


def train(
    config: Annotated[
        Optional[Path],
        typer.Option(help=f"YAML run config (see examples/) or a recipe: {', '.join(recipe_names())}. "
                     "Default: the recipe for this CPU, or the built-in defaults on a GPU."),
    ] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Train until this many epochs (train.epochs).")] = None,
    minutes: Annotated[
        Optional[float], typer.Option(help="Also stop at the epoch end where the next epoch would pass this (train.minutes).")
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
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or mps (device).")] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto, fp32 or bf16 (precision).")] = None,
    set_: Annotated[
        Optional[list[str]], typer.Option("--set", help="Override any config key: --set train.lr=3e-4 (repeatable).")
    ] = None,
) -> None:
    """Train a diffusion model; checkpoints, metrics and loss plots go to the run dir."""
    overrides: dict[str, Any] = dict(parse_override(text) for text in set_ or [])
    flags = {"train.epochs": epochs, "train.minutes": minutes, "data": str(data) if data else None, "device": device,
             "precision": precision}
    overrides.update({key: value for key, value in flags.items() if value is not None})
    checkpoint, note = None, ""
    if resume_from is not None:
        if not resume_from.exists():
            raise KneegenError(f"--resume-from {resume_from} not found: give a run dir or a .pt checkpoint in one")
        resume = True
        if resume_from.is_file():
            checkpoint = resume_from
        else:
            run_dir = run_dir or resume_from
    if resume:
        run_dir = run_dir or (home_run_of(checkpoint) if checkpoint else latest_run_dir())
        cfg = config_to_resume(config, checkpoint, run_dir, overrides)
    else:
        if config is None:
            config, note = hardware_recipe(device or "auto", precision or "auto")
        elif not config.exists() and str(config) in recipe_names():
            config = recipe_path(str(config))
        cfg = load_config(config, overrides)
    run_training(cfg, run_dir, resume, checkpoint, origin=note)


def config_to_resume(config: Path | None, checkpoint: Path | None, run_dir: Path | None,
                     overrides: dict[str, Any]) -> RunConfig:
    """--config if given; else the config.yaml of the checkpoint's run (or of `run_dir`); else,
    for a checkpoint copied out of its run, the config the checkpoint carries."""
    if config is not None:
        return load_config(config, overrides)
    if checkpoint is not None:
        home = home_run_of(checkpoint)
        if home is None:
            return config_from_mapping(checkpoint_config(checkpoint), str(checkpoint), overrides)
        return load_config(home / CONFIG, overrides)
    assert run_dir is not None  # without a checkpoint file, --resume always has a run dir
    if not (run_dir / CONFIG).is_file():
        raise KneegenError(f"--resume: {run_dir} holds no {CONFIG}, so it is no kneegen run: give the --run-dir of one, "
                           "or start a new run without --resume")
    return load_config(run_dir / CONFIG, overrides)


def hardware_recipe(device: str, precision: str) -> tuple[Path | None, str]:
    """The recipe for the machine the run will use (None: the built-in defaults, on a GPU) and
    the line that announces it."""
    chosen = recipe_for(resolve_compute(device, precision, allow_fp16=True))
    if chosen is None:
        return None, "no --config: the built-in defaults (kneegen/config.py)"
    name, why = chosen
    return recipe_path(name), f"no --config: recipe {name} ({why}); another: --config {' or '.join(recipe_names())}"
