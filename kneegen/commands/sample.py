"""`kneegen sample single | illustrate N | generate N`: new images from a trained model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from kneegen.commands.choices import DEVICES, SPACINGS, sampler_help
from kneegen.errors import KneegenError
from kneegen.progress import console
from kneegen.sample_jobs import (
    ConditionRequest,
    SamplerRequest,
    open_job,
    sample_many,
    sample_one,
    sample_stack,
    stack_positions,
)
from kneegen.sample_jobs import illustrate as illustrate_job
from kneegen.sampling import MAX_IMAGES, check_seed, parse_seeds

app = typer.Typer(help="Generate images: single, illustrate N, generate N, stack.", no_args_is_help=True)

Checkpoint = Annotated[Optional[Path], typer.Option(help="Checkpoint; default: the latest run's best.pt.")]
Sampler = Annotated[Optional[str], typer.Option(help=sampler_help())]
Steps = Annotated[Optional[int], typer.Option(help="Sampling steps (ddpm: all T by default).")]
Eta = Annotated[Optional[float], typer.Option(help="DDIM stochasticity, 0 = deterministic.")]
Spacing = Annotated[Optional[str], typer.Option(help=f"Timesteps: {SPACINGS}.")]
Seed = Annotated[int, typer.Option(help="Image k uses seed S+k: same seed, same images.")]
Seeds = Annotated[Optional[str], typer.Option("--seeds", help="Exact seeds instead of N and --seed: 0-63 or 1,5,9-12.")]
Count = Annotated[Optional[int], typer.Argument(help="How many images (or give --seeds).")]
Out = Annotated[Optional[Path], typer.Option(help="Output folder; default samples/<time>.")]
BatchSize = Annotated[Optional[int], typer.Option(min=1, help="Images per network call; default sample.batch_size.")]
Device = Annotated[str, typer.Option(help=f"{DEVICES}.")]
Overwrite = Annotated[bool, typer.Option(help="Allow writing into a folder that already has images.")]
Side = Annotated[Optional[str], typer.Option(help="A conditional model's knee side: left or right.")]
Position = Annotated[
    Optional[str],
    typer.Option(help="A conditional model's slice position, 0 (first of the stack) to 1, or a range 0.3-0.7."),
]
Guidance = Annotated[
    Optional[float],
    typer.Option(
        help="Classifier-free guidance w: 0 unconditional, 1 conditional, >1 stronger; default sample.guidance."
    ),
]
Autoguidance = Annotated[
    Optional[float],
    typer.Option(
        help="Autoguidance w away from the run's guide (train.guide_at): 1 off, 2 typical; default sample.autoguidance."
    ),
]
AutoguidanceSigmaMax = Annotated[
    Optional[float],
    typer.Option(
        help="Autoguide only at noise levels sigma <= this (inf: every step); default sample.autoguidance_sigma_max."
    ),
]
Compile = Annotated[
    Optional[bool],
    typer.Option(
        "--compile/--no-compile",
        help="torch.compile the network (slow first batch, faster after); default sample.compile.",
    ),
]


@app.command()
def single(
    checkpoint: Checkpoint = None,
    sampler: Sampler = None,
    steps: Steps = None,
    eta: Eta = None,
    spacing: Spacing = None,
    seed: Seed = 0,
    out: Out = None,
    device: Device = "auto",
    overwrite: Overwrite = False,
    compile: Compile = None,
    autoguidance: Autoguidance = None,
    autoguidance_sigma_max: AutoguidanceSigmaMax = None,
    side: Side = None,
    position: Position = None,
    guidance: Guidance = None,
) -> None:
    """Generate one image and print its path."""
    check_seed(seed, "--seed")
    request = SamplerRequest(sampler, steps, eta, spacing, compile, autoguidance, autoguidance_sigma_max)
    job = open_job(checkpoint, request, out, device, overwrite, 1, ConditionRequest(side, position, guidance))
    print(sample_one(job, seed))


@app.command()
def generate(
    n: Count = None,
    checkpoint: Checkpoint = None,
    sampler: Sampler = None,
    steps: Steps = None,
    eta: Eta = None,
    spacing: Spacing = None,
    seed: Seed = 0,
    seeds_: Seeds = None,
    out: Out = None,
    batch_size: BatchSize = None,
    device: Device = "auto",
    overwrite: Overwrite = False,
    compile: Compile = None,
    autoguidance: Autoguidance = None,
    autoguidance_sigma_max: AutoguidanceSigmaMax = None,
    side: Side = None,
    position: Position = None,
    guidance: Guidance = None,
) -> None:
    """Generate N images, written batch by batch, plus a grid of the first 64."""
    seeds = image_seeds(n, seed, seeds_)
    request = SamplerRequest(sampler, steps, eta, spacing, compile, autoguidance, autoguidance_sigma_max)
    wish = ConditionRequest(side, position, guidance)
    job = open_job(checkpoint, request, out, device, overwrite, len(seeds), wish)
    started = time.perf_counter()
    grid = sample_many(job, seeds, batch_size)
    seconds = time.perf_counter() - started
    console.print(
        f"{len(seeds)} images in {job.folder} ({seconds:.3f} s, {seconds / len(seeds):.3f} s/image); grid: {grid}"
    )


@app.command()
def illustrate(
    n: Count = None,
    checkpoint: Checkpoint = None,
    sampler: Sampler = None,
    steps: Steps = None,
    eta: Eta = None,
    spacing: Spacing = None,
    seed: Seed = 0,
    seeds_: Seeds = None,
    out: Out = None,
    batch_size: BatchSize = None,
    device: Device = "auto",
    overwrite: Overwrite = False,
    compile: Compile = None,
    autoguidance: Autoguidance = None,
    autoguidance_sigma_max: AutoguidanceSigmaMax = None,
    side: Side = None,
    position: Position = None,
    guidance: Guidance = None,
) -> None:
    """Per image: a strip of the noise→image process (x_t above, predicted x0 below) and a GIF."""
    seeds = image_seeds(n, seed, seeds_)
    request = SamplerRequest(sampler, steps, eta, spacing, compile, autoguidance, autoguidance_sigma_max)
    wish = ConditionRequest(side, position, guidance)
    job = open_job(checkpoint, request, out, device, overwrite, len(seeds), wish)
    illustrate_job(job, seeds, batch_size)
    console.print(f"{len(seeds)} illustrations (strip PNG + GIF each) in {job.folder}")


@app.command()
def stack(
    slices: Annotated[int, typer.Option(min=2, max=1024, help="Slices from position 0 to 1.")] = 24,
    side: Side = None,
    guidance: Guidance = None,
    seed: Annotated[int, typer.Option(help="One seed for every slice, so they share one noise.")] = 0,
    checkpoint: Checkpoint = None,
    sampler: Sampler = None,
    steps: Steps = None,
    eta: Eta = None,
    spacing: Spacing = None,
    out: Out = None,
    batch_size: BatchSize = None,
    device: Device = "auto",
    overwrite: Overwrite = False,
    compile: Compile = None,
    autoguidance: Autoguidance = None,
    autoguidance_sigma_max: AutoguidanceSigmaMax = None,
) -> None:
    """One knee as a stack of slices at positions 0 to 1 (a model conditioned on position): PNGs,
    a grid and a NIfTI volume (with the volumes extra)."""
    check_seed(seed, "--seed")
    request = SamplerRequest(sampler, steps, eta, spacing, compile, autoguidance, autoguidance_sigma_max)
    wish = ConditionRequest(side, None, guidance, stack_positions(slices))
    job = open_job(checkpoint, request, out, device, overwrite, slices, wish)
    grid, volume = sample_stack(job, seed, batch_size)
    nifti = (
        f"; volume: {volume}" if volume else "; no NIfTI volume: nibabel is missing (pip install 'kneegen[volumes]')"
    )
    console.print(f"{slices} slices in {job.folder}; grid: {grid}{nifti}")


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
