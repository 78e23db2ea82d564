"""metrics.jsonl (and TensorBoard): the records a training run writes, and reading them back.

One JSON record per line: an `epoch` record per epoch (every step's loss, the validation loss
per t-bucket, FID/KID when measured) and, with `train.log_every_steps`, `steps` records between.
A kill mid-write leaves at worst one cut line, which reading skips.
"""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch

from kneegen.engine.training import StepResult, TrainState
from kneegen.engine.validation import ValidationResult
from kneegen.evaluation.during_training import SampleQuality
from kneegen.progress import console

METRICS_FILE = "metrics.jsonl"
TENSORBOARD = "tensorboard"


class MetricsLog:
    """metrics.jsonl, one JSON record per line, and TensorBoard scalars when asked for and
    installed; written by rank 0 only."""

    SCALARS = (
        "train_loss",
        "val_loss",
        "val_psnr",
        "val_ssim",
        "fid",
        "kid",
        "lr",
        "grad_norm",
        "images_per_s",
        "skipped_steps",
        "discriminator_loss",
        "fake_score_loss",
    )

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
        console.print(
            "train.tensorboard: the tensorboard package is not installed (pip install tensorboard); "
            "writing metrics.jsonl only"
        )
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
    fake_score = state.distillation.fake_score if state.distillation is not None else None
    return {
        "kind": "epoch",
        "epoch": state.epoch,
        "step": state.step,
        "train_loss": mean_of_good(state.epoch_losses, state.epoch_skipped),
        "train_losses": [finite_or_none(loss) for loss in state.epoch_losses],
        "skipped_steps": len(state.epoch_skipped),
        "discriminator_loss": state.adversary.epoch_loss() if state.adversary is not None else None,
        "fake_score_loss": fake_score.epoch_loss() if fake_score is not None else None,
        "val_loss": validation.loss if validation else None,
        "val_buckets": dict(zip(validation.bucket_timesteps, validation.bucket_losses)) if validation else None,
        "val_psnr": validation.psnr if validation else None,
        "val_ssim": validation.ssim if validation else None,
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
    return peak_resident_mib()


def peak_resident_mib() -> float:
    """This process's peak resident memory in MiB: the kernel's VmHWM where /proc has it, which
    starts afresh with the process's own program. ru_maxrss keeps a larger parent's peak across
    exec: a memory probe spawned by a benchmark reported the benchmark's 5.6 GiB as its own."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
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
        r
        for r in read_metrics(path)
        if (r["step"] <= state.step if r.get("kind") == "steps" else r["epoch"] <= state.epoch)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
