"""`kneegen prepare`: slice images (or a generated phantom) → the training cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from kneegen.commands.choices import one_of
from kneegen.data.cache import open_cache
from kneegen.data.contact_sheet import write_contact_sheet
from kneegen.data.destination import refuse_nested, refuse_to_clobber
from kneegen.data.disk import check_writable
from kneegen.data.geometry import FITS
from kneegen.data.options import PrepareOptions
from kneegen.data.phantom_folder import make_phantom
from kneegen.data.prepare import prepare_folder
from kneegen.data.splits import SplitFractions
from kneegen.data.summary import PrepareSummary, summarize
from kneegen.data.volumes import AXES
from kneegen.errors import KneegenError
from kneegen.progress import console, progress_once_started

SKIPPED_SHOWN = 10  # skipped files listed in the table; the manifest has them all


def prepare(
    ctx: typer.Context,
    src: Annotated[
        Optional[Path],
        typer.Argument(
            help="Folder of slices (PNG/JPG/TIFF) and/or volumes (NIfTI, DICOM series), searched recursively."
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Where the cache is written.")] = Path("data/prepared"),
    size: Annotated[str, typer.Option(help="Image size: 256 (square) or HxW, e.g. 224x256.")] = "256",
    fit: Annotated[
        str, typer.Option(help="pad (keep aspect, black borders), crop (keep aspect, fill) or stretch.")
    ] = "pad",
    val_fraction: Annotated[float, typer.Option(help="Fraction of patients held out for validation.")] = 0.1,
    test_fraction: Annotated[
        float, typer.Option(help="Fraction of patients held out for the final test (0: none).")
    ] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the patient split (and of the phantom).")] = 0,
    axis: Annotated[str, typer.Option(help=f"Volumes: {one_of(AXES)} slices.")] = "sagittal",
    window: Annotated[str, typer.Option(help="Volumes: intensity percentiles mapped to black and white.")] = "0.5,99.5",
    min_foreground: Annotated[
        float, typer.Option(help="Volumes: leave out slices with less foreground than this fraction.")
    ] = 0.05,
    strict: Annotated[bool, typer.Option(help="Stop at the first unreadable input instead of skipping it.")] = False,
    workers: Annotated[int, typer.Option(help="Processes decoding inputs; 0 = one per core.")] = 0,
    inspect: Annotated[Optional[Path], typer.Option(help="Print the summary of an existing cache and stop.")] = None,
    phantom: Annotated[int, typer.Option(help="Generate N synthetic knee slices and prepare them.")] = 0,
    phantom_dir: Annotated[Path, typer.Option(help="Where --phantom writes its PNGs.")] = Path("data/phantom"),
    overwrite: Annotated[bool, typer.Option(help="Replace an existing cache / phantom folder.")] = False,
) -> None:
    """Decode slices once into a memory-mapped cache with a patient-level train/val/test split."""
    if inspect is not None:
        refuse_besides_inspect(ctx, inspect)
        data = open_cache(inspect)
        console.print(summary_table(summarize(data.manifest), inspect))
        return
    options = PrepareOptions(
        size=parse_size(size),
        fit=parse_choice(fit, FITS, "--fit"),
        fractions=SplitFractions.held_out(val_fraction, test_fraction),
        seed=seed,
        axis=parse_choice(axis, AXES, "--axis"),
        percentiles=parse_window(window),
        min_foreground=min_foreground,
        strict=strict,
        workers=workers,
    )
    options.check()
    if phantom < 0:
        raise KneegenError(f"--phantom {phantom}: give a number of slices to generate")
    if phantom > 0:
        if src is not None:
            raise KneegenError(
                f"a source folder ({src}) and --phantom {phantom} conflict: give a source folder to prepare "
                "your slices, or --phantom N (without SRC) for synthetic ones"
            )
        # Everything about --out is checked before the phantom is written, not after.
        refuse_nested(phantom_dir, out, "--phantom-dir")
        refuse_to_clobber(out, overwrite)
        check_writable(out)
        src = make_phantom(phantom, phantom_dir, seed, overwrite, options.fractions)
    if src is None:
        raise KneegenError("give a folder of slices or volumes (kneegen prepare SRC) or --phantom N for synthetic data")
    with progress_once_started("reading") as on_progress:
        summary = prepare_folder(src, out, options, overwrite, on_progress)
    console.print(summary_table(summary, out))
    console.print(f"contact sheet: {write_contact_sheet(out, seed)}")


def refuse_besides_inspect(ctx: typer.Context, inspect: Path) -> None:
    """--inspect reads an existing cache and prepares nothing, so a source, --phantom or any other
    option given with it would be ignored: the user meant one of the two, and is asked which."""
    given = [
        param.opts[0] if param.param_type_name == "option" else f"SRC {ctx.params[param.name]}"
        for param in ctx.command.params
        if param.name != "inspect" and getattr(ctx.get_parameter_source(param.name), "name", "") == "COMMANDLINE"
    ]
    if given:
        raise KneegenError(
            f"--inspect {inspect} prints the summary of an existing cache and prepares nothing, so "
            f"{', '.join(given)} would be ignored: drop {'it' if len(given) == 1 else 'them'} to inspect, "
            "or drop --inspect to prepare"
        )


def parse_size(text: str) -> tuple[int, int]:
    """ "256" → (256, 256); "224x256" → (224, 256) as (H, W)."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 8:
        raise KneegenError(f"--size {text!r}: expected a size such as 256 or 224x256 (at least 8 pixels)")
    return (values[0], values[-1])


def parse_choice(text: str, choices: tuple[str, ...], flag: str) -> Any:
    if text not in choices:
        raise KneegenError(f"{flag} {text!r}: choose one of {', '.join(choices)}")
    return text


def parse_window(text: str) -> tuple[float, float]:
    """ "0.5,99.5" → (0.5, 99.5): the low and high intensity percentiles."""
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        low, high = -1.0, -1.0
    if not 0.0 <= low < high <= 100.0:
        raise KneegenError(
            f"--window {text!r}: expected two percentiles low,high with 0 <= low < high <= 100, e.g. 0.5,99.5"
        )
    return (low, high)


def summary_table(summary: PrepareSummary, out: Path) -> Table:
    """Everything a user should check before training: counts, sides, sizes, splits, skips."""
    table = Table(title=f"prepared {out}", show_header=False)
    table.add_row(
        "images",
        f"{summary.images} ({summary.dtype}, {summary.image_shape[0]}x{summary.image_shape[1]}, fit {summary.fit})",
    )
    table.add_row("patients / volumes", f"{summary.patients} / {summary.volumes}")
    table.add_row("sides", counts_text(summary.sides))
    table.add_row("sizes found", counts_text(summary.source_sizes) or "-")
    for split, counts in summary.splits.items():
        table.add_row(
            split,
            f"{counts.images} images, {counts.patients} patients, {counts.volumes} volumes "
            f"({counts_text(counts.sides) or '-'})",
        )
    table.add_row(
        "skipped", f"{len(summary.skipped)} ({counts_text(summary.skip_reasons())})" if summary.skipped else "0"
    )
    for path, reason in summary.skipped[:SKIPPED_SHOWN]:
        table.add_row("", escape(f"{path}: {reason}"))
    if len(summary.skipped) > SKIPPED_SHOWN:
        table.add_row("", f"... and {len(summary.skipped) - SKIPPED_SHOWN} more, listed in the manifest")
    return table


def counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{escape(str(key))} {value}" for key, value in sorted(counts.items()))
