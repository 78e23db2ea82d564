"""What a run dir shows while it trains: the loss plots and a grid of samples every few epochs."""

from __future__ import annotations

from pathlib import Path

import torch

from kneegen.engine.autoencoder import Autoencoder
from kneegen.engine.device import evaluating
from kneegen.engine.pixels import to_model_range, to_uint8
from kneegen.engine.training import TrainState
from kneegen.metrics_log import METRICS_FILE, epoch_records, read_metrics
from kneegen.run import Run
from kneegen.sampling import choose_sampler, sample_batches
from kneegen.viz import image_grid, plot_losses, save_png

PREVIEWS = "previews"
PREVIEW_SEEDS = list(range(16))  # the same images at every preview, so they show progress
RECONSTRUCTED = 8  # val slices an autoencoder's preview shows
CPU = torch.device("cpu")


def refresh_plots(run_dir: Path) -> None:
    plot_losses(epoch_records(read_metrics(run_dir / METRICS_FILE)), run_dir)


def save_preview(state: TrainState, run: Run) -> Path:
    """Samples of `PREVIEW_SEEDS` with the run's sampler settings from the weights sampling
    would use (the EMA), as one grid in previews/epoch-NNNN.png; an autoencoder's shows held-out
    slices, each above its reconstruction."""
    path = run.run_dir / PREVIEWS / f"epoch-{state.epoch:04d}.png"
    if isinstance(state.eval_network, Autoencoder):
        return save_reconstructions(state.eval_network, run, path, state.epoch)
    model = run.trained_model(state, path)
    choice = choose_sampler(model, None, None, None)
    with evaluating(model.network):
        batches = sample_batches(model, run.compute, choice, PREVIEW_SEEDS, run.cfg.sample.batch_size)
        tiles = [image for _, images in batches for image in images]
    path.parent.mkdir(parents=True, exist_ok=True)
    seeds = f"{PREVIEW_SEEDS[0]}-{PREVIEW_SEEDS[-1]}"
    save_png(image_grid(tiles), path, {"epoch": str(state.epoch), "sampler": choice.describe(), "seeds": seeds})
    return path


def save_reconstructions(network: Autoencoder, run: Run, path: Path, epoch: int) -> Path:
    """The first `RECONSTRUCTED` val slices in one row, their reconstructions in the row below."""
    originals = run.val_images[:RECONSTRUCTED]
    with evaluating(network), torch.inference_mode(), run.compute.autocast():
        x0 = to_model_range(originals, run.compute.device).to(memory_format=run.compute.memory_format)
        reconstructions = to_uint8(network.decode(network.encode(x0)))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = image_grid([*to_uint8(to_model_range(originals, CPU)), *reconstructions], columns=len(originals))
    return save_png(grid, path, {"epoch": str(epoch), "rows": "val slices, reconstructions"})
