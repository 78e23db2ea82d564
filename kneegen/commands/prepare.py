"""`kneegen prepare`: slice images (or a generated phantom) → the training cache."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from kneegen.data.cache import open_cache
from kneegen.data.phantom import write_phantom
from kneegen.data.prepare import PrepareSummary, find_images, prepare_folder, refuse_to_clobber
from kneegen.errors import KneegenError
from kneegen.progress import console, progress_bar
from kneegen.viz import image_grid, save_png

CONTACT_SHEET = "contact_sheet.png"
SHEET_TILES_PER_SPLIT = 8


def prepare(
    src: Annotated[Optional[Path], typer.Argument(help="Folder of PNG/JPG slices (searched recursively).")] = None,
    out: Annotated[Path, typer.Option(help="Where the cache is written.")] = Path("data/prepared"),
    size: Annotated[str, typer.Option(help="Image size: 256 (square) or HxW, e.g. 224x256.")] = "256",
    val_fraction: Annotated[float, typer.Option(help="Fraction of patients held out for validation.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the patient split (and of the phantom).")] = 0,
    phantom: Annotated[int, typer.Option(help="Generate N synthetic knee slices and prepare them.")] = 0,
    phantom_dir: Annotated[Path, typer.Option(help="Where --phantom writes its PNGs.")] = Path("data/phantom"),
    overwrite: Annotated[bool, typer.Option(help="Replace an existing cache / phantom folder.")] = False,
) -> None:
    """Decode slices once into a memory-mapped cache with a patient-level train/val split."""
    shape = parse_size(size)
    if phantom > 0:
        src = make_phantom(phantom, phantom_dir, seed, overwrite)
    if src is None:
        raise KneegenError("give a folder of slices (kneegen prepare SRC) or --phantom N for synthetic data")
    n_files = len(find_images(src))
    with progress_bar() as progress:
        task = progress.add_task("decoding", total=n_files, status="")
        summary = prepare_folder(src, out, shape, val_fraction, seed, overwrite, lambda: progress.advance(task))
    console.print(summary_table(summary, out))
    console.print(f"contact sheet: {write_contact_sheet(out, seed)}")


def parse_size(text: str) -> tuple[int, int]:
    """"256" → (256, 256); "224x256" → (224, 256) as (H, W)."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 8:
        raise KneegenError(f"--size {text!r}: expected a size such as 256 or 224x256 (at least 8 pixels)")
    return (values[0], values[-1])


def make_phantom(n_images: int, folder: Path, seed: int, overwrite: bool) -> Path:
    """Write the phantom; with --overwrite, an earlier phantom's slices go first so none linger."""
    refuse_to_clobber(folder, overwrite, flag="--phantom-dir")
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("OAI*.png"):  # the phantom's AKOA-style names
        old.unlink()
    with progress_bar() as progress:
        task = progress.add_task("phantom", total=n_images, status="")
        write_phantom(folder, n_images, seed=seed, on_volume=lambda n: progress.advance(task, n))
    return folder


def summary_table(summary: PrepareSummary, out: Path) -> Table:
    table = Table(title=f"prepared {out}", show_header=False)
    table.add_row("images", str(summary.images))
    table.add_row("patients", str(summary.patients))
    table.add_row("size (HxW)", f"{summary.image_shape[0]}x{summary.image_shape[1]}")
    table.add_row("sides", ", ".join(f"{k} {v}" for k, v in sorted(summary.sides.items())))
    for split, count in summary.split_images.items():
        table.add_row(f"{split}", f"{count} images, {summary.split_patients[split]} patients")
    table.add_row("skipped", str(len(summary.skipped)))
    for path, reason in summary.skipped[:10]:
        table.add_row("", f"{path}: {reason}")
    return table


def write_contact_sheet(out: Path, seed: int) -> Path:
    """Random slices of each split, one row per split, to eyeball what training will see."""
    data = open_cache(out)
    rng = random.Random(seed)
    tiles = []
    for split in ("train", "val"):
        images = data.split(split)
        picks = sorted(rng.sample(range(len(images)), min(SHEET_TILES_PER_SPLIT, len(images))))
        row = [images[i] for i in picks]
        tiles += row + [images[0] * 0] * (SHEET_TILES_PER_SPLIT - len(row))
    return save_png(image_grid(tiles, columns=SHEET_TILES_PER_SPLIT), out / CONTACT_SHEET)
