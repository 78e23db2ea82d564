"""One command that checks kneegen's CUDA paths end to end, with what they achieve. Timed on an H200
(torch 2.11, CUDA 13): with --no-compile every phase up to sampling took 214 s (validate then ran past a
230 s limit; it passed on its own with --tiny); compiled, the pixel recipe's epoch alone took 157 s and the
autoencoder's 55 s, so the full compiled check runs ~10 minutes. --no-compile, --phantom and --images are
the knobs that make it shorter.

In a fresh work dir (a temporary one unless --work), every phase through the `kneegen` command line:
  1. the device and a square-matmul peak measured in the same run (bf16 where native, else fp32);
  2. `kneegen prepare --phantom`: phantom slices at --size;
  3. one epoch each of examples/akoa-256.yaml (pixel diffusion), examples/autoencoder-256.yaml and
     examples/latent-256.yaml on that autoencoder (torch.compile on CUDA unless --no-compile), then one
     more epoch of the latent run through `--resume`;
  4. `kneegen distill` of the latent run into a 2-step student, for one epoch;
  5. `kneegen sample generate` from the latent run with every registered sampler (but `distilled`), from
     the pixel run with its own, and from the student with its own;
  6. `kneegen validate` of the latent run (FID/KID when the Inception weights are installed).
A table ends the output, one row per phase: wall-clock seconds, training step time, images/s, peak memory,
achieved TFLOP/s and its share of the matmul peak, and ok or FAILED with the last line the command wrote
(its whole output is in WORK/logs/). A failed phase does not stop the others; the exit status is then 1.

Training speed is the median over the epoch's steps after the first (train.log_every_steps=1), so neither
the compilation nor start-up counts; TFLOP/s is 3 × the forward FLOPs of one image (FlopCounterMode on
the run's network: an image, a latent, or the autoencoder's training crop; not the frozen Inception an
autoencoder's perceptual distance runs through, so its row understates the work done) × images/s. Batch sizes are the
recipes', lowered where needed to divide the training split: a partial last batch has another shape, which
torch.compile would compile a second time. Sampling images/s is `kneegen sample generate`'s own timing
(network, decoding and PNG writing; not start-up).

    .venv/bin/python benchmarks/gpu_check.py                   # on a CUDA GPU, 256², 400 phantom slices
    .venv/bin/python benchmarks/gpu_check.py --device cpu --tiny --size 32 --phantom 60 \\
        --images 8 --steps 4                                   # a smoke run on a CPU (tests/test_gpu_check.py)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from kneegen.config import config_from_mapping, load_config
from kneegen.data.cache import open_cache
from kneegen.engine.autoencoder import latent_shape
from kneegen.engine.checkpoint import load_checkpoint
from kneegen.engine.device import bf16_supported
from kneegen.engine.network import build_network, network_settings
from kneegen.engine.samplers import DISTILLED, sampler_names
from kneegen.errors import KneegenError
from kneegen.metrics_log import METRICS_FILE, read_metrics

from quality import cpu_kind  # benchmarks/ is on sys.path when a script in it runs

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
KNEEGEN = [sys.executable, "-m", "kneegen"]
SUBPROCESS_ENV = {**os.environ, "COLUMNS": "1000"}  # Rich wraps nothing: one line per message, parseable
MATMUL_SECONDS = 1.0  # timed matmuls after the warm-up: long enough for a GPU's clocks to settle
FORWARD_BACKWARD = 3  # a training step costs about 3 forwards: the forward, and twice that backward
TEACHER_FORWARDS = 2  # a distillation step adds its teacher's two DDIM steps
STUDENT_STEPS = 2  # the distilled student's: one round from a 4-step teacher

# Per-device defaults of the sizes: the GPU's fit the 5-minute budget, the CPU's a smoke run.
DEFAULTS: dict[str, dict[str, int]] = {
    "cuda": {"matmul": 8192, "phantom": 400, "images": 128, "steps": 25, "validate": 64},
    "cpu": {"matmul": 1024, "phantom": 60, "images": 8, "steps": 4, "validate": 8},
}
# --tiny: networks of a few channels and small batches, so that every phase runs in seconds on a CPU.
TINY_UNET = {
    "model.unet.channels": "8",
    "model.unet.channel_mults": "[1,2]",
    "model.unet.attention_levels": "[]",
    "model.unet.blocks_per_level": "1",
}
TINY_TRAIN = {"train.batch_size": "4", "train.val_images": "4", "train.val_timesteps": "2"}
SAMPLE_TIMING = re.compile(r"(\d+) images in .*\((\d+(?:\.\d+)?) s,")  # `kneegen sample generate`'s last line
REPORT_LINE = re.compile(r"^report: (.*report\.png)$", re.MULTILINE)  # `kneegen validate`'s, one per checkpoint


@dataclass(frozen=True)
class Recipe:
    """A training run of the check: its name (run dir and table row), config and --tiny overrides."""

    name: str
    config: Path
    tiny: dict[str, str]


PIXEL = Recipe("pixel", EXAMPLES / "akoa-256.yaml", TINY_UNET)
AUTOENCODER = Recipe("autoencoder", EXAMPLES / "autoencoder-256.yaml", {"model.vae.channels": "8"})
LATENT = Recipe("latent", EXAMPLES / "latent-256.yaml", TINY_UNET)


@dataclass(frozen=True)
class Plan:
    """The check's settings, with the device's defaults filled in."""

    device: str
    work: Path
    size: int
    phantom: int
    images: int
    steps: int
    validate_samples: int
    matmul: int
    compile: bool
    tiny: bool


@dataclass
class Row:
    """One phase of the table; None where a number does not apply or could not be measured."""

    phase: str
    ok: bool = True
    wall_s: float | None = None
    step_s: float | None = None
    images_per_s: float | None = None
    peak_mib: float | None = None
    tflops: float | None = None
    note: str = ""


@dataclass
class Outcome:
    """A finished kneegen command: its row (wall time, ok or FAILED with its last line) and output."""

    row: Row
    output: str = field(repr=False)


def device_kind(device: torch.device) -> str:
    """The GPU or CPU model, whether bf16 is native, and the versions: what the numbers depend on."""
    if device.type == "cpu":
        return cpu_kind()
    properties = torch.cuda.get_device_properties(device)
    native = "native" if bf16_supported(device) else "not native"
    return (
        f"{properties.name}, {properties.total_memory / 2**30:.0f} GiB, compute capability "
        f"{properties.major}.{properties.minor}, bf16 {native}, CUDA {torch.version.cuda}, torch {torch.__version__}"
    )


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it measures that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, side: int) -> Row:
    """TFLOP/s of side×side matmuls in kneegen's compute dtype: the practical ceiling the training rows
    are a share of (bf16 where native; emulated bf16 would understate it ~1000×, so fp32 then)."""
    dtype = torch.bfloat16 if bf16_supported(device) else torch.float32
    a, b = (torch.randn(side, side, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up: the library picks its kernel
    synchronize(device)
    started, repeats = time.perf_counter(), 0
    while time.perf_counter() - started < MATMUL_SECONDS:
        a @ b
        synchronize(device)
        repeats += 1
    seconds = time.perf_counter() - started
    tflops = 2 * side**3 * repeats / seconds / 1e12
    return Row("matmul", wall_s=seconds, tflops=tflops, note=f"{side}² {str(dtype).removeprefix('torch.')}")


def run_kneegen(phase: str, args: list[str], plan: Plan) -> Outcome:
    """Run one kneegen command in the work dir, its output kept in WORK/logs/PHASE.log; a failure is
    recorded in the row (with the command's last line, where kneegen prints its error), not raised."""
    command = [*KNEEGEN, *args]
    print(f"$ {shlex.join(command)}", flush=True)
    started = time.perf_counter()
    result = subprocess.run(command, cwd=plan.work, env=SUBPROCESS_ENV, capture_output=True, text=True)
    row = Row(phase, ok=result.returncode == 0, wall_s=time.perf_counter() - started)
    logs = plan.work / "logs"
    logs.mkdir(exist_ok=True)
    (logs / f"{phase.replace(':', '-')}.log").write_text(result.stdout + result.stderr)
    if not row.ok:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        row.note = lines[-1] if lines else f"exit status {result.returncode}, no output"
    print(f"  {'ok' if row.ok else 'FAILED: ' + row.note} ({row.wall_s:.1f} s)", flush=True)
    return Outcome(row, result.stdout + result.stderr)


def forward_flops(checkpoint: Path) -> float:
    """FLOPs of one image's training forward through the run's network, counted on the meta device (no
    compute): the denoiser on an image or a latent, or the autoencoder on its training crop."""
    payload = load_checkpoint(checkpoint)
    model = config_from_mapping(payload["config"], str(checkpoint)).model
    image_shape: tuple[int, int] = tuple(payload["image_shape"])  # type: ignore[assignment]
    with torch.device("meta"):
        if model.arch == "vae":
            settings = network_settings(model)[1]
            channels, shape = 1, ((settings.crop, settings.crop) if settings.crop else image_shape)
            second = torch.zeros(1, *latent_shape(settings, shape))  # the posterior's noise
        else:
            channels, *shape = payload["latent"]["shape"] if model.autoencoder else (1, *image_shape)
            second = torch.zeros(1, dtype=torch.long)  # t
        network = build_network(model, tuple(shape), channels)  # type: ignore[arg-type]
        with FlopCounterMode(display=False) as counter:
            network(torch.zeros(1, channels, *shape), second)
    return counter.get_total_flops()


def measure_training(row: Row, run_dir: Path, epoch: int, forwards: int = FORWARD_BACKWARD) -> None:
    """Fill in the row from the epoch's records in metrics.jsonl: the median step after the first,
    the epoch's peak memory, and the TFLOP/s those steps achieved (a step costing `forwards`
    forwards of one image)."""
    records = [r for r in read_metrics(run_dir / METRICS_FILE) if r.get("epoch") == epoch]
    steps = [r["images_per_s"] for r in records if r["kind"] == "steps"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    if not steps or not epochs:
        raise KneegenError(f"{run_dir / METRICS_FILE} has no step or epoch record of epoch {epoch}")
    batch = load_config(run_dir / "config.yaml").train.batch_size
    row.images_per_s = statistics.median(steps[1:] or steps)
    row.step_s = batch / row.images_per_s
    row.peak_mib = epochs[-1]["peak_memory_mb"]
    row.tflops = forwards * forward_flops(run_dir / "last.pt") * row.images_per_s / 1e12
    row.note = f"batch {batch}, {len(steps)} steps"


def full_batch(train_images: int, wanted: int) -> int:
    """The largest batch up to `wanted` that divides the training split (see the module docstring);
    `wanted` itself when the split is unknown (prepare failed: training then fails on its own)."""
    if train_images < 1:
        return wanted
    return next(batch for batch in range(min(wanted, train_images), 0, -1) if train_images % batch == 0)


def train_overrides(recipe: Recipe, plan: Plan, train_images: int) -> dict[str, str]:
    """The --set overrides of one recipe's run: per-step records, the batch, --tiny and compilation."""
    config = load_config(recipe.config)
    overrides = {
        "train.log_every_steps": "1",
        **(TINY_TRAIN if plan.tiny else {}),
        **(recipe.tiny if plan.tiny else {}),
    }
    wanted = int(overrides.get("train.batch_size", config.train.batch_size))
    overrides["train.batch_size"] = str(full_batch(train_images, wanted))
    if config.model.arch == "vae" and network_settings(config.model)[1].crop > plan.size:
        overrides["model.vae.crop"] = "0"  # crops larger than the slices: train on whole slices
    if plan.compile:
        overrides["train.compile"] = "true"
    return overrides


def train(recipe: Recipe, plan: Plan, train_images: int, extra: dict[str, str]) -> Row:
    """One epoch of the recipe through `kneegen train`, measured from its metrics."""
    run_dir = plan.work / "runs" / recipe.name
    overrides = {**train_overrides(recipe, plan, train_images), **extra}
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    args = ["train", "--config", str(recipe.config), "--data", str(plan.work / "data"), "--run-dir", str(run_dir)]
    outcome = run_kneegen(f"train:{recipe.name}", [*args, "--device", plan.device, "--epochs", "1", *sets], plan)
    measured(outcome.row, lambda: measure_training(outcome.row, run_dir, 1))
    return outcome.row


def resume(recipe: Recipe, plan: Plan) -> Row:
    """A second epoch of the run through `kneegen train --resume`: checkpoint loading and the latent cache."""
    run_dir = plan.work / "runs" / recipe.name
    args = ["train", "--resume", "--run-dir", str(run_dir), "--device", plan.device, "--epochs", "2"]
    outcome = run_kneegen(f"resume:{recipe.name}", args, plan)
    measured(outcome.row, lambda: measure_training(outcome.row, run_dir, 2))
    return outcome.row


def distill(plan: Plan) -> Row:
    """One epoch of `kneegen distill` of the latent run: a 2-step student from 4 DDIM steps."""
    run_dir = plan.work / "runs" / "distilled"
    teacher = plan.work / "runs" / "latent" / "last.pt"
    args = ["distill", str(teacher), "--steps", str(STUDENT_STEPS), "--teacher-steps", str(2 * STUDENT_STEPS)]
    args += ["--epochs", "1", "--run-dir", str(run_dir), "--device", plan.device]
    outcome = run_kneegen("distill:latent", args, plan)
    measured(outcome.row, lambda: measure_training(outcome.row, run_dir, 1, FORWARD_BACKWARD + TEACHER_FORWARDS))
    return outcome.row


def sample(phase: str, checkpoint: Path, plan: Plan, sampler: str | None, steps: int | None = None) -> Row:
    """`kneegen sample generate` of --images images (with --steps, or `steps`); images/s from the
    command's own timing."""
    out = plan.work / "samples" / phase.replace(":", "-")
    steps = steps or plan.steps
    args = ["sample", "generate", str(plan.images), "--checkpoint", str(checkpoint), "--steps", str(steps)]
    args += ["--out", str(out), "--device", plan.device, *(["--sampler", sampler] if sampler else [])]
    outcome = run_kneegen(phase, args, plan)

    def timing() -> None:
        found = SAMPLE_TIMING.findall(outcome.output)
        if not found:
            raise KneegenError("no 'N images in … (S s, …)' line in its output")
        images, seconds = int(found[-1][0]), float(found[-1][1])
        outcome.row.note = f"{images} images, {steps} steps, {sampler or 'the run’s sampler'}"
        if seconds:
            outcome.row.images_per_s = images / seconds
        else:
            outcome.row.note += ": under the 1 ms its timing resolves, ask for more --images"

    measured(outcome.row, timing)
    return outcome.row


def validate(checkpoint: Path, plan: Plan) -> Row:
    """`kneegen validate` of the checkpoint; its validation loss and FID (when measured) in the note."""
    args = ["validate", str(checkpoint), "--samples", str(plan.validate_samples), "--steps", str(plan.steps)]
    outcome = run_kneegen("validate:latent", [*args, "--device", plan.device], plan)

    def report() -> None:
        found = REPORT_LINE.findall(outcome.output)
        if not found:
            raise KneegenError("no 'report: …/report.png' line in its output")
        report = json.loads((plan.work / found[-1]).with_name("report.json").read_text())
        fid = "FID skipped (no Inception weights)" if report["fid"] is None else f"FID {report['fid']:.1f}"
        outcome.row.note = f"{report['samples']} samples, val loss {report['val_loss']:.4f}, {fid}"

    measured(outcome.row, report)
    return outcome.row


def measured(row: Row, measure: Callable[[], None]) -> None:
    """Run `measure()` on a successful phase; a result it cannot read fails the row, not the check."""
    if not row.ok:
        return
    try:
        measure()
    except (KneegenError, OSError, KeyError, ValueError, TypeError) as error:
        row.ok, row.note = False, f"could not read its results: {error}"


def training_split_size(data: Path) -> int:
    """Images in the prepared training split; 0 when there is no cache (prepare failed)."""
    try:
        return len(open_cache(data).split("train"))
    except KneegenError:
        return 0


def run_check(plan: Plan) -> list[Row]:
    """Every phase in order; each failure is a row, and later phases still run. Each row is printed as
    its phase ends, so that a run stopped by a time limit still shows what it measured."""
    device = torch.device(plan.device)
    print(f"device: {device_kind(device)}", flush=True)
    rows = [matmul_peak(device, plan.matmul)]
    print(f"matmul peak: {rows[0].tflops:.3g} TFLOP/s ({rows[0].note})", flush=True)

    def add(row: Row) -> Row:
        rows.append(row)
        print(f"  = {table_line(row, rows[0].tflops or math.nan)}", flush=True)
        return row

    data = plan.work / "data"
    prepare_args = ["prepare", "--phantom", str(plan.phantom), "--size", str(plan.size), "--out", str(data)]
    prepared = run_kneegen("prepare", [*prepare_args, "--phantom-dir", str(plan.work / "phantom")], plan).row
    train_images = training_split_size(data)
    prepared.note = prepared.note or f"{plan.phantom} slices at {plan.size}², {train_images} for training"
    add(prepared)

    runs = plan.work / "runs"
    add(train(PIXEL, plan, train_images, {}))
    add(train(AUTOENCODER, plan, train_images, {}))
    add(train(LATENT, plan, train_images, {"model.autoencoder": str(runs / "autoencoder" / "best.pt")}))
    add(resume(LATENT, plan))
    add(distill(plan))

    latent = runs / "latent" / "last.pt"
    for name in sampler_names():
        if name != DISTILLED:
            add(sample(f"sample:latent:{name}", latent, plan, name))
    add(sample("sample:pixel", runs / "pixel" / "last.pt", plan, None))
    add(sample("sample:distilled", runs / "distilled" / "last.pt", plan, None, STUDENT_STEPS))
    add(validate(latent, plan))
    return rows


def number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def table_line(row: Row, peak_tflops: float) -> str:
    """One phase in fixed columns ('-' where a number does not apply), a free-text note last."""
    share = None if row.tflops is None else 100 * row.tflops / peak_tflops
    numbers = (row.wall_s, row.step_s, row.images_per_s, row.peak_mib, row.tflops, share)
    widths = (7, 7, 8, 8, 8, 6)
    cells = " ".join(f"{number(value):>{width}}" for value, width in zip(numbers, widths))
    return f"{row.phase:<26} {cells} {'ok' if row.ok else 'FAILED':>6}  {row.note}"


def print_table(rows: list[Row], peak_tflops: float) -> None:
    print(
        f"{'phase':<26} {'wall_s':>7} {'step_s':>7} {'img/s':>8} {'peak_MiB':>8} {'TFLOP/s':>8} {'%peak':>6} "
        f"{'status':>6}  note"
    )
    for row in rows:
        print(table_line(row, peak_tflops))


def parse_plan() -> Plan:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=list(DEFAULTS), default="cuda")
    parser.add_argument("--work", type=Path, help="an empty or new folder for everything; default: a temporary one")
    parser.add_argument("--size", type=int, default=256, help="side of the prepared slices")
    parser.add_argument("--phantom", type=int, help="phantom slices: 20 per knee, ≥ 3 knees for the split")
    parser.add_argument("--images", type=int, help="images per `sample generate`")
    parser.add_argument("--steps", type=int, help="sampling steps, for sample and validate")
    parser.add_argument("--validate-samples", type=int, help="images `validate` generates")
    parser.add_argument("--matmul", type=int, help="side of the peak's square matmul")
    parser.add_argument("--no-compile", action="store_true", help="train eagerly on CUDA too")
    parser.add_argument("--tiny", action="store_true", help="networks of a few channels, batch 4: for a CPU")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU here (use --device cpu --tiny for a smoke run)")
    if args.work is not None and args.work.exists() and any(args.work.iterdir()):
        parser.error(f"--work {args.work} is not empty: every phase starts from scratch")
    defaults = DEFAULTS[args.device]
    return Plan(
        device=args.device,
        work=(args.work or Path(tempfile.mkdtemp(prefix="kneegen-gpu-check-"))).resolve(),
        size=args.size,
        phantom=args.phantom or defaults["phantom"],
        images=args.images or defaults["images"],
        steps=args.steps or defaults["steps"],
        validate_samples=args.validate_samples or defaults["validate"],
        matmul=args.matmul or defaults["matmul"],
        compile=args.device == "cuda" and not args.no_compile,
        tiny=args.tiny,
    )


def main() -> None:
    print(f"reproduce: cd {shlex.quote(os.getcwd())} && {shlex.join([sys.executable, *sys.argv])}", flush=True)
    plan = parse_plan()
    plan.work.mkdir(parents=True, exist_ok=True)
    print(f"work dir: {plan.work}", flush=True)
    started = time.perf_counter()
    rows = run_check(plan)
    print()
    print_table(rows, rows[0].tflops or math.nan)
    failed = [row.phase for row in rows if not row.ok]
    print(f"total {time.perf_counter() - started:.0f} s; " + (f"FAILED: {', '.join(failed)}" if failed else "all ok"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
