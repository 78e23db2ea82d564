"""Sample quality vs steps for every sampler, on one trained model, against held-out slices.

The distance is kneegen's pixel-statistics Fréchet distance (kneegen/evaluation/pixel_distance.py)
between generated images and the checkpoint's validation split; lower is better. The floor
row compares training slices with the validation slices. Run after `make demo`:
    .venv/bin/python benchmarks/sampler_quality.py --checkpoint runs/<run>/best.pt --images 128
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from kneegen.data.cache import open_cache
from kneegen.engine.device import resolve_compute
from kneegen.engine.trained import load_trained_model
from kneegen.evaluation.pixel_distance import pixel_distance
from kneegen.sampling import SamplerChoice, sample_batches

SAMPLERS = ("ddim", "dpm++2m", "dpm++3m", "unipc")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 15, 25, 50])
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS))
    parser.add_argument("--no-ddpm", action="store_true", help="skip the 1000-step DDPM reference")
    args = parser.parse_args()

    compute = resolve_compute("auto", "auto")
    model = load_trained_model(args.checkpoint, compute)
    cache = open_cache(Path(model.config.data))
    reference = np.asarray(cache.split("val"))
    floor = pixel_distance(np.asarray(cache.split("train")[: len(reference)]), reference)
    seeds = list(range(args.images))
    print(f"{args.checkpoint}: {args.images} images per row vs {len(reference)} held-out slices")
    print(f"{'sampler':<9} {'steps':>5} {'distance':>9} {'vs ddpm-1000':>13} {'s/image':>8}")
    print(f"{'(train)':<9} {'-':>5} {floor:>9.2f}")

    def measure(name: str, steps: int) -> tuple[float, float]:
        started = time.perf_counter()
        choice = SamplerChoice(name, steps, 0.0)
        images = np.concatenate([batch for _, batch in sample_batches(model, compute, choice, seeds, 64)])
        return pixel_distance(images, reference), (time.perf_counter() - started) / len(seeds)

    ddpm = None
    if not args.no_ddpm:
        ddpm, seconds = measure("ddpm", model.schedule.timesteps)
        print(f"{'ddpm':<9} {model.schedule.timesteps:>5} {ddpm:>9.2f} {1.0:>13.2f} {seconds:>8.3f}", flush=True)
    for name in args.samplers:
        for steps in args.steps:
            distance, seconds = measure(name, steps)
            ratio = f"{distance / ddpm:>13.2f}" if ddpm else f"{'-':>13}"
            print(f"{name:<9} {steps:>5} {distance:>9.2f} {ratio} {seconds:>8.3f}", flush=True)


if __name__ == "__main__":
    main()
