"""A training run on disk: epochs of the engine, with validation, metrics, previews and checkpoints.

The engine trains; this module decides where things are written, makes sure that a run dir is
never overwritten by accident, and that `--resume` continues exactly, even from a checkpoint
written mid-epoch or after a crash. Under torchrun every process runs `run_training`; rank 0
alone validates and writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kneegen.config import RunConfig, check_ranges, from_dict, save_config, to_dict
from kneegen.data.cache import open_cache
from kneegen.engine.checkpoint import load_checkpoint, remove_partial_writes, save_checkpoint
from kneegen.engine.device import Compute, evaluating, resolve_compute
from kneegen.engine.distributed import Distributed, check_world_fits, from_environment, process_group
from kneegen.engine.memory import fit_batch_in_memory, plan_memory, processes_on_this_machine
from kneegen.engine.schedule import Schedule
from kneegen.engine.trained import TrainedModel
from kneegen.engine.training import (
    StepResult,
    TrainState,
    create_state,
    epoch_steps,
    restore_state,
    rng_states,
    state_payload,
    steps_per_epoch,
)
from kneegen.engine.validation import ValidationResult, validation_loss
from kneegen.errors import KneegenError
from kneegen.evaluation.during_training import SampleQuality, TrainingFid
from kneegen.progress import console, progress_bar
from kneegen.runs import (
    BEST,
    CONFIG,
    LAST,
    STEP_CHECKPOINTS,
    home_run_of,
    latest_run_dir,
    new_run_dir,
    resume_candidates,
    step_checkpoint,
    step_checkpoints,
)
from kneegen.interruption import Interrupted, StopRequest
from kneegen.sampling import choose_sampler, sample_batches
from kneegen.viz import image_grid, plot_losses, save_png

METRICS_FILE = "metrics.jsonl"
PREVIEWS = "previews"
TENSORBOARD = "tensorboard"
PREVIEW_SEEDS = list(range(16))  # the same images at every preview, so they show progress
ARCHITECTURE_SECTIONS = ("model", "diffusion")  # a resumed run may not change these
POSITION_KEYS = ("batch_size", "seed")  # train keys that place a mid-epoch position in the data


def run_training(
    cfg: RunConfig, run_dir: Path | None = None, resume: bool = False, checkpoint: Path | None = None,
    origin: str = "",
) -> TrainState:
    """Train `cfg` up to `train.epochs`: in a new `run_dir` (default runs/<time>), or with `resume`
    continue `run_dir` (default: the latest run) from its newest readable checkpoint, or from
    `checkpoint` (default run dir: the checkpoint's own). `origin`, a line on where the config came
    from, is printed once every check has passed."""
    check_ranges(cfg, "config")
    data = open_cache(Path(cfg.data))
    train_images = data.split("train")
    val_images = data.split("val")[: cfg.train.val_images]
    if len(train_images) == 0 or len(val_images) == 0:
        raise KneegenError(f"{cfg.data}: the train or val split is empty; prepare the data again with more patients")
    dist = from_environment()
    check_world_fits(cfg.train.batch_size, cfg.train.grad_accumulation, len(train_images), dist.world_size)
    compute = resolve_compute(cfg.device, cfg.precision, allow_fp16=True)
    torch.backends.cudnn.benchmark = compute.device.type == "cuda"  # fixed shapes: cuDNN may pick the fastest
    schedule = Schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps)

    with process_group(dist, compute) as (dist, compute):
        state = create_state(cfg, data.image_shape, compute, dist)
        plan = plan_memory(state.network, data.image_shape, compute, processes_on_this_machine())
        cfg, memory_note = dist.broadcast(fit_batch_in_memory(cfg, plan, dist.world_size) if plan else (cfg, ""))
        fid = TrainingFid(data, compute, cfg.train.fid_samples) if cfg.train.fid_every and dist.is_main else None
        # 1. A new run dir (chosen by rank 0), or the state of the interrupted run (read by all).
        if resume and run_dir is None:
            run_dir = home_run_of(checkpoint) if checkpoint else latest_run_dir()
        resumed = resume_point(run_dir, checkpoint, cfg) if resume else None
        if resumed is not None:
            path, payload, changes = resumed
            restore_state(state, payload, dist)
            if state.epoch >= cfg.train.epochs:
                raise KneegenError(f"{path} already has {state.epoch} epochs: raise --epochs to train further")
            run_dir = run_dir or Path(dist.broadcast(str(start_run_dir(new_run_dir())) if dist.is_main else None))
            if dist.is_main:
                console.print(f"resuming from {path} (epoch {state.epoch}, step {state.step}){changes}", highlight=False)
                run_dir.mkdir(parents=True, exist_ok=True)
                keep_metrics_up_to(run_dir / METRICS_FILE, state)
                for folder in (run_dir, run_dir / STEP_CHECKPOINTS):
                    remove_partial_writes(folder)
        elif resume:
            if not (run_dir / CONFIG).is_file():  # type: ignore[operator]
                raise KneegenError(f"--resume: {run_dir} holds neither a checkpoint nor a {CONFIG}: start a new run "
                                   "without --resume")
            if dist.is_main:
                console.print(f"--resume: {run_dir} has no checkpoint yet: starting it from the beginning", highlight=False)
                keep_metrics_up_to(run_dir / METRICS_FILE, state)  # type: ignore[operator]
        else:
            run_dir = Path(dist.broadcast(str(start_run_dir(run_dir or new_run_dir())) if dist.is_main else None))
        if dist.is_main:
            save_config(cfg, run_dir / CONFIG)
        processes = f", {dist.world_size} processes" if dist.enabled else ""
        with quiet_unless(dist.is_main):
            if origin:
                console.print(origin)
            if memory_note:
                console.print(memory_note, highlight=False)
            console.print(
                f"training {cfg.model.arch} on {len(train_images)} images {data.image_shape[0]}x{data.image_shape[1]} "
                f"({compute.describe()}{processes}), validating on {len(val_images)}; run dir {run_dir}"
            )
            try:
                train_epochs(state, cfg, run_dir, data.image_shape, train_images, val_images, schedule, compute, dist, fid)
            except torch.OutOfMemoryError:
                raise KneegenError(
                    f"out of {compute.device.type.upper()} memory at step {state.step} with train.batch_size "
                    f"{cfg.train.batch_size}: lower it, or raise train.grad_accumulation (same batch, less memory), "
                    f"then kneegen train --resume"
                ) from None
    return state


def train_epochs(
    state: TrainState,
    cfg: RunConfig,
    run_dir: Path,
    image_shape: tuple[int, int],
    train_images: np.ndarray,
    val_images: np.ndarray,
    schedule: Schedule,
    compute: Compute,
    dist: Distributed,
    fid: TrainingFid | None = None,
) -> None:
    """Epochs up to `train.epochs`: steps, then validation (and FID every `fid_every`), the epoch
    record, checkpoints, plots and previews. Every process steps; rank 0 alone validates and writes."""
    train = cfg.train
    per_epoch = steps_per_epoch(len(train_images), train.batch_size, dist.world_size)
    log = MetricsLog(run_dir, dist.is_main, train.tensorboard)
    with progress_bar() as progress, contextlib.closing(log), StopRequest(active=not dist.enabled) as stop:
        task = progress.add_task(
            "training",
            total=per_epoch * train.epochs,
            completed=per_epoch * state.epoch + state.batch_in_epoch,
            status="",
        )
        started = time.perf_counter()
        while state.epoch < train.epochs:
            epoch_started = window_started = time.perf_counter()
            epoch_images = window_images = 0

            # 1. Steps; a metrics record every `log_every_steps`, a checkpoint every `checkpoint_every_steps`
            #    (not at the epoch's end, which saves anyway, nor amid non-finite steps).
            for result in epoch_steps(state, train_images, schedule, cfg, compute, dist):
                epoch_images, window_images = epoch_images + result.images, window_images + result.images
                status = f"epoch {state.epoch + 1}/{train.epochs} loss {result.loss:.4f}"
                progress.update(task, advance=1, status=status)
                if every(state.step, train.log_every_steps):
                    log.write(window_record(state, result, train.log_every_steps, window_images, window_started))
                    window_started, window_images = time.perf_counter(), 0
                at_epoch_end, in_bad_streak = state.batch_in_epoch == per_epoch, state.bad_in_a_row > 0
                if every(state.step, train.checkpoint_every_steps) and not (at_epoch_end or in_bad_streak):
                    save_training_checkpoint(state, cfg, image_shape, dist, run_dir)
                if stop.requested:
                    save_training_checkpoint(state, cfg, image_shape, dist, run_dir)
                    raise Interrupted(
                        f"{stop.requested} at epoch {state.epoch + 1}, step {state.step}: saved {run_dir / LAST}; "
                        f"continue with: kneegen train --resume --run-dir {run_dir}"
                    )

            # 2. Validation on rank 0 with the EMA weights, and the epoch record.
            epoch = state.epoch
            validation = None
            if dist.is_main and (epoch % train.val_every == 0 or epoch == train.epochs):
                validation = validation_loss(
                    state.eval_network, val_images, schedule, cfg.diffusion, compute,
                    train.val_timesteps, train.batch_size,
                )
            quality = None
            if fid is not None and (every(epoch, train.fid_every) or epoch == train.epochs):
                progress.update(task, status=f"epoch {epoch}: FID of {train.fid_samples} samples")
                model = TrainedModel(state.eval_network, schedule, cfg, image_shape, epoch, run_dir)
                quality = fid.score(model)
            record = epoch_record(state, validation, time.perf_counter() - epoch_started, epoch_images, quality)
            log.write(record)

            # 3. Checkpoints (last.pt, the kept step history, best.pt on a better validation loss
            #    or FID), plots and the preview grid; then every process waits for rank 0.
            save_training_checkpoint(state, cfg, image_shape, dist, run_dir, validation, quality)
            if dist.is_main:
                refresh_plots(run_dir)
                if every(epoch, train.preview_every):
                    preview = run_dir / PREVIEWS / f"epoch-{epoch:04d}.png"
                    save_preview(state, cfg, schedule, image_shape, compute, preview)
                val_text = f", val {validation.loss:.4f}" if validation else ""
                val_text += f", FID {quality.fid:.1f}, KID {quality.kid:.4f}" if quality else ""
                train_text = "n/a" if record["train_loss"] is None else f"{record['train_loss']:.4f}"
                skipped = f", {record['skipped_steps']} steps skipped" if record["skipped_steps"] else ""
                progress.console.print(
                    f"epoch {epoch}: loss {train_text}{val_text}, lr {record['lr']:.2g}, "
                    f"{record['images_per_s']:.1f} img/s, peak memory {record['peak_memory_mb']:.0f} MiB{skipped}"
                )
            dist.barrier()

            # 4. A time budget (`train.minutes`): stop where the next epoch would pass it, as rank 0 decides.
            if train.minutes and state.epoch < train.epochs:
                now = time.perf_counter()
                if dist.broadcast(now - started + (now - epoch_started) > 60 * train.minutes):
                    progress.console.print(
                        f"stopped after epoch {state.epoch}: another would pass train.minutes = {train.minutes:g}; "
                        f"kneegen train --resume continues this run"
                    )
                    return


def every(count: int, interval: int) -> bool:
    """True at each multiple of `interval`; never when it is 0 (off)."""
    return interval > 0 and count % interval == 0


# --- the run dir -------------------------------------------------------------------------------


def start_run_dir(run_dir: Path) -> Path:
    """Create the run dir; an existing one holds someone's results and is never reused silently."""
    if run_dir.exists() and any(run_dir.iterdir()):
        raise KneegenError(
            f"run dir {run_dir} already exists: pass --resume to continue it, or choose another --run-dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


# --- checkpoints -------------------------------------------------------------------------------


def save_training_checkpoint(
    state: TrainState,
    cfg: RunConfig,
    image_shape: tuple[int, int],
    dist: Distributed,
    run_dir: Path,
    validation: ValidationResult | None = None,
    quality: SampleQuality | None = None,
) -> None:
    """Every process hands its RNG states to rank 0, which writes last.pt, the step history
    (`train.keep_checkpoints`) and best.pt when the validation loss (or, with `train.best_by:
    fid`, the FID) improved."""
    rng = dist.gather(rng_states())
    if not dist.is_main:
        return
    loss_improved = validation is not None and validation.loss < state.best_val_loss
    fid_improved = quality is not None and quality.fid < state.best_fid
    if loss_improved:
        state.best_val_loss = validation.loss  # type: ignore[union-attr]
    if fid_improved:
        state.best_fid = quality.fid  # type: ignore[union-attr]
    improved = fid_improved if cfg.train.best_by == "fid" else loss_improved
    payload = {**state_payload(state, rng), "config": to_dict(cfg), "image_shape": list(image_shape)}
    keep = cfg.train.keep_checkpoints
    paths = [run_dir / LAST]  # first: last.pt is never older than a step checkpoint
    if keep > 0:
        paths.append(step_checkpoint(run_dir, state.step))
    if improved:
        paths.append(run_dir / BEST)
    save_checkpoint(payload, *paths)
    if keep > 0:
        for stale in step_checkpoints(run_dir)[:-keep]:
            stale.unlink()


def resume_point(run_dir: Path | None, checkpoint: Path | None, cfg: RunConfig) -> tuple[Path, dict[str, Any], str] | None:
    """(path, payload, the train keys changed) of `checkpoint`, or of the newest readable
    checkpoint of `run_dir` (a truncated or corrupt one is named and skipped); None when the run
    has no checkpoint file at all, i.e. it stopped before its first. Checks that `cfg` may continue it."""
    if checkpoint is not None:
        payload = load_checkpoint(checkpoint)
        return checkpoint, payload, check_resumable(checkpoint, payload, cfg)
    assert run_dir is not None
    candidates = [path for path in resume_candidates(run_dir) if path.is_file()]
    if not candidates:
        return None
    for path in candidates:
        try:
            payload = load_checkpoint(path)
        except KneegenError as error:
            console.print(f"skipping a damaged checkpoint: {error}", highlight=False, soft_wrap=True)
            continue
        return path, payload, check_resumable(path, payload, cfg)
    raise KneegenError(
        f"--resume: every checkpoint in {run_dir} is damaged ({', '.join(p.name for p in candidates)}): "
        f"start a new run with another --run-dir"
    )


def check_resumable(path: Path, payload: dict[str, Any], cfg: RunConfig) -> str:
    """Refuse a checkpoint too old to resume, and a config that would change the network, the
    process, or (mid-epoch) the meaning of the saved position in the data; return the other
    train keys that changed (lr, epochs, …), as ", with train.lr 0.001 → 0.0005" for the log."""
    if payload["format_version"] < 2:
        raise KneegenError(
            f"{path} has checkpoint format {payload['format_version']}, which cannot be resumed exactly: "
            f"sample from it, or start a new run"
        )
    saved = to_dict(from_dict(RunConfig, payload["config"], source=str(path), prefix=""))
    current = to_dict(cfg)
    changed = [
        f"{section}.{key}"
        for section in ARCHITECTURE_SECTIONS
        for key in current[section]
        if current[section][key] != saved[section][key]
    ]
    if payload["batch_in_epoch"] > 0:
        changed += [f"train.{key}" for key in POSITION_KEYS if current["train"][key] != saved["train"][key]]
    if changed:
        raise KneegenError(f"--resume: {', '.join(changed)} differ from the config of {path}; keep them as they were")
    allowed = [f"train.{key} {saved['train'][key]} → {value}" for key, value in current["train"].items()
               if value != saved["train"][key]]
    return f", with {', '.join(allowed)}" if allowed else ""


# --- metrics, plots and previews ------------------------------------------------------------------


class MetricsLog:
    """metrics.jsonl, one JSON record per line, and TensorBoard scalars when asked for and
    installed; written by rank 0 only."""

    SCALARS = ("train_loss", "val_loss", "fid", "kid", "lr", "grad_norm", "images_per_s", "skipped_steps")

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.path = run_dir / METRICS_FILE if enabled else None
        self.writer = open_tensorboard(run_dir / TENSORBOARD) if enabled and tensorboard else None

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key in self.SCALARS:
                if isinstance(record.get(key), (int, float)):
                    self.writer.add_scalar(f"{record['kind']}/{key}", record[key], record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def open_tensorboard(folder: Path) -> Any:
    """A SummaryWriter, or None (with a note) when the tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        console.print("train.tensorboard: the tensorboard package is not installed (pip install tensorboard); "
                      "writing metrics.jsonl only")
        return None
    return SummaryWriter(str(folder))


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN or infinity: a non-finite loss is written as null."""
    return value if math.isfinite(value) else None


def mean_of_good(losses: list[float], skipped: list[int], first: int = 0) -> float | None:
    """The mean loss of the steps that updated the weights, from index `first` on."""
    good = [loss for i, loss in enumerate(losses) if i >= first and i not in skipped]
    return sum(good) / len(good) if good else None


def window_record(state: TrainState, result: StepResult, window: int, images: int, started: float) -> dict[str, Any]:
    """The last `window` steps (fewer at the start of an epoch: windows do not span epochs)."""
    first = max(0, len(state.epoch_losses) - window)
    return {
        "kind": "steps",
        "epoch": state.epoch + 1,  # the epoch in progress
        "step": state.step,
        "train_loss": mean_of_good(state.epoch_losses, state.epoch_skipped, first),
        "skipped_steps": sum(1 for i in state.epoch_skipped if i >= first),
        "lr": result.lr,
        "grad_norm": finite_or_none(result.grad_norm),
        "images_per_s": images / max(time.perf_counter() - started, 1e-9),
    }


def epoch_record(
    state: TrainState, validation: ValidationResult | None, seconds: float, images: int, quality: SampleQuality | None
) -> dict[str, Any]:
    return {
        "kind": "epoch",
        "epoch": state.epoch,
        "step": state.step,
        "train_loss": mean_of_good(state.epoch_losses, state.epoch_skipped),
        "train_losses": [finite_or_none(loss) for loss in state.epoch_losses],
        "skipped_steps": len(state.epoch_skipped),
        "val_loss": validation.loss if validation else None,
        "val_buckets": dict(zip(validation.bucket_timesteps, validation.bucket_losses)) if validation else None,
        "fid": quality.fid if quality else None,
        "kid": quality.kid if quality else None,
        "lr": state.optimizer.param_groups[0]["lr"],
        "seconds": seconds,
        "images_per_s": images / max(seconds, 1e-9),
        "peak_memory_mb": peak_memory_mb(),
    }


def peak_memory_mb() -> float:
    """The GPU's peak allocated memory on CUDA, else this process's peak resident memory."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every record of metrics.jsonl; a line cut short by a kill mid-write is left out."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def epoch_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("kind", "epoch") == "epoch"]


def keep_metrics_up_to(path: Path, state: TrainState) -> None:
    """Drop the records written after the checkpoint (before a crash), so none repeat: epoch
    records of later epochs, step records of later steps."""
    kept = [
        r for r in read_metrics(path)
        if (r["step"] <= state.step if r.get("kind") == "steps" else r["epoch"] <= state.epoch)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def refresh_plots(run_dir: Path) -> None:
    plot_losses(epoch_records(read_metrics(run_dir / METRICS_FILE)), run_dir)


def save_preview(
    state: TrainState, cfg: RunConfig, schedule: Schedule, image_shape: tuple[int, int], compute: Compute, path: Path
) -> None:
    """Samples of `PREVIEW_SEEDS` with the run's sampler settings from the weights sampling
    would use (the EMA), as one grid."""
    model = TrainedModel(state.eval_network, schedule, cfg, image_shape, state.epoch, path)
    choice = choose_sampler(model, None, None, None)
    with evaluating(model.network):
        batches = sample_batches(model, compute, choice, PREVIEW_SEEDS, cfg.sample.batch_size)
        tiles = [image for _, images in batches for image in images]
    path.parent.mkdir(parents=True, exist_ok=True)
    seeds = f"{PREVIEW_SEEDS[0]}-{PREVIEW_SEEDS[-1]}"
    save_png(image_grid(tiles), path, {"epoch": str(state.epoch), "sampler": choice.describe(), "seeds": seeds})


@contextlib.contextmanager
def quiet_unless(speaking: bool) -> Iterator[None]:
    """Silence this process's console (progress bar, messages) for the block unless it speaks
    for the run: under torchrun only rank 0 does."""
    was_quiet = console.quiet
    console.quiet = was_quiet or not speaking
    try:
        yield
    finally:
        console.quiet = was_quiet
