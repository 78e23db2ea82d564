"""Sample quality at a fixed CPU training budget: kneegen's recipe against the original one.

Both recipes train for the same wall-clock minutes on the same phantom cache at 64²:
- kneegen: examples/demo.yaml (U-Net with attention, cosine schedule, v-prediction, L2, AdamW,
  warm-up, clipping, EMA);
- original: examples/seed.yaml (the plain 31 M-parameter U-Net, linear schedule,
  ε-prediction, L1, Adam 1e-3, no EMA).
Then each draws the same seeds with the same sampler at every step count, and FID and KID are
measured against the cache's held-out split with the FID Inception (kneegen/evaluation). The
"floor" row scores as many real training slices as there are samples: the best any model can
do at that count (FID has a small-sample bias, KID does not; see kneegen/evaluation/frechet.py).

Training by time: a first epoch, then one more (resumed from last.pt) while the last epoch's
duration still fits in the budget, so a recipe may stop short of the budget but never starts
an epoch it cannot finish; the first epoch always runs. Since the run's length is not known in
advance, a recipe must keep a constant LR after warm-up (both do). Validation during training
is set to the same small size for both recipes, so it costs both the same share of the budget.

    .venv/bin/python benchmarks/quality.py --minutes 20                 # the comparison
    .venv/bin/python benchmarks/quality.py --minutes 0.5 --phantom 200 --samples 16 --steps 5 10   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kneegen.config import RunConfig, load_config
from kneegen.data.cache import open_cache
from kneegen.engine.device import resolve_compute
from kneegen.engine.trained import load_trained_model
from kneegen.evaluation.features import INSTALL_HINT, extract_features, find_feature_weights, load_feature_extractor
from kneegen.evaluation.frechet import frechet_distance
from kneegen.evaluation.kid import kernel_inception_distance
from kneegen.evaluation.reference import held_out_images, reference_features
from kneegen.sampling import SamplerChoice, sample_batches
from kneegen.training_run import run_training

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RECIPES = {"kneegen": EXAMPLES / "demo.yaml", "original": EXAMPLES / "seed.yaml"}
IMAGE_SIZE = 64
SAME_FOR_BOTH = {"device": "cpu", "train.val_images": 32, "train.val_timesteps": 2, "train.val_every": 1}
FEATURE_BATCH = 32
CPU = torch.device("cpu")


@dataclass
class Trained:
    name: str
    checkpoint: Path
    epochs: int
    minutes: float
    parameters: int


@dataclass
class Judge:
    """FID and KID against the cache's held-out split, for the same seeds every time."""

    data: Path
    extractor: torch.jit.ScriptModule
    reference: np.ndarray  # (N, 2048) features of the held-out slices
    split: str  # which split is held out: test, else val
    seeds: list[int]

    @classmethod
    def on(cls, data: Path, feature_weights: Path | None, samples: int) -> Judge:
        weights = find_feature_weights(feature_weights)
        if weights is None:
            sys.exit(f"FID Inception weights not found: {INSTALL_HINT}, or give --feature-weights PATH")
        extractor = load_feature_extractor(weights, CPU)
        cache = open_cache(data)
        split, _ = held_out_images(cache)
        reference = reference_features(cache, split, extractor, FEATURE_BATCH, CPU)
        return cls(data, extractor, reference, split, list(range(samples)))

    def floor(self) -> tuple[float, float]:
        """As many real training slices as there are samples: the best any model can score."""
        return self.score(np.asarray(open_cache(self.data).split("train")[: len(self.seeds)]))

    def samples(self, checkpoint: Path, sampler: str, steps: int) -> tuple[float, float, float]:
        """(FID, KID, seconds per image) of the checkpoint's samples."""
        compute = resolve_compute("cpu", "fp32")
        model = load_trained_model(checkpoint, compute)
        started = time.perf_counter()
        batches = sample_batches(model, compute, SamplerChoice(sampler, steps), self.seeds, 32)
        images = np.concatenate([batch for _, batch in batches])
        seconds = (time.perf_counter() - started) / len(self.seeds)
        return (*self.score(images), seconds)

    def describe(self) -> str:
        cache = open_cache(self.data)
        return (f"{len(cache.split('train'))} phantom slices in training; {len(self.seeds)} samples vs "
                f"{len(self.reference)} held-out ({self.split}) slices")

    def score(self, images: np.ndarray) -> tuple[float, float]:
        features = extract_features(self.extractor, images, FEATURE_BATCH, CPU)
        return frechet_distance(features, self.reference), kernel_inception_distance(features, self.reference).mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget per recipe")
    parser.add_argument("--phantom", type=int, default=1600, help="phantom slices in the cache (the demo's 1600)")
    parser.add_argument("--samples", type=int, default=128, help="images per FID/KID")
    parser.add_argument("--sampler", default="dpm++2m")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--work", type=Path, default=Path("runs/bench_quality"), help="cache and run dirs go here")
    parser.add_argument("--feature-weights", type=Path, default=None)
    args = parser.parse_args()

    judge = Judge.on(prepare_phantom(args.work, args.phantom), args.feature_weights, args.samples)
    trained = [train_for(name, recipe, judge.data, args.work / name, args.minutes) for name, recipe in RECIPES.items()]
    floor = judge.floor()
    scores: dict[tuple[str, int], tuple[float, float, float]] = {}
    for run in trained:
        for steps in args.steps:
            scores[(run.name, steps)] = judge.samples(run.checkpoint, args.sampler, steps)
            fid, kid, _ = scores[(run.name, steps)]
            print(f"  {run.name} {args.sampler} {steps} steps: FID {fid:.2f}, KID {kid:.4f}", flush=True)

    print(f"\n{args.minutes:g} min of CPU training per recipe at {IMAGE_SIZE}²; {judge.describe()}; {args.sampler}")
    print(f"{'recipe':<9} {'params':>8} {'epochs':>6} {'minutes':>7}")
    for run in trained:
        print(f"{run.name:<9} {run.parameters / 1e6:>7.2f}M {run.epochs:>6} {run.minutes:>7.1f}")
    print(f"\n{'steps':>5} {'FID kneegen':>11} {'FID original':>12} {'ratio':>6} {'KID kneegen':>11} "
          f"{'KID original':>12} {'ratio':>6} {'s/img kneegen':>13} {'s/img original':>14}")
    print(f"{'floor':>5} {floor[0]:>11.2f} {'':>12} {'':>6} {floor[1]:>11.4f}")
    for steps in args.steps:
        (fid_k, kid_k, sec_k), (fid_o, kid_o, sec_o) = scores[("kneegen", steps)], scores[("original", steps)]
        print(f"{steps:>5} {fid_k:>11.2f} {fid_o:>12.2f} {ratio(fid_o, fid_k):>6} {kid_k:>11.4f} {kid_o:>12.4f} "
              f"{ratio(kid_o, kid_k):>6} {sec_k:>13.3f} {sec_o:>14.3f}")
    print("ratio = original / kneegen: above 1, kneegen's samples are closer to the held-out slices")


def prepare_phantom(work: Path, count: int) -> Path:
    """The phantom cache at 64², made once through the CLI (its split: train/val/test by patient)."""
    data = work / "data"
    if (data / "manifest.json").is_file():
        manifest = json.loads((data / "manifest.json").read_text())
        if len(manifest["slices"]) != count or manifest["image_shape"] != [IMAGE_SIZE, IMAGE_SIZE]:
            sys.exit(f"{data} holds another phantom: remove it or give another --work")
        return data
    command = [sys.executable, "-m", "kneegen", "prepare", "--phantom", str(count), "--size", str(IMAGE_SIZE),
               "--out", str(data), "--phantom-dir", str(work / "phantom"), "--overwrite"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return data


def train_for(name: str, recipe: Path, data: Path, run_dir: Path, minutes: float) -> Trained:
    """Train `recipe` epoch by epoch while the last epoch's time still fits in the budget."""
    if run_dir.exists():
        sys.exit(f"{run_dir} exists: remove it or give another --work, so both recipes start from scratch")
    if load_config(recipe).train.lr_schedule != "constant":
        sys.exit(f"{recipe}: train.lr_schedule must be constant here, since the run's length grows epoch by epoch")
    budget, started, epochs = 60.0 * minutes, time.perf_counter(), 1
    last_epoch = timed(lambda: run_training(recipe_config(recipe, data, epochs), run_dir, resume=False))
    while time.perf_counter() - started + last_epoch <= budget:
        epochs += 1
        last_epoch = timed(lambda: run_training(recipe_config(recipe, data, epochs), run_dir, resume=True))
    model = load_trained_model(run_dir / "last.pt", resolve_compute("cpu", "fp32"))
    parameters = sum(p.numel() for p in model.network.parameters())
    return Trained(name, run_dir / "last.pt", epochs, (time.perf_counter() - started) / 60, parameters)


def recipe_config(recipe: Path, data: Path, epochs: int) -> RunConfig:
    """The recipe's YAML on the benchmark's data, with the shared settings and `epochs`."""
    return load_config(recipe, {**SAME_FOR_BOTH, "data": str(data), "train.epochs": epochs})


def timed(step: Callable[[], object]) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def ratio(a: float, b: float) -> str:
    """a / b, or '-' where b is not above zero (KID can be ≤ 0 for a near-perfect set)."""
    return f"{a / b:.2f}" if b > 0 else "-"


if __name__ == "__main__":
    main()
