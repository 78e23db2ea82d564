"""Power-EMA snapshots of a training run (`train.ema_snapshots`), and EMA lengths mixed from them
after training (EDM2's post-hoc EMA): one run gives any EMA length, each judged by FID.

At every epoch end the run stores its two power EMAs (σ_rel 0.05 and 0.10) in
ema_snapshots/step-NNNNNNNN.pt. `kneegen ema RUN` then solves, per asked σ_rel, the mix of all
snapshots whose averaging profile is closest to that EMA's at the last step, writes it as a
checkpoint `ema-0.070.pt` beside last.pt (sampled and validated as any other), and scores each by
FID on the val split so the best length is picked by sample quality, not by loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kneegen.data.cache import open_trained_on
from kneegen.engine.checkpoint import load_checkpoint, save_checkpoint
from kneegen.engine.device import Compute
from kneegen.engine.posthoc_ema import MAX_SIGMA_REL, Snapshot, combine, gamma_of, reconstruction_weights
from kneegen.engine.trained import load_trained_model
from kneegen.engine.training import TrainState
from kneegen.errors import KneegenError
from kneegen.evaluation.during_training import SampleQuality, TrainingFid
from kneegen.evaluation.kid import MIN_IMAGES
from kneegen.progress import progress_bar
from kneegen.run_checkpoints import resume_command
from kneegen.runs import LAST, RUNS_ROOT, newest_run_dir, run_dir_of

SNAPSHOTS = "ema_snapshots"
STORED_DTYPE = torch.float16  # halves the disk; its rounding (~5e-4 relative) is far below what EMA lengths change


@dataclass
class PosthocResult:
    sigma_rel: float
    path: Path
    quality: SampleQuality


def snapshot_paths(run_dir: Path) -> list[Path]:
    """The run's snapshots, oldest first (the step is in the name, zero-padded)."""
    return sorted((run_dir / SNAPSHOTS).glob("step-*.pt"))


def save_ema_snapshot(state: TrainState, run_dir: Path) -> None:
    """The power EMAs of `state` at its step, as ema_snapshots/step-NNNNNNNN.pt."""
    payload = {
        "step": state.step,
        "sigma_rels": [power.sigma_rel for power in state.power_emas],
        "power_emas": [
            {
                name: tensor.to(STORED_DTYPE) if tensor.is_floating_point() else tensor
                for name, tensor in power.model.state_dict().items()
            }
            for power in state.power_emas
        ],
    }
    save_checkpoint(payload, run_dir / SNAPSHOTS / f"step-{state.step:08d}.pt", then=resume_command(state, run_dir))


def drop_snapshots_after(run_dir: Path, step: int) -> None:
    """Resuming at `step` retrains what came after it: its snapshots would otherwise count twice."""
    for path in snapshot_paths(run_dir):
        if int(path.stem.split("-")[1]) > step:
            path.unlink()


def posthoc_payload(run_dir: Path, sigma_rel: float) -> dict[str, Any]:
    """last.pt with its EMA weights replaced by the post-hoc EMA of `sigma_rel` at the last snapshot."""
    gamma_of(sigma_rel)  # refuses an impossible length before anything is read
    paths = snapshot_paths(run_dir)
    if not paths:
        raise KneegenError(
            f"{run_dir} has no {SNAPSHOTS}/: train with --set train.ema_snapshots=true to use kneegen ema"
        )
    snapshots, state_dicts = [], []
    for path in paths:
        stored = load_checkpoint(path)
        for snapshot_sigma, state_dict in zip(stored["sigma_rels"], stored["power_emas"]):
            snapshots.append(Snapshot(stored["step"], snapshot_sigma))
            state_dicts.append(state_dict)
    step = snapshots[-1].step
    base = load_checkpoint(run_dir / LAST)
    if base["step"] != step:
        raise KneegenError(
            f"{run_dir / LAST} is at step {base['step']} but the last snapshot at {step}: "
            "finish the epoch with kneegen train --resume first"
        )
    weights = reconstruction_weights(snapshots, step, sigma_rel)
    averaged = combine(state_dicts, weights)
    model_dtypes = {name: tensor.dtype for name, tensor in base["model"].items()}
    ema = {name: tensor.to(model_dtypes[name]) for name, tensor in averaged.items()}
    return {**base, "ema": ema, "posthoc_ema": {"sigma_rel": sigma_rel, "step": step, "snapshots": len(snapshots)}}


def snapshot_run(argument: Path | None, root: Path = RUNS_ROOT) -> Path:
    """The run `kneegen ema` mixes: RUN_DIR, or the latest run under `root`; refused, naming what
    `ema` wants, when it is missing, a file, or holds no snapshots."""
    wanted = "give RUN_DIR, the folder of a run trained with --set train.ema_snapshots=true"
    if argument is None:
        run_dir = newest_run_dir(root)
        if run_dir is None:
            raise KneegenError(f"kneegen ema: no run found under {root}/: {wanted}")
    elif not argument.exists():
        raise KneegenError(f"kneegen ema: run dir {argument} not found: {wanted}")
    elif not argument.is_dir():
        raise KneegenError(
            f"kneegen ema: {argument} is a file, not a run dir: give the run dir that holds it, "
            f"{run_dir_of(argument)}, if it was trained with --set train.ema_snapshots=true"
        )
    else:
        run_dir = argument
    if not snapshot_paths(run_dir):
        raise KneegenError(
            f"kneegen ema: {run_dir} has no {SNAPSHOTS}/: give a run trained with --set train.ema_snapshots=true, "
            "or train one"
        )
    return run_dir


def posthoc_path(run_dir: Path, sigma_rel: float) -> Path:
    """Where `kneegen ema` writes the checkpoint of `sigma_rel`: beside last.pt, named by its length."""
    return run_dir / f"ema-{sigma_rel:.3f}.pt"


def check_ema_request(run_dir: Path, sigma_rels: list[float], samples: int) -> None:
    """The flags of `kneegen ema`, checked before a snapshot is read or a checkpoint written; an
    ema-σ.pt already there is refused, since it may be one the user has sampled or validated."""
    for sigma_rel in sigma_rels:
        if not 0 < sigma_rel <= MAX_SIGMA_REL:
            raise KneegenError(
                f"--lengths: {sigma_rel:g} is no EMA length: give fractions of training in (0, {MAX_SIGMA_REL:.4f}], "
                "e.g. 0.05,0.1"
            )
        if posthoc_path(run_dir, sigma_rel).exists():
            raise KneegenError(
                f"kneegen ema: {posthoc_path(run_dir, sigma_rel)} already exists and is never replaced: "
                f"move it away, or leave {sigma_rel:g} out of --lengths"
            )
    if samples < MIN_IMAGES:
        raise KneegenError(
            f"--samples {samples}: FID/KID need at least {MIN_IMAGES} samples per EMA length: "
            f"give --samples {MIN_IMAGES} or more"
        )


def choose_ema_length(run_dir: Path, sigma_rels: list[float], compute: Compute, samples: int) -> list[PosthocResult]:
    """Write ema-σ.pt for each σ_rel and score its samples by FID/KID against the val split; every
    check (the flags, the snapshots, the FID's data and weights) comes before the first write."""
    check_ema_request(run_dir, sigma_rels, samples)
    results = []
    with progress_bar() as progress:
        task = progress.add_task("post-hoc EMA", total=len(sigma_rels), status="")
        fid: TrainingFid | None = None
        for done, sigma_rel in enumerate(sigma_rels):
            progress.update(task, status=f"σ_rel {sigma_rel:g}")
            payload = posthoc_payload(run_dir, sigma_rel)
            fid = fid or TrainingFid(
                open_trained_on(payload["config"]["data"], run_dir / LAST),
                compute,
                samples,
                asked_by="kneegen ema",
                samples_flag="--samples",
            )
            path = posthoc_path(run_dir, sigma_rel)
            save_checkpoint(
                {k: v for k, v in payload.items() if k not in ("format", "format_version")},
                path,
                then=f"kneegen ema {run_dir} --lengths {','.join(f'{rest:g}' for rest in sigma_rels[done:])}",
            )
            model = load_trained_model(path, compute)
            results.append(PosthocResult(sigma_rel, path, fid.score(model)))
            progress.advance(task)
    return results
