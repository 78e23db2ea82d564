"""What `kneegen train` asks for, turned into a config and a run: a recipe for this machine when
no config is given, and on `--resume` the config of the run (or checkpoint) being continued."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kneegen.config import RunConfig, config_from_mapping, load_config
from kneegen.data.cache import refuse_relative_miss
from kneegen.engine.checkpoint import checkpoint_config
from kneegen.engine.device import resolve_compute
from kneegen.engine.plugins import check_overrides
from kneegen.engine.training import TrainState
from kneegen.errors import KneegenError
from kneegen.recipes import recipe_for, recipe_names, recipe_path
from kneegen.runs import CONFIG, LAST, home_run_of, latest_run_dir, same_place
from kneegen.training_run import run_training


@dataclass
class TrainRequest:
    """The train command's options: a config file or recipe name, dotted-key overrides (the
    flags already folded in), where to write, and what to resume."""

    config: Path | None
    overrides: dict[str, Any]
    run_dir: Path | None = None
    resume: bool = False
    resume_from: Path | None = None  # a run dir or a checkpoint file; implies resume
    device: str | None = None
    precision: str | None = None


@dataclass
class TrainPlan:
    """A request settled: the config, and the run it starts or continues (`run_training`'s arguments)."""

    cfg: RunConfig
    run_dir: Path | None
    resume: bool
    checkpoint: Path | None
    origin: str = ""  # where the config came from, printed once every check has passed

    def run(self) -> TrainState:
        return run_training(self.cfg, self.run_dir, self.resume, self.checkpoint, origin=self.origin)


def start_training(request: TrainRequest) -> TrainState:
    """Settle the config and the run dir the request means, then train."""
    return plan_training(request).run()


def plan_training(request: TrainRequest) -> TrainPlan:
    """The config and the run dir the request means, read from the files it names; nothing written."""
    config, overrides, run_dir, resume = request.config, request.overrides, request.run_dir, request.resume
    checkpoint, note = None, ""
    if request.resume_from is not None:
        if not request.resume_from.exists():
            raise KneegenError(
                f"--resume-from {request.resume_from} not found: give a run dir or a .pt checkpoint in one"
            )
        resume = True
        if request.resume_from.is_file():
            checkpoint = request.resume_from
        else:
            if run_dir is not None and not same_place(run_dir, request.resume_from):
                raise KneegenError(
                    f"--resume-from {request.resume_from} is a run dir, continued in that dir, and --run-dir {run_dir} "
                    f"is another: leave --run-dir out, or continue it elsewhere from one of its checkpoints "
                    f"(--resume-from {request.resume_from / LAST} --run-dir NEW_DIR)"
                )
            run_dir = request.resume_from
    if resume:
        run_dir = run_dir or (home_run_of(checkpoint) if checkpoint else latest_run_dir())
        cfg = config_to_resume(config, checkpoint, run_dir, overrides)
        if config is None and "data" not in overrides:  # the data dir the run recorded
            refuse_relative_miss(cfg.data, checkpoint or run_dir, "--data")
    else:
        if config is None:
            config, note = hardware_recipe(request.device or "auto", request.precision or "auto")
        elif not config.exists() and str(config) in recipe_names():
            config = recipe_path(str(config))
        elif not config.exists():
            raise KneegenError(
                f"--config {config}: no such file, nor a recipe: give a YAML file (see examples/) or a recipe, "
                f"{' or '.join(recipe_names())}"
            )
        cfg = load_config(config, overrides)
    check_overrides(overrides, cfg.model.arch)
    return TrainPlan(cfg, run_dir, resume, checkpoint, note)


def config_to_resume(
    config: Path | None, checkpoint: Path | None, run_dir: Path | None, overrides: dict[str, Any]
) -> RunConfig:
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
        raise KneegenError(
            f"--resume: {run_dir} holds no {CONFIG}, so it is no kneegen run: give the --run-dir of one, "
            "or start a new run without --resume"
        )
    return load_config(run_dir / CONFIG, overrides)


def hardware_recipe(device: str, precision: str) -> tuple[Path | None, str]:
    """The recipe for the machine the run will use (None: the built-in defaults, on a GPU) and
    the line that announces it."""
    chosen = recipe_for(resolve_compute(device, precision, allow_fp16=True))
    if chosen is None:
        return None, "no --config: the built-in defaults (kneegen/config.py)"
    name, why = chosen
    return recipe_path(name), f"no --config: recipe {name} ({why}); another: --config {' or '.join(recipe_names())}"
