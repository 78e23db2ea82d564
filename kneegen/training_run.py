"""A training run on disk: epochs of the engine, with validation, metrics, plots and checkpoints.

The engine trains; this module decides where things are written and makes sure that a run
dir is never overwritten by accident and that `--resume` continues exactly.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from kneegen.config import RunConfig, from_dict, save_config, to_dict
from kneegen.data.cache import open_cache
from kneegen.engine.checkpoint import load_checkpoint, save_checkpoint
from kneegen.engine.device import resolve_compute
from kneegen.engine.schedule import Schedule
from kneegen.engine.training import TrainState, create_state, restore_state, state_payload, train_epoch
from kneegen.engine.validation import ValidationResult, validation_loss
from kneegen.errors import KneegenError
from kneegen.progress import console, progress_bar
from kneegen.runs import BEST, LAST
from kneegen.viz import plot_losses

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
ARCHITECTURE_SECTIONS = ("model", "diffusion")  # a resumed run may not change these


def run_training(cfg: RunConfig, run_dir: Path, resume: bool) -> TrainState:
    """Train `cfg` in `run_dir` (new, or resumed from its last.pt) up to `train.epochs`."""
    data = open_cache(Path(cfg.data))
    train_images = data.split("train")
    val_images = data.split("val")[: cfg.train.val_images]
    if len(train_images) == 0 or len(val_images) == 0:
        raise KneegenError(f"{cfg.data}: the train or val split is empty; prepare the data again with more patients")
    compute = resolve_compute(cfg.device, cfg.precision)
    schedule = Schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps)
    state = create_state(cfg, data.image_shape, compute)

    # 1. A new run dir, or the state of the interrupted one.
    if resume:
        restore_state(state, resumable_checkpoint(run_dir, cfg))
        keep_metrics_up_to(run_dir / METRICS_FILE, state.epoch)
        if state.epoch >= cfg.train.epochs:
            raise KneegenError(f"{run_dir} already has {state.epoch} epochs: raise --epochs to train further")
    else:
        start_run_dir(run_dir)
    save_config(cfg, run_dir / CONFIG_FILE)
    console.print(
        f"training {cfg.model.arch} on {len(train_images)} images {data.image_shape[0]}x{data.image_shape[1]} "
        f"({compute.describe()}), validating on {len(val_images)}; run dir {run_dir}"
    )

    # 2. Epochs: train, validate, record, checkpoint.
    steps_per_epoch = -(-len(train_images) // cfg.train.batch_size)
    with progress_bar() as progress:
        task = progress.add_task(
            "training",
            total=steps_per_epoch * cfg.train.epochs,
            completed=steps_per_epoch * state.epoch,
            status="",
        )
        while state.epoch < cfg.train.epochs:
            epoch = state.epoch + 1
            started = time.perf_counter()

            def on_batch(loss: float, epoch: int = epoch) -> None:
                progress.update(task, advance=1, status=f"epoch {epoch}/{cfg.train.epochs} loss {loss:.4f}")

            losses = train_epoch(state, train_images, schedule, cfg, compute, on_batch)
            seconds = time.perf_counter() - started
            validation = None
            if epoch % cfg.train.val_every == 0 or epoch == cfg.train.epochs:
                validation = validation_loss(
                    state.eval_network, val_images, schedule, cfg.diffusion, compute,
                    cfg.train.val_timesteps, cfg.train.batch_size,
                )
            record = epoch_record(state, losses, validation, seconds, len(train_images))
            append_metrics(run_dir / METRICS_FILE, record)
            save_epoch_checkpoints(state, cfg, data.image_shape, validation, run_dir)
            refresh_plots(run_dir)
            val_text = f", val {validation.loss:.4f}" if validation else ""
            progress.console.print(
                f"epoch {epoch}: loss {record['train_loss']:.4f}{val_text}, {record['images_per_s']:.1f} img/s"
            )
    return state


def start_run_dir(run_dir: Path) -> None:
    """Create the run dir; an existing one holds someone's results and is never reused silently."""
    if run_dir.exists() and any(run_dir.iterdir()):
        raise KneegenError(f"run dir {run_dir} already exists: pass --resume to continue it, or choose another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)


def resumable_checkpoint(run_dir: Path, cfg: RunConfig) -> dict[str, Any]:
    """last.pt of `run_dir`, refusing a config that would change the network or the process."""
    path = run_dir / LAST
    if not path.is_file():
        raise KneegenError(f"--resume: {path} not found; start a new run without --resume")
    payload = load_checkpoint(path)
    saved = to_dict(from_dict(RunConfig, payload["config"], source=str(path), prefix=""))
    current = to_dict(cfg)
    changed = [
        f"{section}.{key}"
        for section in ARCHITECTURE_SECTIONS
        for key in current[section]
        if current[section][key] != saved[section][key]
    ]
    if changed:
        raise KneegenError(f"--resume: {', '.join(changed)} differ from the checkpoint's config; keep them as they were")
    return payload


def epoch_record(
    state: TrainState, losses: list[float], validation: ValidationResult | None, seconds: float, n_images: int
) -> dict[str, Any]:
    return {
        "epoch": state.epoch,
        "step": state.step,
        "train_loss": sum(losses) / len(losses),
        "train_losses": losses,
        "val_loss": validation.loss if validation else None,
        "val_buckets": dict(zip(validation.bucket_timesteps, validation.bucket_losses)) if validation else None,
        "lr": state.optimizer.param_groups[0]["lr"],
        "seconds": seconds,
        "images_per_s": n_images / seconds,
    }


def save_epoch_checkpoints(
    state: TrainState, cfg: RunConfig, image_shape: tuple[int, int], validation: ValidationResult | None, run_dir: Path
) -> None:
    """last.pt every epoch; best.pt whenever the validation loss improves."""
    improved = validation is not None and validation.loss < state.best_val_loss
    if improved:
        state.best_val_loss = validation.loss  # type: ignore[union-attr]
    payload = {**state_payload(state), "config": to_dict(cfg), "image_shape": list(image_shape)}
    save_checkpoint(payload, run_dir / LAST)
    if improved:
        save_checkpoint(payload, run_dir / BEST)


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def keep_metrics_up_to(path: Path, epoch: int) -> None:
    """Drop records of epochs after the checkpoint (written before a crash), so none repeat."""
    kept = [r for r in read_metrics(path) if r["epoch"] <= epoch]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def refresh_plots(run_dir: Path) -> None:
    plot_losses(read_metrics(run_dir / METRICS_FILE), run_dir)
