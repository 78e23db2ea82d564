"""Classifier-free guidance on the demo phantom: what each guidance weight w buys and costs.

A model conditioned on knee side and slice position (the shipped bf16/fp32 recipe plus
`model.conditions: [side, position]`) and the same recipe unconditional are trained for the same
number of epochs on the quality instrument's phantom (benchmarks/quality.py: ~1,600 training
slices, ~1,300 held-out slices of other patients, 64²; a conditional step costs what an
unconditional one does, so equal epochs are equal compute). Then, per w, `--samples` images are
drawn with the conditions of the held-out slices (image i asks for held-out slice i's side and
position, cycling), so FID compares like with like, and scored:
- FID / floor, KID, precision and recall against the held-out slices; FID per side;
- side accuracy and position error of an independent classifier (trained on the real training
  split, kneegen/evaluation/condition_classifier.py) on the samples, beside the same classifier
  on the real held-out slices;
- seconds per image (w ∉ {0, 1} doubles the batch of every network call).
w = 0 is the conditional model sampled unconditionally; the unconditional model's row is the
reference it should match. The CPU kind and precision are printed with the table.

    .venv/bin/python benchmarks/guidance.py --epochs 20                  # both models, then the table
    .venv/bin/python benchmarks/guidance.py --conditional runs/bench_quality/cond-seed0/last.pt \\
        --unconditional runs/bench_quality/demo-seed0/last.pt          # score trained ones only
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from kneegen.asked_conditions import AskedConditions
from kneegen.data.cache import open_cache
from kneegen.data.conditions import CONDITIONS, select_conditions
from kneegen.engine.device import resolve_compute
from kneegen.engine.trained import load_trained_model
from kneegen.evaluation.condition_checks import side_fid
from kneegen.evaluation.condition_classifier import cached_condition_classifier, condition_scores, predict_conditions
from kneegen.sampling import SamplerChoice, sample_batches
from kneegen.viz import image_grid, save_png

from quality import (
    SAMPLE_BATCH,
    Judge,
    Scores,
    cpu_kind,
    features_of,
    prepare_phantom,
    train_for,
)  # benchmarks/ on sys.path

WEIGHTS = [0.0, 1.0, 1.5, 2.0, 3.0, 5.0]
GRID_POSITIONS = 8  # columns of the picture: positions 0 → 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20, help="training epochs of each model")
    parser.add_argument("--weights", type=float, nargs="+", default=WEIGHTS, help="guidance weights w to score")
    parser.add_argument("--samples", type=int, default=1000, help="images per row")
    parser.add_argument("--phantom", type=int, default=2900, help="phantom slices in the cache (as quality.py)")
    parser.add_argument("--held-out", type=float, default=0.45, help="fraction of patients in the test split")
    parser.add_argument("--work", type=Path, default=Path("runs/bench_quality"), help="cache and run dirs go here")
    parser.add_argument("--seed", type=int, default=0, help="train.seed of both models")
    parser.add_argument("--conditional", type=Path, help="a trained conditional checkpoint instead of training one")
    parser.add_argument("--unconditional", type=Path, help="a trained unconditional checkpoint to compare with")
    parser.add_argument("--grid", type=Path, default=Path("docs/conditions_grid.png"), help="the picture's path")
    args = parser.parse_args()

    print(f"CPU: {cpu_kind()}", flush=True)
    data = prepare_phantom(args.work, args.phantom, args.held_out)
    judge = Judge.on(data, None, args.samples)
    floor, _ = judge.floor()
    cache = open_cache(data)
    held_out_conditions = cache.split_conditions("test", list(CONDITIONS))  # (H, 2)
    print(
        f"{len(judge.train)} training and {len(judge.held_out)} held-out slices at {judge.held_out.shape[1]}²; "
        f"floor FID {floor.fid:.2f}",
        flush=True,
    )

    # 1. The two models, trained for the same epochs (or given).
    conditional = args.conditional or train_model("cond", args, data)
    unconditional = args.unconditional or train_model("demo", args, data)

    # 2. The judge of conditions, and how well it reads real held-out slices.
    classifier = cached_condition_classifier(cache)
    real = condition_scores(*predict_conditions(classifier, judge.held_out), held_out_conditions)
    print(
        f"classifier on real held-out slices: side accuracy {real['side_accuracy']:.3f}, "
        f"position MAE {real['position_mae']:.4f}",
        flush=True,
    )

    # 3. The unconditional reference, then the conditional model at every w.
    reference, _, how = judge.samples(unconditional)
    print(f"unconditional model: FID {reference.fid:.2f} ({how})", flush=True)
    model = load_trained_model(conditional, resolve_compute("cpu", "fp32"))
    if sorted(model.config.model.conditions) != sorted(CONDITIONS):
        sys.exit(
            f"{conditional}: conditioned on {model.config.model.conditions}; this benchmark needs side and position"
        )
    compute = resolve_compute("cpu", model.config.precision)
    model = load_trained_model(conditional, compute)
    choice = SamplerChoice(model.config.sample.sampler, model.config.sample.steps)
    patch = model.fold
    wanted = held_out_conditions[np.arange(args.samples) % len(held_out_conditions)]  # (N, 2) [side, position]
    rows = []
    for w in args.weights:
        asked = AskedConditions(
            model.config.model.conditions, select_conditions(wanted, model.config.model.conditions), w
        )
        started = time.perf_counter()
        images = np.concatenate(
            [b for _, b in sample_batches(model, compute, choice, judge.seeds, SAMPLE_BATCH, conditions=asked)]
        )
        seconds = (time.perf_counter() - started) / len(images)
        features = features_of(judge.extractor, images)
        scores = judge.score(images, features, patch, seconds)
        read = condition_scores(*predict_conditions(classifier, images), wanted)
        per_side = [
            side_fid(code, wanted, features, held_out_conditions, judge.held_out_features) for code in (0.0, 1.0)
        ]
        rows.append((w, scores, read, per_side))
        print(
            f"  w {w:g}: FID {scores.fid:.2f}, side accuracy {read['side_accuracy']:.3f}, "
            f"position MAE {read['position_mae']:.4f}, {seconds:.3f} s/img",
            flush=True,
        )

    # 4. The table and the picture.
    print(
        f"\n{args.epochs} epochs per model, {args.samples} samples per row, on {cpu_kind()}; sampler "
        f"{choice.describe()}, {compute.describe()}"
    )
    print(
        f"floor FID {floor.fid:.2f}; unconditional model FID {reference.fid:.2f} "
        f"({reference.fid / floor.fid:.2f}× floor), {reference.seconds_per_image:.3f} s/img"
    )
    print(f"real held-out slices: side accuracy {real['side_accuracy']:.3f}, position MAE {real['position_mae']:.4f}")
    print(
        f"{'w':>4} {'FID':>7} {'×floor':>6} {'÷uncond':>7} {'KID':>7} {'prec':>5} {'recall':>6} {'FID L':>7} "
        f"{'FID R':>7} {'side acc':>8} {'pos MAE':>7} {'÷real':>6} {'s/img':>6}"
    )
    for w, s, read, (left, right) in rows:
        print(
            f"{w:>4g} {s.fid:>7.2f} {s.fid / floor.fid:>6.2f} {s.fid / reference.fid:>7.3f} {s.kid:>7.4f} "
            f"{s.precision:>5.3f} {s.recall:>6.3f} {fid_text(left):>7} {fid_text(right):>7} "
            f"{read['side_accuracy']:>8.3f} {read['position_mae']:>7.4f} "
            f"{read['position_mae'] / real['position_mae']:>6.2f} {s.seconds_per_image:>6.3f}"
        )
    best = choose_weight(rows, real)
    print(f"chosen default: w = {best:g} (the lowest FID among the weights that reach the condition targets)")
    save_picture(args.grid, judge, held_out_conditions, model, compute, choice, best)
    print(f"picture: {args.grid} (rows: real left, sampled left, real right, sampled right; positions 0 → 1)")
    print("reproduce: .venv/bin/python benchmarks/guidance.py " + " ".join(sys.argv[1:]))


def train_model(recipe: str, args: argparse.Namespace, data: Path) -> Path:
    run = train_for(recipe, args.seed, data, args.work / f"{recipe}-seed{args.seed}", 0.0, args.epochs)
    print(f"  {recipe}: {run.epochs} epochs in {run.minutes:.1f} min, {run.images_per_s:.1f} img/s", flush=True)
    return run.checkpoint


def fid_text(fid: float | None) -> str:
    return "-" if fid is None else f"{fid:.2f}"  # None: too few images of that side


def choose_weight(rows: list[tuple[float, Scores, dict, list]], real: dict) -> float:
    """The lowest-FID w whose side accuracy is ≥ 0.95 and position error ≤ 1.5× the real one;
    when no w reaches both, the lowest-FID w that reaches the side target (else the lowest FID)."""
    both = [row for row in rows if row[2]["side_accuracy"] >= 0.95]
    good = [row for row in both if row[2]["position_mae"] <= 1.5 * real["position_mae"]]
    return min(good or both or rows, key=lambda row: row[1].fid)[0]


def save_picture(path: Path, judge: Judge, held_out_conditions: np.ndarray, model, compute, choice, w: float) -> None:
    """Per side a row of real held-out slices nearest to positions 0 → 1, and below it a row of
    samples asked for that side and those positions (one seed per column)."""
    positions = np.linspace(0, 1, GRID_POSITIONS, dtype=np.float32)
    wanted = np.array([[side, p] for side in (0.0, 1.0) for p in positions], dtype=np.float32)
    names = model.config.model.conditions
    asked = AskedConditions(names, select_conditions(wanted, names), w)
    seeds = list(range(GRID_POSITIONS)) * 2
    samples = np.concatenate(
        [b for _, b in sample_batches(model, compute, choice, seeds, SAMPLE_BATCH, conditions=asked)]
    )
    rows = []
    for k, side in enumerate((0.0, 1.0)):
        of_side = np.flatnonzero((held_out_conditions[:, 0] == side) & ~np.isnan(held_out_conditions[:, 1]))
        nearest = [of_side[np.abs(held_out_conditions[of_side, 1] - p).argmin()] for p in positions]
        rows += [*judge.held_out[nearest], *samples[k * GRID_POSITIONS : (k + 1) * GRID_POSITIONS]]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(image_grid(rows, columns=GRID_POSITIONS), path)


if __name__ == "__main__":
    main()
