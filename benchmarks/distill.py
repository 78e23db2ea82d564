"""Few-step sampling by distillation: a teacher at 25 / 10 / 4 steps against its distilled students
at 4 / 2 / 1 steps, on the demo phantom at 64², judged like benchmarks/quality.py (≥ 1,000
samples against ≥ 1,000 held-out slices, next to the real-vs-real floor).

The teacher is the demo recipe (cpu-bf16) trained for `--minutes`, or `--teacher CHECKPOINT`.
`kneegen distill` then makes the first student (`--steps`, default 4, from the distillation's
default teacher steps) and each further student from the previous one (4 → 2 → 1), each with the
command's default length. Reported for every sampler: FID, FID / floor, KID, precision, recall,
seconds per image (the same seeds for all); for every student, the distillation's own wall time,
its CPU-minutes (wall × threads) and its share of the teacher's training time (the teacher's own
time when trained here; with --teacher, its logged epoch seconds). The teacher's rows are its
default sampler at 25 steps, its dpm++2m at 10, 4 and 2 steps (the students' calls), and
deterministic DDIM on the students' (trailing) grid at 4 steps and at the first teacher's steps,
the sampler the first round learns from. Each student samples as `kneegen sample` would: its own
`distilled` sampler, steps and η (1 by default; 0 with `--set sample.eta=0` on distill, or score
`ddim:4:0:trailing` with `benchmarks/quality.py --score`).
With `--method consistency` or `dmd` (one-stage students that sample in fewer steps themselves)
one student is distilled for the first count and scored at every count with its own sampler.
A grid of the same seeds: real | teacher-25 | student-4 | student-1.

    .venv/bin/python benchmarks/distill.py --minutes 8                    # ~45 min on 2 cores
    .venv/bin/python benchmarks/distill.py --teacher runs/bench_distill/teacher/last.pt
    .venv/bin/python benchmarks/distill.py --minutes 0.3 --phantom 120 --held-out 0.5 --samples 24 \\
        --work runs/bench_distill_smoke                                  # a smoke run
    .venv/bin/python benchmarks/distill.py --teacher runs/bench_distill/demo-seed0/last.pt --method dmd \
        --set train.lr=5e-5 distill.fake_score_updates=5                 # distribution matching
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import get_args

import numpy as np
import torch

from kneegen.config import DistillMethod, parse_override
from kneegen.distill_request import DistillRequest, start_distillation_run
from kneegen.engine.samplers import DISTILLED
from kneegen.metrics_log import read_metrics
from kneegen.sampling import SamplerChoice

from quality import (
    Scores,
    add_judge_arguments,
    cpu_kind,
    judge_on_phantom,
    save_grid,
    train_for,
)  # benchmarks/ on sys.path


def distil(teacher: Path, steps: int, run_dir: Path, settings: dict[str, object]) -> tuple[Path, float]:
    """`kneegen distill TEACHER --steps N --set K=V…` (`settings`, `distill.method` among them) with
    its defaults otherwise; (the student's checkpoint, wall seconds)."""
    if run_dir.exists():
        sys.exit(f"{run_dir} exists: remove it or give another --work")
    started = time.perf_counter()
    start_distillation_run(DistillRequest(teacher, {**settings, "distill.steps": steps}, run_dir))
    return run_dir / "last.pt", time.perf_counter() - started


def training_seconds(checkpoint: Path) -> float:
    """The seconds a run's epochs took, from its metrics log (validation included)."""
    records = read_metrics(checkpoint.parent / "metrics.jsonl")
    return sum(record["seconds"] for record in records if record["kind"] == "epoch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=8.0, help="the teacher's training budget")
    parser.add_argument("--teacher", type=Path, default=None, help="a trained teacher (of --work's data) instead")
    parser.add_argument("--students", type=int, nargs="+", default=[4, 2, 1], help="student steps, each from the last")
    parser.add_argument("--method", choices=get_args(DistillMethod), default="progressive", help="distill.method")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="further distill settings")
    add_judge_arguments(parser, Path("runs/bench_distill"))
    args = parser.parse_args()
    if sorted(args.students, reverse=True) != args.students or len(set(args.students)) != len(args.students):
        sys.exit("--students: decreasing step counts, each a power-of-two fraction of the one before (4 2 1)")

    threads = torch.get_num_threads()
    judge, floor = judge_on_phantom(args.work, args.phantom, args.held_out, args.feature_weights, args.samples)

    # 1. The teacher, and its training time.
    if args.teacher is None:
        trained = train_for("demo", 0, judge.data, args.work / "teacher", args.minutes)
        teacher, teacher_seconds = trained.checkpoint, trained.minutes * 60
    else:
        teacher, teacher_seconds = args.teacher, training_seconds(args.teacher)
    print(f"teacher {teacher}: {teacher_seconds / 60:.1f} min of training", flush=True)

    # 2. The students, each distilled from the one before; a one-stage method's one student,
    #    sampled at every count.
    settings = {"distill.method": args.method, **dict(parse_override(text) for text in args.set)}
    students: list[tuple[int, Path, float]] = []
    source = teacher
    for steps in args.students if args.method == "progressive" else args.students[:1]:
        source, seconds = distil(source, steps, args.work / f"student-{args.method}-{steps}", settings)
        students.append((steps, source, seconds))
        print(f"student {steps} steps: distilled in {seconds / 60:.1f} min", flush=True)
    scored: list[tuple[int, Path, SamplerChoice | None]] = [(steps, source, None) for steps, source, _ in students]
    if args.method != "progressive":
        scored += [(steps, source, SamplerChoice(DISTILLED, steps)) for steps in args.students[1:]]

    # 3. Every sampler on the same seeds.
    rows: list[tuple[str, Scores, str]] = []
    grid = {"real": judge.held_out[np.linspace(0, len(judge.held_out) - 1, 8).round().astype(int)]}
    first_teacher_steps = torch.load(students[0][1], weights_only=False)["config"]["distill"]["teacher_steps"]
    teacher_choices = [
        ("teacher default, 25 steps", None),
        ("teacher dpm++2m, 10 steps", SamplerChoice("dpm++2m", 10)),
        ("teacher dpm++2m, 4 steps", SamplerChoice("dpm++2m", 4)),
        ("teacher dpm++2m, 2 steps", SamplerChoice("dpm++2m", 2)),
        ("teacher ddim trailing, 4", SamplerChoice("ddim", 4, spacing="trailing")),
        (
            f"teacher ddim trailing, {first_teacher_steps}",
            SamplerChoice("ddim", first_teacher_steps, spacing="trailing"),
        ),
    ]
    for label, choice in teacher_choices:
        scores, images, how = judge.samples(teacher, choice)  # None: its own sampler (autoguided if it is)
        rows.append((label, scores, how))
        if label.startswith("teacher default"):
            grid["teacher-25"] = images
        print(f"  {label}: FID {scores.fid:.2f}; {how}", flush=True)
    for steps, checkpoint, choice in scored:
        scores, images, how = judge.samples(checkpoint, choice)  # None: its own sampler, steps and η
        rows.append((f"student, {steps} step{'s' * (steps > 1)}", scores, how))
        grid[f"student-{steps}"] = images
        print(f"  student {steps}: FID {scores.fid:.2f}; {how}", flush=True)
    shown = ("real", "teacher-25", f"student-{args.students[0]}", f"student-{args.students[-1]}")
    save_grid(args.work / "grid.png", {name: grid[name] for name in dict.fromkeys(shown)})

    # 4. The table.
    teacher_fid = rows[0][1].fid
    print(f"\nCPU: {cpu_kind()}")
    print(
        f"floor (real vs real, N = {args.samples}): FID {floor.fid:.2f}, KID {floor.kid:.4f}, recall {floor.recall:.3f}"
    )
    print(
        f"{'sampler':<28} {'FID':>7} {'×floor':>6} {'×teacher25':>10} {'KID':>7} {'prec':>5} {'recall':>6} "
        f"{'s/img':>6} {'img/s ×':>7}"
    )
    teacher_speed = rows[0][1].seconds_per_image
    for label, s, _ in rows:
        print(
            f"{label:<28} {s.fid:>7.2f} {s.fid / floor.fid:>6.2f} {s.fid / teacher_fid:>10.2f} {s.kid:>7.4f} "
            f"{s.precision:>5.3f} {s.recall:>6.3f} {s.seconds_per_image:>6.3f} "
            f"{teacher_speed / s.seconds_per_image:>7.1f}"
        )
    print(f"teacher: {teacher_seconds / 60:.1f} min of training ({teacher_seconds / 60 * threads:.1f} CPU-minutes)")
    for steps, _, seconds in students:
        print(
            f"student {steps}: distilled in {seconds / 60:.1f} min ({seconds / 60 * threads:.1f} CPU-minutes), "
            f"{seconds / teacher_seconds:.0%} of the teacher's training time"
        )
    total = sum(seconds for _, _, seconds in students)
    print(f"all students: {total / 60:.1f} min, {total / teacher_seconds:.0%} of the teacher's training time")
    print("sampling: " + "; ".join(f"{label}: {how}" for label, _, how in rows))
    print(
        f"method: {args.method}"
        + "".join(f", {key} {value}" for key, value in settings.items() if key != "distill.method")
    )
    print(f"grid (same seeds): {args.work / 'grid.png'}, rows real | teacher-25 | student-4 | student-1")
    print("reproduce: .venv/bin/python benchmarks/distill.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
