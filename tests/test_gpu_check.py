"""benchmarks/gpu_check.py, the GPU check, run to the end on the CPU with tiny networks and sizes: every
phase succeeds and its row of the table holds the numbers that phase measures."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kneegen.engine.samplers import DISTILLED, sampler_names

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
TINY = ["--device", "cpu", "--tiny", "--size", "32", "--phantom", "60", "--images", "8", "--steps", "4"]
COLUMNS = ("wall_s", "step_s", "img/s", "peak_MiB", "TFLOP/s", "%peak")  # the numbers, between phase and status
TRAINING_ROWS = ("train:pixel", "train:autoencoder", "train:latent", "resume:latent", "distill:latent")


def table(output: str) -> dict[str, dict[str, str]]:
    """The final table's rows by phase: each column's cell, the status and the note."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("phase "))
    rows = {}
    for line in lines[start + 1 :]:
        if line.startswith("total "):
            break
        phase, *cells = line.split(maxsplit=len(COLUMNS) + 2)
        rows[phase] = {**dict(zip(COLUMNS, cells)), "status": cells[len(COLUMNS)], "note": cells[-1]}
    return rows


def positive(cell: str) -> bool:
    return math.isfinite(float(cell)) and float(cell) > 0


@pytest.mark.slow
def test_the_gpu_check_runs_every_phase_on_the_cpu(tmp_path):
    work = tmp_path / "work"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY, "--work", str(work)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    first, second = result.stdout.splitlines()[:2]
    assert first.startswith("reproduce: ") and "gpu_check.py --device cpu --tiny" in first
    assert second == f"work dir: {work.resolve()}"
    assert "device: " in result.stdout and "bf16" in result.stdout

    rows = table(result.stdout)
    samples = [f"sample:latent:{name}" for name in sampler_names() if name != DISTILLED]
    expected = ["matmul", "prepare", *TRAINING_ROWS, *samples, "sample:pixel", "sample:distilled", "validate:latent"]
    assert list(rows) == expected
    for phase, row in rows.items():
        assert row["status"] == "ok", (phase, row)
        assert positive(row["wall_s"]), (phase, row)
    assert positive(rows["matmul"]["TFLOP/s"]) and float(rows["matmul"]["%peak"]) == 100
    for phase in TRAINING_ROWS:
        assert all(positive(rows[phase][column]) for column in COLUMNS), (phase, rows[phase])
        assert rows[phase]["note"].startswith("batch 4, 5 steps")  # 20 training slices, none in a partial batch
    for phase in [*samples, "sample:pixel"]:
        assert positive(rows[phase]["img/s"]), (phase, rows[phase])
        assert rows[phase]["note"].startswith("8 images, 4 steps")
    assert positive(rows["sample:distilled"]["img/s"]) and rows["sample:distilled"]["note"].startswith(
        "8 images, 2 steps"
    )
    assert "val loss" in rows["validate:latent"]["note"]
    assert (work / "logs" / "validate-latent.log").is_file()
