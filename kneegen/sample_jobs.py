"""What `kneegen sample single | generate | illustrate` do, and the files each writes.

A `SampleJob` is a loaded model, a settled sampler and a fresh output folder; each image is
`{seed:06d}.png` with its seed, sampler and checkpoint in a PNG text chunk and a JSON sidecar,
so any image can be made again alone.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import Tensor

from kneegen.asked_conditions import AskedConditions, ask_conditions
from kneegen.engine.device import Compute, resolve_compute
from kneegen.engine.pixels import to_uint8
from kneegen.engine.trained import TrainedModel, load_trained_model
from kneegen.errors import KneegenError, naming
from kneegen.progress import console, progress_bar
from kneegen.provenance import WRITER, written_by_kneegen
from kneegen.runs import resolve_checkpoint
from kneegen.sampling import SamplerChoice, choose_sampler, pick_frames, sample_batches
from kneegen.viz import image_grid, save_gif, save_png

STRIP_FRAMES = 8
GIF_FRAMES = 40
GRID_TILES = 64  # images shown in grid.png
OUTPUT_SUFFIXES = (".png", ".json", ".gif", ".nii.gz")  # what sampling writes: a folder with any is taken


@dataclass(frozen=True)
class SamplerRequest:
    """The sampler options as asked for; None takes the run's own setting."""

    sampler: str | None = None
    steps: int | None = None
    eta: float | None = None
    spacing: str | None = None
    compile: bool | None = None
    autoguidance: float | None = None
    autoguidance_sigma_max: float | None = None


@dataclass(frozen=True)
class ConditionRequest:
    """What a conditional model is asked for (kneegen/asked_conditions.py); None = not asked."""

    side: str | None = None
    position: str | None = None  # one value, or a range a-b spread over the images
    guidance: float | None = None
    positions: tuple[float, ...] | None = None  # one per image, instead of `position`


@dataclass
class SampleJob:
    model: TrainedModel
    choice: SamplerChoice
    folder: Path
    compute: Compute
    conditions: AskedConditions | None = None  # row k for the job's image k

    def image_info(self, row: int) -> dict[str, str]:
        """The conditions and guidance image `row` was asked for, for its PNG text and JSON."""
        return self.conditions.describe(row) if self.conditions is not None else {}


def open_job(
    checkpoint: Path | None,
    request: SamplerRequest,
    out: Path | None,
    device: str,
    overwrite: bool,
    count: int = 1,
    wish: ConditionRequest = ConditionRequest(),
) -> SampleJob:
    """Load the model, settle the sampler and the conditions of `count` images, and make a fresh
    (or permitted) output folder; a bad sampler, step count or condition is refused before
    anything is written."""
    compute = resolve_compute(device, "auto")
    model = load_trained_model(resolve_checkpoint(checkpoint), compute)
    compile = model.config.sample.compile if request.compile is None else request.compile
    choice = choose_sampler(
        model,
        request.sampler,
        request.steps,
        request.eta,
        request.spacing,
        compile,
        request.autoguidance,
        request.autoguidance_sigma_max,
    )
    choice.timesteps(model.schedule)
    positions = None if wish.positions is None else np.asarray(wish.positions, dtype=np.float32)
    conditions = ask_conditions(model, count, wish.side, wish.position, wish.guidance, positions)
    folder = out or Path("samples") / time.strftime("%Y%m%d-%H%M%S")
    check_may_write(folder, overwrite)
    folder.mkdir(parents=True, exist_ok=True)
    asked = f", guidance {conditions.guidance:g}" if conditions is not None else ""
    console.print(
        f"sampling {model.source} (epoch {model.epoch}) with {choice.describe()}{asked} on {compute.describe()}"
    )
    return SampleJob(model, choice, folder, compute, conditions)


def check_may_write(folder: Path, overwrite: bool) -> None:
    """A folder that holds outputs is written only with --overwrite, and then only if kneegen wrote
    every one of them: a user's own image there would be replaced, or removed with a stack's slices."""
    existing = (
        sorted(path for path in folder.iterdir() if path.name.endswith(OUTPUT_SUFFIXES)) if folder.is_dir() else []
    )
    if existing and not overwrite:
        raise KneegenError(f"{folder} already holds images: choose another --out, or pass --overwrite")
    foreign = [path for path in existing if not written_by_kneegen(path)]
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise KneegenError(
            f"{foreign[0]}{more} carries no kneegen mark (another program's file, or one written by kneegen "
            "before 2026-12-06), and --overwrite replaces only kneegen's own samples: move it, or choose another --out"
        )


def sample_one(job: SampleJob, seed: int) -> Path:
    """One image; its path."""
    ((seeds, images),) = sample_batches(job.model, job.compute, job.choice, [seed], 1, conditions=job.conditions)
    return write_image(job, seeds[0], images[0], job.image_info(0))


def sample_many(job: SampleJob, seeds: list[int], batch_size: int | None) -> Path:
    """One image per seed, written batch by batch, and grid.png of the first 64; the grid's path."""
    grid_tiles: list[np.ndarray] = []
    with progress_bar() as progress:
        task = progress.add_task("sampling", total=len(seeds), status=job.choice.describe())
        batches = sample_batches(
            job.model, job.compute, job.choice, seeds, batch_size_of(job, batch_size), conditions=job.conditions
        )
        done = 0
        for batch_seeds, images in batches:
            for image_seed, image in zip(batch_seeds, images):
                write_image(job, image_seed, image, job.image_info(done))
                done += 1
            grid_tiles += list(images[: GRID_TILES - len(grid_tiles)])
            progress.advance(task, len(batch_seeds))
    return save_png(image_grid(grid_tiles), job.folder / "grid.png")


def illustrate(job: SampleJob, seeds: list[int], batch_size: int | None) -> None:
    """Per image: a strip of the noise→image process (x_t above, predicted x0 below) and a GIF."""
    n_steps = len(job.choice.timesteps(job.model.schedule))
    strip_steps, gif_steps = pick_frames(n_steps, STRIP_FRAMES), pick_frames(n_steps, GIF_FRAMES)
    frames: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # step → (x_t, x̂_0) of the current batch
    with progress_bar() as progress:
        task = progress.add_task("illustrating", total=len(seeds) * n_steps, status=job.choice.describe())

        def record(i: int, x_t: Tensor, x0: Tensor) -> None:
            if i in strip_steps or i in gif_steps:
                frames[i] = (to_uint8(x_t), to_uint8(x0))
            progress.advance(task, len(x_t))

        # Every batch visits every step, so each batch's frames replace the previous batch's.
        batches = sample_batches(
            job.model,
            job.compute,
            job.choice,
            seeds,
            batch_size_of(job, batch_size),
            on_step=record,
            conditions=job.conditions,
        )
        for batch, finals in batches:
            for b, image_seed in enumerate(batch):
                top = [frames[i][0][b] for i in strip_steps] + [finals[b]]
                bottom = [frames[i][1][b] for i in strip_steps] + [finals[b]]
                gif = [np.concatenate([frames[i][0][b], frames[i][1][b]], axis=1) for i in gif_steps]
                gif.append(np.concatenate([finals[b], finals[b]], axis=1))
                write_illustration(job.folder, image_seed, top, bottom, gif)


def batch_size_of(job: SampleJob, asked: int | None) -> int:
    return asked or job.model.config.sample.batch_size


def write_image(job: SampleJob, seed: int, image: np.ndarray, asked: dict[str, str], name: str = "") -> Path:
    """`{seed:06d}.png` (or `name`) with seed, sampler, steps and the `asked` conditions in a PNG
    text chunk and a JSON sidecar."""
    choice = job.choice
    info = {
        "seed": str(seed),
        "sampler": choice.name,
        "steps": str(choice.steps),
        "eta": str(choice.eta),
        "spacing": choice.spacing,
        "autoguidance": f"{choice.autoguidance:g}",
        "autoguidance_sigma_max": f"{choice.autoguidance_sigma_max:g}",
        "checkpoint": str(job.model.source),
        **asked,
    }
    path = save_png(image, job.folder / (name or f"{seed:06d}.png"), text=info)
    with naming(path.with_suffix(".json")):
        path.with_suffix(".json").write_text(json.dumps(info, indent=1))
    return path


def write_illustration(
    folder: Path, seed: int, top: list[np.ndarray], bottom: list[np.ndarray], gif: list[np.ndarray]
) -> None:
    """illustrate_{seed}.png: the x_t frames above, each frame's predicted x0 below; and the GIF."""
    save_png(image_grid(top + bottom, columns=len(top)), folder / f"illustrate_{seed:06d}.png")
    save_gif(gif, folder / f"illustrate_{seed:06d}.gif")


def stack_positions(slices: int) -> tuple[float, ...]:
    """Evenly spaced positions from the first slice of a stack (0) to the last (1)."""
    return tuple(np.linspace(0.0, 1.0, slices).tolist())


def sample_stack(job: SampleJob, seed: int, batch_size: int | None) -> tuple[Path, Path | None]:
    """One knee as a stack: the job's images (one per position) all from seed `seed`, written as
    `slice_{k:03d}.png` with their JSON, a grid, and `stack.nii.gz` when nibabel is installed.
    The network draws 2-D slices, so the stack is one knee only as far as a shared noise seed
    makes neighbouring positions agree; the grid shows how far that is."""
    count = len(job.conditions.values)  # type: ignore[union-attr]  # a stack always asks positions
    for old in job.folder.glob("slice_[0-9][0-9][0-9].*"):  # with --overwrite: an earlier, longer stack's slices
        if old.suffix in (".png", ".json"):  # outputs, which check_may_write found kneegen's own
            old.unlink()
    slices: list[np.ndarray] = []
    with progress_bar() as progress:
        task = progress.add_task("sampling a stack", total=count, status=job.choice.describe())
        batches = sample_batches(
            job.model,
            job.compute,
            job.choice,
            [seed] * count,
            batch_size_of(job, batch_size),
            conditions=job.conditions,
        )
        for _, images in batches:
            for image in images:
                write_image(job, seed, image, job.image_info(len(slices)), name=f"slice_{len(slices):03d}.png")
                slices.append(image)
            progress.advance(task, len(images))
    save_png(image_grid(slices, columns=min(len(slices), 8)), job.folder / "grid.png")
    return job.folder / "grid.png", write_nifti(np.stack(slices), job.folder / "stack.nii.gz")


def write_nifti(slices: np.ndarray, path: Path) -> Path | None:
    """(S, H, W) uint8 sagittal slices as a NIfTI volume in RAS with 1 mm voxels, so viewers show
    them as sagittal: slices along x (position 0 → 1 left to right), image columns along y (the
    phantom's and AKOA's anterior is to the right), rows along z bottom-up. None without nibabel."""
    try:
        import nibabel
    except ImportError:
        return None
    volume = np.ascontiguousarray(np.transpose(slices, (0, 2, 1))[:, :, ::-1])  # (S, W, H): x, y, z
    image = nibabel.Nifti1Image(volume, np.eye(4))
    image.header["descrip"] = WRITER
    nibabel.save(image, path)
    return path
