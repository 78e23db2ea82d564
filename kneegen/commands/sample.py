"""`kneegen sample single | illustrate N | generate N`: new images from a trained model."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from torch import Tensor

from kneegen.engine.device import Compute, resolve_compute
from kneegen.engine.pixels import to_uint8
from kneegen.engine.samplers import SAMPLER_HELP
from kneegen.engine.trained import TrainedModel, load_trained_model
from kneegen.errors import KneegenError
from kneegen.progress import console, progress_bar
from kneegen.runs import resolve_checkpoint
from kneegen.sampling import (
    MAX_IMAGES, SamplerChoice, check_seed, choose_sampler, parse_seeds, pick_frames, sample_batches,
)
from kneegen.viz import image_grid, save_gif, save_png

STRIP_FRAMES = 8
GIF_FRAMES = 40
GRID_TILES = 64  # images shown in grid.png

app = typer.Typer(help="Generate images: single, illustrate N, generate N.", no_args_is_help=True)

Checkpoint = Annotated[Optional[Path], typer.Option(help="Checkpoint; default: the latest run's best.pt.")]
Sampler = Annotated[Optional[str], typer.Option(help=SAMPLER_HELP)]
Steps = Annotated[Optional[int], typer.Option(help="Sampling steps (ddpm: all T by default).")]
Eta = Annotated[Optional[float], typer.Option(help="DDIM stochasticity, 0 = deterministic.")]
Spacing = Annotated[Optional[str], typer.Option(help="Timesteps: auto, uniform, logsnr or karras.")]
Seed = Annotated[int, typer.Option(help="Image k uses seed S+k: same seed, same images.")]
Seeds = Annotated[Optional[str], typer.Option("--seeds", help="Exact seeds instead of N and --seed: 0-63 or 1,5,9-12.")]
Count = Annotated[Optional[int], typer.Argument(help="How many images (or give --seeds).")]
Out = Annotated[Optional[Path], typer.Option(help="Output folder; default samples/<time>.")]
BatchSize = Annotated[Optional[int], typer.Option(min=1, help="Images per network call; default sample.batch_size.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")]
Overwrite = Annotated[bool, typer.Option(help="Allow writing into a folder that already has images.")]
Compile = Annotated[Optional[bool], typer.Option(
    "--compile/--no-compile", help="torch.compile the network (slow first batch, faster after); default sample.compile.")]


@app.command()
def single(
    checkpoint: Checkpoint = None, sampler: Sampler = None, steps: Steps = None, eta: Eta = None,
    spacing: Spacing = None,
    seed: Seed = 0, out: Out = None, device: Device = "auto", overwrite: Overwrite = False, compile: Compile = None,
) -> None:
    """Generate one image and print its path."""
    check_seed(seed, "--seed")
    model, choice, folder, compute = setup(checkpoint, sampler, steps, eta, spacing, compile, out, device, overwrite)
    (seeds, images), = sample_batches(model, compute, choice, [seed], 1)
    print(write_image(folder, seeds[0], images[0], choice, model))


@app.command()
def generate(
    n: Count = None,
    checkpoint: Checkpoint = None, sampler: Sampler = None, steps: Steps = None, eta: Eta = None,
    spacing: Spacing = None,
    seed: Seed = 0, seeds_: Seeds = None, out: Out = None, batch_size: BatchSize = None,
    device: Device = "auto", overwrite: Overwrite = False, compile: Compile = None,
) -> None:
    """Generate N images, written batch by batch, plus a grid of the first 64."""
    seeds = image_seeds(n, seed, seeds_)
    model, choice, folder, compute = setup(checkpoint, sampler, steps, eta, spacing, compile, out, device, overwrite)
    batch_size = batch_size or model.config.sample.batch_size
    grid_tiles: list[np.ndarray] = []
    started = time.perf_counter()
    with progress_bar() as progress:
        task = progress.add_task("sampling", total=len(seeds), status=choice.describe())
        for batch_seeds, images in sample_batches(model, compute, choice, seeds, batch_size):
            for image_seed, image in zip(batch_seeds, images):
                write_image(folder, image_seed, image, choice, model)
            grid_tiles += list(images[: GRID_TILES - len(grid_tiles)])
            progress.advance(task, len(batch_seeds))
    save_png(image_grid(grid_tiles), folder / "grid.png")
    seconds = time.perf_counter() - started
    console.print(f"{len(seeds)} images in {folder} ({seconds:.1f} s, {seconds / len(seeds):.2f} s/image); grid: {folder / 'grid.png'}")


@app.command()
def illustrate(
    n: Count = None,
    checkpoint: Checkpoint = None, sampler: Sampler = None, steps: Steps = None, eta: Eta = None,
    spacing: Spacing = None,
    seed: Seed = 0, seeds_: Seeds = None, out: Out = None, batch_size: BatchSize = None,
    device: Device = "auto", overwrite: Overwrite = False, compile: Compile = None,
) -> None:
    """Per image: a strip of the noise→image process (x_t above, predicted x0 below) and a GIF."""
    seeds = image_seeds(n, seed, seeds_)
    model, choice, folder, compute = setup(checkpoint, sampler, steps, eta, spacing, compile, out, device, overwrite)
    n_steps = len(choice.timesteps(model.schedule))
    strip_steps, gif_steps = pick_frames(n_steps, STRIP_FRAMES), pick_frames(n_steps, GIF_FRAMES)
    batch_size = batch_size or model.config.sample.batch_size
    frames: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # step → (x_t, x̂_0) of the current batch
    with progress_bar() as progress:
        task = progress.add_task("illustrating", total=len(seeds) * n_steps, status=choice.describe())

        def record(i: int, x_t: Tensor, x0: Tensor) -> None:
            if i in strip_steps or i in gif_steps:
                frames[i] = (to_uint8(x_t), to_uint8(x0))
            progress.advance(task, len(x_t))

        # Every batch visits every step, so each batch's frames replace the previous batch's.
        batches = sample_batches(model, compute, choice, seeds, batch_size, on_step=record)
        for batch, finals in batches:
            for b, image_seed in enumerate(batch):
                write_illustration(folder, image_seed, b, frames, finals[b], strip_steps, gif_steps)
    console.print(f"{len(seeds)} illustrations (strip PNG + GIF each) in {folder}")


def setup(
    checkpoint: Path | None, sampler: str | None, steps: int | None, eta: float | None,
    spacing: str | None, compile: bool | None, out: Path | None, device: str, overwrite: bool,
) -> tuple[TrainedModel, SamplerChoice, Path, Compute]:
    """Load the model, settle the sampler and make a fresh (or permitted) output folder."""
    compute = resolve_compute(device, "auto")
    model = load_trained_model(resolve_checkpoint(checkpoint), compute)
    choice = choose_sampler(model, sampler, steps, eta, spacing, model.config.sample.compile if compile is None else compile)
    choice.timesteps(model.schedule)  # refuse a bad --sampler or --steps before anything is written
    folder = out or Path("samples") / time.strftime("%Y%m%d-%H%M%S")
    if folder.is_dir() and any(folder.glob("*.png")) and not overwrite:
        raise KneegenError(f"{folder} already holds images: choose another --out, or pass --overwrite")
    folder.mkdir(parents=True, exist_ok=True)
    console.print(f"sampling {model.source} (epoch {model.epoch}) with {choice.describe()} on {compute.describe()}")
    return model, choice, folder, compute


def image_seeds(n: int | None, seed: int, seeds: str | None) -> list[int]:
    """The seeds of the images to make: --seeds as given, else N seeds from --seed on."""
    if seeds is not None:
        chosen = parse_seeds(seeds)
        if n is not None and n != len(chosen):
            raise KneegenError(f"N = {n} but --seeds {seeds} names {len(chosen)} seeds: give one of them")
        return chosen
    if n is None:
        raise KneegenError("say how many images (e.g. generate 16) or which seeds (--seeds 0-15)")
    if not 1 <= n <= MAX_IMAGES:
        raise KneegenError(f"N = {n}: ask for 1 to {MAX_IMAGES:,} images")
    check_seed(seed, "--seed")
    check_seed(seed + n - 1, f"--seed {seed} with N = {n}")
    return list(range(seed, seed + n))


def write_image(folder: Path, seed: int, image: np.ndarray, choice: SamplerChoice, model: TrainedModel) -> Path:
    """`{seed:06d}.png` with seed, sampler and steps in a PNG text chunk and a JSON sidecar."""
    info = {"seed": str(seed), "sampler": choice.name, "steps": str(choice.steps), "eta": str(choice.eta),
            "spacing": choice.spacing,
            "checkpoint": str(model.source)}
    path = save_png(image, folder / f"{seed:06d}.png", text=info)
    path.with_suffix(".json").write_text(json.dumps(info, indent=1))
    return path


def write_illustration(
    folder: Path, seed: int, b: int, frames: dict[int, tuple[np.ndarray, np.ndarray]], final: np.ndarray,
    strip_steps: list[int], gif_steps: list[int],
) -> None:
    """Strip: x_t frames then the final image on top, the predicted x0 of each frame below."""
    top = [frames[i][0][b] for i in strip_steps] + [final]
    bottom = [frames[i][1][b] for i in strip_steps] + [final]
    save_png(image_grid(top + bottom, columns=len(top)), folder / f"illustrate_{seed:06d}.png")
    gif = [np.concatenate([frames[i][0][b], frames[i][1][b]], axis=1) for i in gif_steps]
    gif.append(np.concatenate([final, final], axis=1))
    save_gif(gif, folder / f"illustrate_{seed:06d}.gif")
