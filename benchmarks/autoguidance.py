"""Autoguidance (Karras et al. 2024) on the quality instrument: one trained run, its final weights
guided by its own earlier ones, for several guide ages and weights w.

The guide is the run's EMA at a fraction of its steps (`train.guide_at` keeps one such copy in
every checkpoint); this benchmark trains the recipe once keeping every epoch's checkpoint, then
draws the same 1,000 seeds from last.pt guided by the epoch checkpoint nearest each fraction, at
each w (w = 1 is the unguided model, one network call per step instead of two; `--sigma-max`
limits the guidance to low noise levels, as `sample.autoguidance_sigma_max`), and scores them
as benchmarks/quality.py does: FID / floor, KID, precision, recall, fold, copies, s/img.

    .venv/bin/python benchmarks/autoguidance.py --epochs 22 --fractions 0.2 0.3 0.5 --weights 2
    .venv/bin/python benchmarks/autoguidance.py --run runs/bench_autoguidance/demo-keep-seed0 \\
        --fractions 0.3 --weights 1 1.5 2 2.5 3                                      # rescore, other w
    .venv/bin/python benchmarks/autoguidance.py --epochs 1 --phantom 120 --held-out 0.5 \\
        --samples 24 --fractions 0.5 --weights 1 2                                   # a smoke run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kneegen.engine.checkpoint import load_checkpoint
from kneegen.runs import STEP_CHECKPOINTS

from quality import Judge, Scores, add_judge_arguments, cpu_kind, judge_on_phantom, sampler_choice, train_for


def guide_checkpoints(run_dir: Path, fractions: list[float]) -> list[tuple[float, Path]]:
    """(share of the run's steps, checkpoint) of the kept checkpoint nearest each fraction."""
    end = load_checkpoint(run_dir / "last.pt")["step"]
    kept = {int(path.stem.split("-")[1]): path for path in (run_dir / STEP_CHECKPOINTS).glob("step-*.pt")}
    if not kept:
        sys.exit(f"{run_dir / STEP_CHECKPOINTS} holds no checkpoints: train with the 'keep' fragment (--epochs N)")
    chosen = []
    for fraction in fractions:
        step = min(kept, key=lambda s: abs(s - fraction * end))
        chosen.append((step / end, kept[step]))
    return chosen


def row(label: str, s: Scores, floor: Scores) -> str:
    return (
        f"{label:<24} {s.fid:>7.2f} {s.fid / floor.fid:>6.2f} {s.kid:>7.4f} {s.precision:>5.3f} {s.recall:>6.3f} "
        f"{s.fold_ratio:>5.2f} {s.copies:>5.3f}/{s.copies_chance:<5.3f} {s.seconds_per_image:>6.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--recipe", default="", help="screening fragments on cpu-bf16 (benchmarks/quality.py), e.g. w32-fp32"
    )
    parser.add_argument("--epochs", type=int, default=22, help="training epochs (when --run is not given)")
    parser.add_argument("--seed", type=int, default=0, help="train.seed")
    parser.add_argument("--run", type=Path, help="a trained run dir with every epoch's checkpoint kept")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.3], help="guide ages, as shares of the run")
    parser.add_argument("--weights", type=float, nargs="+", default=[1.0, 2.0], help="autoguidance w (1 = off)")
    parser.add_argument("--sampler", default="dpm++2m-sde:25", help="NAME:STEPS[:ETA[:SPACING]]")
    parser.add_argument(
        "--sigma-max", type=float, default=float("inf"), help="guide only at noise levels σ ≤ this (inf: every step)"
    )
    add_judge_arguments(parser, Path("runs/bench_autoguidance"))
    args = parser.parse_args()

    judge: Judge
    judge, floor = judge_on_phantom(args.work, args.phantom, args.held_out, args.feature_weights, args.samples)
    run_dir = args.run
    if run_dir is None:
        name = "-".join(filter(None, [args.recipe, "keep"]))
        run_dir = args.work / f"{name}-seed{args.seed}"
        run = train_for(name, args.seed, judge.data, run_dir, 0.0, args.epochs)
        print(f"trained {name}: {run.epochs} epochs in {run.minutes:.1f} min, {run.images_per_s:.1f} img/s", flush=True)
    base = args.sampler.split(":")
    print(
        f"{run_dir / 'last.pt'}, {args.sampler}\n{'guide (share of run), w':<24} {'FID':>7} {'×floor':>6} "
        f"{'KID':>7} {'prec':>5} {'recall':>6} {'fold':>5} {'copies':>11} {'s/img':>6}",
        flush=True,
    )
    if 1.0 in args.weights:
        s, _, _ = judge.samples(run_dir / "last.pt", sampler_choice(args.sampler))
        print(row("none, w 1", s, floor), flush=True)
    for share, guide in guide_checkpoints(run_dir, args.fractions):
        for w in (w for w in args.weights if w != 1.0):
            choice = sampler_choice(":".join((base + ["0", "auto"])[:4] + [str(w), str(args.sigma_max)]))
            s, _, _ = judge.samples(run_dir / "last.pt", choice, guide)
            print(row(f"{guide.stem} ({share:.2f}), w {w:g}", s, floor), flush=True)
    print(f"on {cpu_kind()}; reproduce: .venv/bin/python benchmarks/autoguidance.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
