"""`kneegen ema [RUN_DIR] --lengths 0.03,0.05,0.1`: EMA lengths chosen after training, by FID."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from kneegen.commands.choices import DEVICES
from kneegen.ema_snapshots import choose_ema_length, posthoc_path, snapshot_run
from kneegen.engine.device import resolve_compute
from kneegen.errors import KneegenError
from kneegen.progress import console

DEFAULT_LENGTHS = "0.03,0.05,0.07,0.10,0.15,0.20"


def ema(
    run_dir: Annotated[
        Optional[Path], typer.Argument(help="A run trained with train.ema_snapshots; default: the latest.")
    ] = None,
    lengths: Annotated[
        str, typer.Option(help="EMA lengths σ_rel to mix (fraction of training averaged, EDM2).")
    ] = DEFAULT_LENGTHS,
    samples: Annotated[int, typer.Option(help="Images per length for its FID against the val split.")] = 256,
    device: Annotated[str, typer.Option(help=f"{DEVICES}.")] = "auto",
) -> None:
    """Mix the run's EMA snapshots into checkpoints of other EMA lengths (ema-σ.pt) and rank them by FID."""
    sigma_rels = parse_lengths(lengths)
    run_dir = snapshot_run(run_dir)
    results = choose_ema_length(run_dir, sigma_rels, resolve_compute(device, "auto"), samples)
    table = Table(title=f"post-hoc EMA of {escape(str(run_dir))}, FID of {samples} samples vs the val split")
    for column in ("σ_rel", "FID", "KID", "checkpoint"):
        table.add_column(column)
    best = min(results, key=lambda result: result.quality.fid)
    for result in results:
        mark = " (best)" if result is best else ""
        table.add_row(
            f"{result.sigma_rel:g}{mark}",
            f"{result.quality.fid:.2f}",
            f"{result.quality.kid:.4f}",
            escape(str(result.path)),
        )
    console.print(table)
    console.print(f"best: kneegen sample generate 64 --checkpoint {escape(str(best.path))}", highlight=False)


def parse_lengths(text: str) -> list[float]:
    """ "0.05,0.1" → [0.05, 0.1]; the range is checked where each length is used. A length given
    twice (0.05,0.050), or two that name one ema-σ.pt, is mixed and scored once."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values:
        raise KneegenError(f"--lengths {text!r}: give EMA lengths as fractions of training, e.g. 0.05,0.1")
    distinct: dict[str, float] = {}
    for value in values:
        distinct.setdefault(posthoc_path(Path(), value).name, value)
    return list(distinct.values())
