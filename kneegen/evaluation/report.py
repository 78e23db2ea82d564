"""What `kneegen validate` writes and prints: report.json, its pictures and the metrics table.

Beside each checkpoint, in validation_<stem>/:
- report.json: every number, the closest sample–training pairs, and the files below;
- samples.png: the first GRID_TILES generated images, 8-bit grayscale;
- nearest.png: the CLOSEST_SHOWN samples nearest to the training set, one row each:
  sample | nearest training slice in Inception features | nearest in pixels
  (sample | nearest in pixels when the features were skipped);
- report.png: one page with the sample grid, those pairs, the loss per t bucket and the metrics.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from kneegen.errors import naming
from kneegen.evaluation.memorisation import SpaceReport, closest_samples
from kneegen.viz import image_grid, save_png

GRID_TILES = 64
CLOSEST_SHOWN = 8
SKIPPED = "skipped"


def write_report(
    out_dir: Path,
    report: dict[str, Any],
    samples: np.ndarray,
    train: np.ndarray,
    pixels: SpaceReport,
    features: SpaceReport | None,
) -> dict[str, Any]:
    """Write the report's files into `out_dir`; returns the report with their paths and the pairs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = image_grid(list(samples[:GRID_TILES]))
    pairs, closest = nearest_pairs(samples, train, pixels, features, report["seeds"][0])
    report = {
        **report,
        "closest": closest,
        "samples_png": str(save_png(grid, out_dir / "samples.png")),
        "nearest_png": str(save_png(pairs, out_dir / "nearest.png")),
        "report_png": str(out_dir / "report.png"),
    }
    with naming(out_dir / "report.json"):
        (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    save_report_figure(out_dir / "report.png", report, grid, pairs)
    return report


def nearest_pairs(
    samples: np.ndarray, train: np.ndarray, pixels: SpaceReport, features: SpaceReport | None, first_seed: int
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The closest samples beside their nearest training slices, as one image and as records."""
    spaces = {"features": features, "pixels": pixels} if features is not None else {"pixels": pixels}
    order = closest_samples(features or pixels, CLOSEST_SHOWN)
    tiles, records = [], []
    for i in order:
        tiles.append(samples[i])
        record: dict[str, Any] = {"seed": first_seed + i}
        for name, space in spaces.items():
            j = int(space.samples.index[i])
            tiles.append(np.asarray(train[j]))
            record[name] = {
                "train_index": j,
                "distance": float(space.samples.distance[i]),
                "flagged": bool(space.flagged[i]),
            }
        records.append(record)
    return image_grid(tiles, columns=1 + len(spaces)), records


def save_report_figure(path: Path, report: dict[str, Any], grid: np.ndarray, pairs: np.ndarray) -> Path:
    """One page: samples, nearest pairs, loss per t bucket and the metrics as text."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(11, 9), gridspec_kw={"height_ratios": [3, 2]})
    axes[0, 0].imshow(grid, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    axes[0, 0].set_title(f"samples ({report['sampler']})")
    columns = (
        "sample | nearest train (features) | (pixels)"
        if report["memorisation"]["features"]
        else "sample | nearest train (pixels)"
    )
    axes[0, 1].imshow(pairs, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    axes[0, 1].set_title(columns, fontsize=9)
    for ax in axes[0]:
        ax.axis("off")
    timesteps = list(report["loss_by_t"])
    axes[1, 0].bar([str(t) for t in timesteps], list(report["loss_by_t"].values()))
    axes[1, 0].set_xlabel("t")
    axes[1, 0].set_ylabel("validation loss")
    axes[1, 0].set_title(f"validation loss {report['val_loss']:.5f}")
    axes[1, 1].axis("off")
    lines = [f"{label}: {value}" for label, value in metric_rows(report, "conditions" in report)]
    axes[1, 1].text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=9)
    figure.suptitle(f"{report['checkpoint']} (epoch {report['epoch']})", fontsize=10)
    figure.tight_layout()
    with naming(path):
        figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def metric_rows(report: dict[str, Any], conditional: bool = False) -> list[tuple[str, str]]:
    """(label, text) of the headline numbers, as the table and report.png show them; with
    `conditional`, the condition checks too ("-" for a checkpoint without conditions)."""
    held_out = f"{report['held_out_images']} {report['held_out_split']}"
    rows = [
        ("FID ↓", f"{report['fid']:.2f}" if report["fid"] is not None else SKIPPED),
        ("KID ↓", f"{report['kid_mean']:.4f} ± {report['kid_std']:.4f}" if report["kid_mean"] is not None else SKIPPED),
        ("MS-SSIM samples", f"{report['ms_ssim_samples']:.3f}" if report["ms_ssim_samples"] is not None else SKIPPED),
        (
            f"MS-SSIM held-out ({held_out})",
            f"{report['ms_ssim_held_out']:.3f}" if report["ms_ssim_held_out"] is not None else SKIPPED,
        ),
        (
            "likely copies",
            f"{report['copy_fraction']:.1%} of {report['samples']} (chance ≤ {report['copy_chance']:.1%})",
        ),
    ]
    return rows + condition_rows(report.get("conditions")) if conditional else rows


def condition_rows(checks: dict[str, Any] | None) -> list[tuple[str, str]]:
    """Guidance, side accuracy and position error (samples / real held-out), FID per side."""

    def pair(key: str, form: str) -> str:
        if checks is None or checks.get(key) is None:
            return "-"
        return f"{checks[key]:{form}} / {checks[f'real_{key}']:{form}}"

    def number(key: str, form: str) -> str:
        return "-" if checks is None or checks.get(key) is None else f"{checks[key]:{form}}"

    return [
        ("guidance w", number("guidance", "g")),
        ("side accuracy (samples / real)", pair("side_accuracy", ".3f")),
        ("position error (samples / real)", pair("position_mae", ".3f")),
        ("FID left / right", f"{number('fid_left', '.2f')} / {number('fid_right', '.2f')}"),
    ]


def metrics_table(reports: list[dict[str, Any]]) -> Table:
    """One column per checkpoint: epoch, sampler, loss (overall and per t), FID, KID, MS-SSIM, copies."""
    first = reports[0]
    table = Table(
        title=(
            f"validation on {first['data']}: {first['held_out_images']} held-out ({first['held_out_split']}) images, "
            f"{first['samples']} samples per checkpoint"
        )
    )
    table.add_column("")
    for report in reports:
        table.add_column(short_name(report["checkpoint"]), justify="right")
    table.add_row("epoch", *(str(r["epoch"]) for r in reports))
    table.add_row("sampler", *(r["sampler"] for r in reports))
    table.add_row("val loss", *(f"{r['val_loss']:.5f}" for r in reports))
    timesteps = sorted({int(t) for r in reports for t in r["loss_by_t"]})
    for t in timesteps:
        table.add_row(f"  loss t={t}", *(f"{r['loss_by_t'][t]:.5f}" if t in r["loss_by_t"] else "-" for r in reports))
    conditional = any("conditions" in r for r in reports)
    for k, (label, _) in enumerate(metric_rows(first, conditional)):
        table.add_row(label, *(metric_rows(r, conditional)[k][1] for r in reports))
    return table


def short_name(checkpoint: str) -> str:
    """run_dir/best.pt: enough to tell checkpoints apart in a column header."""
    path = Path(checkpoint)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name
