"""A training run on disk: epochs of the engine, with validation, metrics, previews and checkpoints.

The engine trains; this module sets a run up (its `Run`: config, data, run dir, devices) and
drives the epochs, handing each job to its module: metrics_log (metrics.jsonl, TensorBoard),
run_checkpoints (what is saved, what `--resume` continues from), previews (plots, sample grids).
A run dir is never overwritten by accident, and `--resume` continues exactly, even from a
checkpoint written mid-epoch or after a crash. Under torchrun every process runs `run_training`;
rank 0 alone validates and writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from statistics import mean

import numpy as np
import torch

from kneegen.config import RunConfig, TrainConfig, check_ranges, save_config
from kneegen.data.cache import PreparedData, content_key, open_cache
from kneegen.data.latent_cache import open_latents
from kneegen.ema_snapshots import SNAPSHOTS, drop_snapshots_after, save_ema_snapshot
from kneegen.engine.autoencoder import Autoencoder
from kneegen.engine.checkpoint import remove_partial_writes
from kneegen.engine.device import Compute, resolve_compute
from kneegen.engine.distillation import Distillation, start_distillation
from kneegen.engine.distributed import Distributed, check_world_fits, from_environment, process_group
from kneegen.engine.latent import LatentSpace, check_latent_size, check_same_autoencoder, load_latent_space
from kneegen.engine.memory import fit_batch_in_memory, plan_memory, processes_on_this_machine
from kneegen.engine.pixels import stored_shape
from kneegen.engine.plugins import resolve_plugins
from kneegen.engine.schedule import Schedule
from kneegen.engine.training import (
    TrainState,
    create_state,
    epoch_steps,
    keep_guide,
    restore_state,
    steps_per_epoch,
    training_input_shape,
    with_noise_centre,
)
from kneegen.engine.validation import (
    ValidationResult,
    distillation_validation,
    reconstruction_validation,
    validation_loss,
)
from kneegen.errors import KneegenError
from kneegen.evaluation.during_training import TrainingFid
from kneegen.interruption import Interrupted, StopRequest
from kneegen.metrics_log import METRICS_FILE, MetricsLog, epoch_record, keep_metrics_up_to, window_record
from kneegen.previews import refresh_plots, save_preview
from kneegen.progress import console, progress_bar
from kneegen.run import Run
from kneegen.run_checkpoints import resume_command, resume_point, save_training_checkpoint
from kneegen.runs import (
    CONFIG,
    LAST,
    STEP_CHECKPOINTS,
    RunDirHold,
    check_resume_target,
    home_run_of,
    latest_run_dir,
    new_run_dir,
    start_run_dir,
)

PACE_EPOCHS = 3  # the cooldown's plan follows the mean time of this process's last epochs, not its first


def run_training(
    cfg: RunConfig,
    run_dir: Path | None = None,
    resume: bool = False,
    checkpoint: Path | None = None,
    origin: str = "",
) -> TrainState:
    """Train `cfg` up to `train.epochs`: in a new `run_dir` (default runs/<time>), or with `resume`
    continue `run_dir` (default: the latest run) from its newest readable checkpoint, or from
    `checkpoint` (default run dir: the checkpoint's own; another must be new or empty, never another
    run). `origin`, a line on where the config came from, is printed once every check has passed."""
    # 1. Everything that can be refused is checked before a file is written.
    if resume and checkpoint is not None and run_dir is not None:
        check_resume_target(checkpoint, run_dir)
    check_ranges(cfg, "config")
    cfg = resolve_plugins(cfg, "config")
    data = open_cache(Path(cfg.data))
    train_images = data.split("train")
    val_images = data.split("val")[: cfg.train.val_images]
    if len(train_images) == 0 or len(val_images) == 0:
        raise KneegenError(f"{cfg.data}: the train or val split is empty; prepare the data again with more patients")
    cfg, noise_note = with_noise_centre(cfg, train_images)
    train_conditions = known_conditions(data.split_conditions("train", cfg.model.conditions), cfg)
    val_conditions = data.split_conditions("val", cfg.model.conditions)
    dist = from_environment()
    check_world_fits(cfg.train.batch_size, cfg.train.grad_accumulation, len(train_images), dist.world_size)
    compute = resolve_compute(cfg.device, cfg.precision, allow_fp16=True)
    torch.backends.cudnn.benchmark = compute.device.type == "cuda"  # fixed shapes: cuDNN may pick the fastest

    with process_group(dist, compute) as (dist, compute), contextlib.ExitStack() as held:
        # 2. A run being resumed is held first, before this process uses the device it trains on.
        hold = RunDirHold(held, dist)
        if resume:
            run_dir = run_dir or (home_run_of(checkpoint) if checkpoint else latest_run_dir())
            if run_dir is not None and run_dir.is_dir():
                hold(run_dir)

        # 3. The network (a latent model's on its autoencoder's latents), and a batch that fits in memory.
        latent, input_shape = None, (1, *data.image_shape)
        if cfg.model.autoencoder:
            latent, cfg = open_latent_space(cfg, data.image_shape, compute)
            input_shape = latent.shape_of(data.image_shape)
        state = create_state(cfg, input_shape[1:], compute, dist, input_shape[0])
        if cfg.distill.teacher:
            state.distillation, teacher = start_distillation(state.network, cfg, compute, dist)
            if latent is not None:
                digest = (teacher.get("latent") or {}).get("digest", "none (a pixel model)")
                check_same_autoencoder(latent, digest, cfg.distill.teacher)
        shape = training_input_shape(state.network, input_shape)
        plan = plan_memory(state, shape, compute, processes_on_this_machine(), keeps_guide=cfg.train.guide_at > 0)
        cfg, memory_note = dist.broadcast(fit_batch_in_memory(cfg, plan, dist.world_size) if plan else (cfg, ""))
        fid = TrainingFid(data, compute, cfg.train.fid_samples) if cfg.train.fid_every and dist.is_main else None

        # 4. A new run dir, or the state of the interrupted run, held by this run; then the epochs.
        run_dir = open_run_dir(state, cfg, dist, run_dir, resume, checkpoint, data, hold, latent)
        if latent is not None:
            train_images, val_images = latent_splits(cfg, data, latent, compute, dist)
        run = Run(
            cfg,
            run_dir,
            data.image_shape,
            train_images,
            val_images,
            train_conditions,
            None if val_conditions is None else val_conditions[: len(val_images)],
            Schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps),
            compute,
            dist,
            fid,
            latent,
            content_key(data),
        )
        if dist.is_main:
            save_config(cfg, run_dir / CONFIG)
        processes = f", {dist.world_size} processes" if dist.enabled else ""
        with quiet_unless(dist.is_main):
            for line in (origin, noise_note, memory_note):
                if line:
                    console.print(line, highlight=False)
            where = (
                f" in the {'x'.join(map(str, stored_shape(train_images)))} latents of {latent.path}" if latent else ""
            )
            console.print(
                f"training {cfg.model.arch} on {len(train_images)} images {data.image_shape[0]}x{data.image_shape[1]}"
                f"{where} ({compute.describe()}{processes}), validating on {len(val_images)}; run dir {run_dir}"
            )
            if state.distillation is not None and state.distillation.wants_anchor:
                draw_anchor(state.distillation, input_shape, cfg.train.seed)
            try:
                train_epochs(state, run)
            except torch.OutOfMemoryError:
                raise KneegenError(
                    f"out of {compute.device.type.upper()} memory at step {state.step} with train.batch_size "
                    f"{cfg.train.batch_size}: lower it, or raise train.grad_accumulation (same batch, less memory), "
                    f"then {resume_command(state, run_dir)}"
                ) from None
            except KeyboardInterrupt:  # a second signal: stopped at once, without saving this step
                raise Interrupted(
                    f"stopped at once at step {state.step}: the last checkpoint saved is where it goes on from; "
                    f"continue with: {resume_command(state, run_dir)}"
                ) from None
    return state


def open_latent_space(cfg: RunConfig, image_shape: tuple[int, int], compute: Compute) -> tuple[LatentSpace, RunConfig]:
    """The autoencoder of `model.autoencoder`, refused when the images do not fit it and the
    denoiser; and the config with its absolute path, so the checkpoints find it from anywhere."""
    path = Path(cfg.model.autoencoder)
    space = load_latent_space(path, compute, "model.autoencoder")
    check_latent_size(space, cfg.model, image_shape, cfg.data)
    model = dataclasses.replace(cfg.model, autoencoder=str(path.resolve()))
    return space, dataclasses.replace(cfg, model=model)


def latent_splits(
    cfg: RunConfig, data: PreparedData, space: LatentSpace, compute: Compute, dist: Distributed
) -> tuple[np.ndarray, np.ndarray]:
    """The latents of the train split and of the first `train.val_images` val slices; rank 0
    encodes them first if this autoencoder has no cache of these images yet."""
    if dist.is_main:
        open_latents(data, space, compute)
    dist.barrier()
    splits = open_latents(data, space, compute)
    return splits["train"], splits["val"][: cfg.train.val_images]


def draw_anchor(distillation: Distillation, input_shape: tuple[int, ...], seed: int) -> None:
    """A dmd run's teacher pairs, drawn once before its first step with a progress bar (every
    process draws the same ones; a resumed run has them from its checkpoint)."""
    with progress_bar() as progress:
        task = progress.add_task("teacher pairs", total=distillation.anchor_pairs, status="the regression anchor")
        distillation.draw_anchor(input_shape, seed, lambda done: progress.update(task, completed=done))


def validate_epoch(state: TrainState, run: Run) -> ValidationResult:
    """The validation of the EMA weights: the diffusion loss on a fixed t grid, or an
    autoencoder's reconstruction loss, PSNR and SSIM."""
    network, train = state.eval_network, run.cfg.train
    if isinstance(network, Autoencoder):
        return reconstruction_validation(network, run.val_images, run.compute, train.batch_size)
    if state.distillation is not None:
        return distillation_validation(
            network, state.distillation, run.val_images, run.compute, train.batch_size, run.val_conditions
        )
    return validation_loss(
        network,
        run.val_images,
        run.schedule,
        run.cfg.diffusion,
        run.compute,
        train.val_timesteps,
        train.batch_size,
        conditions=run.val_conditions,
    )


def known_conditions(conditions: np.ndarray | None, cfg: RunConfig) -> np.ndarray | None:
    """The training split's conditions, refused when one the model asks for is known for no image:
    the network would only ever learn its null embedding."""
    if conditions is None:
        return None
    for column, name in enumerate(cfg.model.conditions):
        if np.isnan(conditions[:, column]).all():
            raise KneegenError(
                f"model.conditions includes {name}, but no training image in {cfg.data} has a known {name} "
                "(it comes from AKOA file names or volumes, see kneegen prepare): drop it from model.conditions"
            )
    return conditions


def open_run_dir(
    state: TrainState,
    cfg: RunConfig,
    dist: Distributed,
    run_dir: Path | None,
    resume: bool,
    checkpoint: Path | None,
    data: PreparedData,
    hold: RunDirHold,
    latent: LatentSpace | None = None,
) -> Path:
    """The run dir to write: a new one (chosen by rank 0), or with `resume` the interrupted run's,
    with `state` restored from its checkpoint (read by every process) and its metrics cut back
    to that checkpoint. A resumed run without any checkpoint yet starts from the beginning; it
    must train on `data` of the checkpoint's image shape (data prepared again since is named),
    and a latent one must have `latent`, the autoencoder its checkpoint was trained with.
    On `resume`, `run_dir` is the run being continued, as `run_training` found it (None: a
    checkpoint copied out of its run, continued in a new dir). The run dir is held (`hold`)
    before a file in it changes."""
    if not resume:
        chosen = Path(dist.broadcast(str(start_run_dir(run_dir or new_run_dir())) if dist.is_main else None))
        hold(chosen)
        return chosen
    resumed = resume_point(run_dir, checkpoint, cfg)
    if resumed is None:
        if run_dir is None or not (run_dir / CONFIG).is_file():
            raise KneegenError(
                f"--resume: {run_dir} holds neither a checkpoint nor a {CONFIG}: start a new run without --resume"
            )
        if dist.is_main:
            console.print(f"--resume: {run_dir} has no checkpoint yet: starting it from the beginning", highlight=False)
            keep_metrics_up_to(run_dir / METRICS_FILE, state)
            drop_snapshots_after(run_dir, state.step)
        return run_dir
    path, payload, changes = resumed
    image_shape = data.image_shape
    trained_on = tuple(payload.get("image_shape") or image_shape)
    if trained_on != tuple(image_shape):
        raise KneegenError(
            f"--resume: {cfg.data} holds {image_shape[0]}×{image_shape[1]} images and {path} trained on "
            f"{trained_on[0]}×{trained_on[1]}: resume with the data it trained on "
            f"(--data {payload['config'].get('data')}), or start a new run"
        )
    same_data = cfg.data == payload["config"].get("data")  # other data is named by check_resumable
    if same_data and payload.get("data_key") not in (None, content_key(data)):  # older checkpoints lack it
        changes += f"{', with' if not changes else ','} {cfg.data} prepared again since {path.name} was saved"
    if latent is not None:
        check_same_autoencoder(latent, payload["latent"]["digest"], str(path))
    restore_state(state, payload, dist, str(path))
    if state.epoch >= cfg.train.epochs:
        raise KneegenError(f"{path} already has {state.epoch} epochs: raise --epochs to train further")
    run_dir = run_dir or Path(dist.broadcast(str(start_run_dir(new_run_dir())) if dist.is_main else None))
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    hold(run_dir)  # a new dir, for a checkpoint continued elsewhere; else held already
    if dist.is_main:
        console.print(f"resuming from {path} (epoch {state.epoch}, step {state.step}){changes}", highlight=False)
        keep_metrics_up_to(run_dir / METRICS_FILE, state)
        drop_snapshots_after(run_dir, state.step)
        for folder in (run_dir, run_dir / STEP_CHECKPOINTS, run_dir / SNAPSHOTS):
            remove_partial_writes(folder)
    return run_dir


def train_epochs(state: TrainState, run: Run) -> None:
    """Epochs up to `train.epochs`: steps, then validation (and FID every `fid_every`), the epoch
    record, checkpoints, plots and previews. Every process steps; rank 0 alone validates and writes."""
    train, dist = run.cfg.train, run.dist
    per_epoch = steps_per_epoch(len(run.train_images), train.batch_size, dist.world_size)
    log = MetricsLog(run.run_dir, dist.is_main, train.tensorboard)
    with progress_bar() as progress, contextlib.closing(log), StopRequest(active=not dist.enabled) as stop:
        task = progress.add_task(
            "training",
            total=per_epoch * train.epochs,
            completed=per_epoch * state.epoch + state.batch_in_epoch,
            status="",
        )
        started = time.perf_counter()
        # The pace: times of this process's epochs after its first, which carries one-off costs.
        first_epoch, epoch_seconds = state.epoch, []
        while state.epoch < train.epochs:
            epoch_started = window_started = time.perf_counter()
            epoch_images = window_images = 0

            # 1. Steps; a metrics record every `log_every_steps`, a checkpoint every `checkpoint_every_steps`
            #    (not at the epoch's end, which saves anyway, nor amid non-finite steps).
            for result in epoch_steps(
                state, run.train_images, run.schedule, run.cfg, run.compute, dist, run.train_conditions
            ):
                epoch_images, window_images = epoch_images + result.images, window_images + result.images
                status = f"epoch {state.epoch + 1}/{train.epochs} loss {result.loss:.4f}"
                if state.distillation is not None:
                    status += f", {state.distillation.describe_round()}"
                progress.update(task, advance=1, status=status)
                if every(state.step, train.log_every_steps):
                    log.write(window_record(state, result, train.log_every_steps, window_images, window_started))
                    window_started, window_images = time.perf_counter(), 0
                at_epoch_end, in_bad_streak = state.batch_in_epoch == per_epoch, state.bad_in_a_row > 0
                if every(state.step, train.checkpoint_every_steps) and not (at_epoch_end or in_bad_streak):
                    save_training_checkpoint(state, run)
                if stop.requested:
                    save_training_checkpoint(state, run)
                    raise Interrupted(
                        f"{stop.requested} at epoch {state.epoch + 1}, step {state.step}: saved {run.run_dir / LAST}; "
                        f"continue with: {resume_command(state, run.run_dir)}"
                    )
                if past_budget_in_first_epoch(state.epoch == first_epoch, train.minutes, started, dist):
                    save_training_checkpoint(state, run)
                    progress.update(task, total=state.step)  # the run ends here: a full bar
                    progress.console.print(
                        f"stopped at epoch {state.epoch + 1}, step {state.step}: train.minutes = {train.minutes:g} "
                        f"passed before this run's first epoch ended (no validation yet); saved {run.run_dir / LAST}; "
                        f"continue with: {resume_command(state, run.run_dir)}"
                    )
                    return

            # 2. Validation on rank 0 with the EMA weights, and the epoch record.
            epoch = state.epoch
            validation = None
            if dist.is_main and (epoch % train.val_every == 0 or epoch == train.epochs):
                validation = validate_epoch(state, run)
            quality = None
            if run.fid is not None and (every(epoch, train.fid_every) or epoch == train.epochs):
                progress.update(task, status=f"epoch {epoch}: FID of {train.fid_samples} samples")
                quality = run.fid.score(run.trained_model(state, run.run_dir))
            record = epoch_record(state, validation, time.perf_counter() - epoch_started, epoch_images, quality)
            log.write(record)

            # 3. The autoguidance guide once `guide_at` of the run is done (not at its last epoch: a
            #    guide equal to the model changes nothing); checkpoints (last.pt, the kept step
            #    history, best.pt on a better validation loss or FID), plots and the preview grid;
            #    then every process waits for rank 0.
            done = run_progress(state, train, per_epoch, time.perf_counter() - started)
            if dist.is_main and train.guide_at and state.guide is None and train.guide_at <= done < 1:
                keep_guide(state)
            if dist.is_main and state.power_emas:
                save_ema_snapshot(state, run.run_dir)  # before last.pt: a resume drops what comes after it
            save_training_checkpoint(state, run, validation, quality)
            if dist.is_main:
                refresh_plots(run.run_dir)
                if every(epoch, train.preview_every):
                    save_preview(state, run)
                val_text = f", val {validation.loss:.4f}" if validation else ""
                if validation and validation.psnr is not None:
                    val_text += f" (PSNR {validation.psnr:.2f} dB, SSIM {validation.ssim:.4f})"
                val_text += f", FID {quality.fid:.1f}, KID {quality.kid:.4f}" if quality else ""
                train_text = "n/a" if record["train_loss"] is None else f"{record['train_loss']:.4f}"
                skipped = f", {record['skipped_steps']} steps skipped" if record["skipped_steps"] else ""
                if record["discriminator_loss"] is not None:
                    train_text += f" (discriminator {record['discriminator_loss']:.3f})"
                if record["fake_score_loss"] is not None:
                    train_text += f" (fake score {record['fake_score_loss']:.4f})"
                progress.console.print(
                    f"epoch {epoch}: loss {train_text}{val_text}, lr {record['lr']:.2g}, "
                    f"{record['images_per_s']:.1f} img/s, peak memory {record['peak_memory_mb']:.0f} MiB{skipped}"
                )
            dist.barrier()

            # 4. A time budget (`train.minutes`): plan the run's end from the pace of the last epochs,
            #    again after each (machines drift); with a cooldown, never later once the LR falls.
            #    Stop there, or where the next epoch would pass the budget, as rank 0 decides.
            if train.minutes and state.epoch < train.epochs:
                now = time.perf_counter()
                if state.epoch - first_epoch > 1:
                    epoch_seconds.append(now - epoch_started)
                if epoch_seconds:
                    budget_left, pace = 60 * train.minutes - (now - started), mean(epoch_seconds[-PACE_EPOCHS:])
                    plan = planned_end_step(state.epoch, train.epochs, budget_left, pace, per_epoch)
                    if train.cooldown:
                        end_step = dist.broadcast(replanned_end_step(state.end_step, state.step, train.cooldown, plan))
                        if end_step != state.end_step:
                            progress.console.print(
                                f"train.cooldown: {end_step // per_epoch} epochs fit in train.minutes; the LR falls "
                                f"to 0 from step {round(end_step * (1 - train.cooldown))} to step {end_step}"
                            )
                        state.end_step = plan = end_step
                    progress.update(task, total=plan)  # the bar's ETA: the planned end, not train.epochs
                if state.step >= state.end_step > 0:
                    progress.console.print(f"stopped after epoch {state.epoch}: the cooldown has brought the LR to 0")
                    return
                if dist.broadcast(now - started + (now - epoch_started) > 60 * train.minutes):
                    progress.update(task, total=state.step)  # the run ends here: a full bar
                    progress.console.print(
                        f"stopped after epoch {state.epoch}: another would pass train.minutes = {train.minutes:g}; "
                        f"kneegen train --resume continues this run"
                    )
                    return


def past_budget_in_first_epoch(first: bool, minutes: float, started: float, dist: Distributed) -> bool:
    """Whether the time budget has passed amid the first epoch of this process, as rank 0 sees it.
    Later epochs stop at an epoch end planned from their pace (a cut there would skip the end of
    a cooldown); an epoch longer than the whole budget (a 256² pixel model on a CPU: hours)
    has no pace to plan from, so its steps watch the clock."""
    return bool(minutes) and first and dist.broadcast(time.perf_counter() - started > 60 * minutes)


def run_progress(state: TrainState, train: TrainConfig, per_epoch: int, seconds: float) -> float:
    """The share of the run done: of its planned steps (the cooldown's plan, else `train.epochs`)
    or of its time budget, whichever limit is nearer."""
    steps = state.step / (state.end_step or per_epoch * train.epochs)
    return max(steps, seconds / (60 * train.minutes)) if train.minutes else steps


def planned_end_step(done: int, max_epochs: int, budget_left: float, epoch_seconds: float, per_epoch: int) -> int:
    """The step at which the epochs that still fit in `budget_left` seconds end, at the last epoch's pace."""
    epochs = min(max_epochs, done + max(1, int(budget_left // epoch_seconds)))
    return epochs * per_epoch


def replanned_end_step(end_step: int, step: int, cooldown: float, plan: int) -> int:
    """The cooldown's end after a new plan: the plan itself until the LR has begun to fall
    (`end_step` 0 = none yet); after that only an earlier end, so that the LR never rises again."""
    falling = end_step > 0 and step >= end_step * (1 - cooldown)
    return min(end_step, plan) if falling else plan


def every(count: int, interval: int) -> bool:
    """True at each multiple of `interval`; never when it is 0 (off)."""
    return interval > 0 and count % interval == 0


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
