"""The options of the commands that start a training run (`train`, `distill`): where it goes,
what it resumes, the compute, the budget and `--set`; and how flags become config overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from kneegen.commands.choices import DEVICES, PRECISIONS
from kneegen.config import parse_override

Minutes = Annotated[
    Optional[float],
    typer.Option(
        help="Also stop at the epoch end where the next epoch would pass this, or amid a first epoch longer "
        "than it (train.minutes)."
    ),
]
RunDir = Annotated[Optional[Path], typer.Option(help="Where outputs go; default runs/<time>.")]
Resume = Annotated[
    bool,
    typer.Option(help="Continue the run in --run-dir (default: the latest run) from its newest good checkpoint."),
]
ResumeFrom = Annotated[
    Optional[Path],
    typer.Option(
        help="Continue from this run dir, or this checkpoint file (implies --resume); a checkpoint continues in its "
        "own run, or in a new or empty --run-dir."
    ),
]
Device = Annotated[Optional[str], typer.Option(help=f"{DEVICES} (device).")]
PrecisionOption = Annotated[Optional[str], typer.Option(help=f"{PRECISIONS} (precision).")]
SetOverrides = Annotated[
    Optional[list[str]], typer.Option("--set", help="Override any config key: --set train.lr=3e-4 (repeatable).")
]


def run_flags(
    epochs: int | None, minutes: float | None, data: Path | None, device: str | None, precision: str | None
) -> dict[str, Any]:
    """The shared flags as the config keys they set (None: not given)."""
    return {
        "train.epochs": epochs,
        "train.minutes": minutes,
        "data": str(data) if data else None,
        "device": device,
        "precision": precision,
    }


def run_overrides(set_: list[str] | None, flags: dict[str, Any]) -> dict[str, Any]:
    """The `--set` overrides, then the flags that were given (a flag wins over `--set`)."""
    overrides: dict[str, Any] = dict(parse_override(text) for text in set_ or [])
    overrides.update({key: value for key, value in flags.items() if value is not None})
    return overrides
