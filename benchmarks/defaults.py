"""Which training options to turn on by default: each one alone, ranked by FID.

Every variant trains the same recipe (examples/demo.yaml unless --recipe) with every screened
option off (constant LR, no Min-SNR, no offset noise, uniform t) and at most one turned on, for
the same number of epochs on the same phantom cache at 64²; then draws the same seeds with the
same sampler and is scored by FID and KID against the cache's held-out split (as in
benchmarks/quality.py). The options do not change the network, so equal epochs are equal
compute, and the ranking does not depend on how busy the machine was. The "all off, seed 1" row
repeats "all off" with another training seed: differences smaller than its distance to "all off" are
noise.

    .venv/bin/python benchmarks/defaults.py --epochs 25                      # the screening
    .venv/bin/python benchmarks/defaults.py --epochs 1 --phantom 200 --samples 16 --only "all off" "min-SNR 5"   # smoke

A variant whose run dir already holds a finished run of the same config is scored again, not
retrained, so a screening can be extended with --only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from quality import EXAMPLES, SAME_FOR_BOTH, Judge, prepare_phantom, timed

from kneegen.config import RunConfig, load_config
from kneegen.training_run import CONFIG_FILE, run_training

OFF: dict[str, Any] = {  # every screened option at its "off" value: the base each variant changes
    "train.lr_schedule": "constant",
    "diffusion.min_snr_gamma": 0.0,
    "diffusion.offset_noise": 0.0,
    "diffusion.timestep_sampling": "uniform",
}
VARIANTS: dict[str, dict[str, Any]] = {
    "all off": {},
    "all off, seed 1": {"train.seed": 1},
    "cosine lr": {"train.lr_schedule": "cosine"},
    "min-SNR 5": {"diffusion.min_snr_gamma": 5.0},
    "offset noise 0.1": {"diffusion.offset_noise": 0.1},
    "importance t": {"diffusion.timestep_sampling": "importance"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=EXAMPLES / "demo.yaml")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--phantom", type=int, default=1600)
    parser.add_argument("--samples", type=int, default=128, help="images per FID/KID")
    parser.add_argument("--sampler", default="dpm++2m")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--work", type=Path, default=Path("runs/bench_defaults"), help="cache and run dirs go here")
    parser.add_argument("--feature-weights", type=Path, default=None)
    args = parser.parse_args()

    judge = Judge.on(prepare_phantom(args.work, args.phantom), args.feature_weights, args.samples)
    rows = []
    for name in args.only:
        cfg = load_config(args.recipe, {**SAME_FOR_BOTH, "data": str(judge.data), "train.epochs": args.epochs,
                                        **OFF, **VARIANTS[name]})
        run_dir = args.work / name.replace(",", "").replace(" ", "_")
        minutes = train_once(cfg, run_dir)
        fid, kid, _ = judge.samples(run_dir / "last.pt", args.sampler, args.steps)
        rows.append((name, fid, kid, minutes))
        print(f"  {name}: FID {fid:.2f}, KID {kid:.4f}, trained in {minutes}", flush=True)

    print(f"\n{args.recipe.name}, {args.epochs} epochs each; {judge.describe()}; {args.sampler} {args.steps} steps")
    floor_fid, floor_kid = judge.floor()
    print(f"{'variant':<17} {'FID':>7} {'KID':>7} {'vs off':>7} {'minutes':>8}")
    print(f"{'(floor)':<17} {floor_fid:>7.2f} {floor_kid:>7.4f}")
    baseline = next((fid for name, fid, _, _ in rows if name == "all off"), None)
    for name, fid, kid, minutes in sorted(rows, key=lambda row: row[1]):
        versus = f"{fid / baseline:.2f}" if baseline else "-"
        print(f"{name:<17} {fid:>7.2f} {kid:>7.4f} {versus:>7} {minutes:>8}")
    print("vs off = FID / the FID of 'all off': below 1, the option helped (beyond the seed-1 spread)")


def train_once(cfg: RunConfig, run_dir: Path) -> str:
    """Train `cfg` into `run_dir`, or reuse a run of the same config there; the minutes it took."""
    if (run_dir / "last.pt").is_file():
        if load_config(run_dir / CONFIG_FILE) != cfg:
            sys.exit(f"{run_dir} holds a run of another config: remove it or give another --work")
        return "(reused)"
    return f"{timed(lambda: run_training(cfg, run_dir, resume=False)) / 60:.1f}"


if __name__ == "__main__":
    main()
