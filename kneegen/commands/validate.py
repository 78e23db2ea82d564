"""`kneegen validate [CHECKPOINT]`: the deterministic validation loss and a sample grid."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from kneegen.data.cache import open_cache
from kneegen.engine.device import resolve_compute
from kneegen.engine.trained import load_trained_model
from kneegen.engine.validation import validation_loss
from kneegen.errors import KneegenError
from kneegen.progress import console, progress_bar
from kneegen.runs import resolve_checkpoint
from kneegen.sampling import choose_sampler, sample_batches
from kneegen.viz import image_grid, save_png


def validate(
    checkpoint: Annotated[Optional[Path], typer.Argument(help="Checkpoint; default: the latest run's best.pt.")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Prepared data dir; default: the one the run trained on.")] = None,
    samples: Annotated[int, typer.Option(help="Images generated for the report's grid.")] = 16,
    sampler: Annotated[Optional[str], typer.Option(help="ddpm, ddim, dpm++2m, dpm++3m or unipc; default from the run's config.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Sampling steps.")] = None,
    seed: Annotated[int, typer.Option(help="First seed of the sample grid.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
) -> None:
    """Score a checkpoint on the held-out patients; writes report.json and samples.png beside it."""
    compute = resolve_compute(device, "auto")
    path = resolve_checkpoint(checkpoint)
    model = load_trained_model(path, compute)
    cache = open_cache(data or Path(model.config.data))
    if cache.image_shape != model.image_shape:
        raise KneegenError(
            f"{path} was trained on {model.image_shape[0]}x{model.image_shape[1]} images but {cache.root} holds "
            f"{cache.image_shape[0]}x{cache.image_shape[1]}: pass --data with a cache of the trained size"
        )
    val_images = cache.split("val")
    if len(val_images) == 0:
        raise KneegenError(f"{cache.root} has no validation split: prepare it again with --val-fraction > 0")
    batch = model.config.train.batch_size
    with progress_bar() as progress:
        task = progress.add_task("validating", total=len(val_images), status="")
        result = validation_loss(
            model.network, val_images, model.schedule, model.config.diffusion, compute,
            model.config.train.val_timesteps, batch, lambda n: progress.advance(task, n),
        )
    choice = choose_sampler(model, sampler, steps, None)
    seeds = list(range(seed, seed + samples))
    batches = sample_batches(model, compute, choice, seeds, model.config.sample.batch_size)
    tiles = [image for _, images in batches for image in images]
    out_dir = path.parent / f"validation_{path.stem}"
    out_dir.mkdir(exist_ok=True)
    grid = save_png(image_grid(tiles), out_dir / "samples.png")
    report = {
        "checkpoint": str(path), "epoch": model.epoch, "data": str(cache.root), "val_images": len(val_images),
        "val_loss": result.loss, "loss_by_t": dict(zip(result.bucket_timesteps, result.bucket_losses)),
        "sampler": choice.describe(), "samples": str(grid),
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    console.print(report_table(report, result.bucket_timesteps, result.bucket_losses))
    console.print(f"report: {out_dir / 'report.json'}; samples: {grid}")


def report_table(report: dict, timesteps: list[int], losses: list[float]) -> Table:  # type: ignore[type-arg]
    table = Table(title=f"validation of {report['checkpoint']} (epoch {report['epoch']})")
    table.add_column("t")
    table.add_column("loss", justify="right")
    for t, loss in zip(timesteps, losses):
        table.add_row(str(t), f"{loss:.5f}")
    table.add_row("[bold]all", f"[bold]{report['val_loss']:.5f}")
    return table
