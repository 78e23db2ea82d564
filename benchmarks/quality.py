"""Sample quality per CPU-minute: recipes trained for the same wall-clock budget, judged on
≥ 1,000 samples against ≥ 1,000 held-out slices, next to the data's own floor.

The phantom cache holds as many patients as the instrument needs: a training split the size of
the demo's (~1,300 slices) and a test split of other patients (~1,300 slices). Each recipe
trains for `--minutes` on it, draws `--samples` images with its own sampler and precision, and
is scored against the test split on the FID Inception features:
- FID and FID / floor, where the floor is the FID of as many real *training* slices as there
  are samples (evenly spread over the patients) against the same test split: the best any
  model can score at this N (FID is biased by N; the ratio is what compares across N);
- KID (unbiased; its spread over subsets);
- improved precision and recall (Kynkäänniemi et al. 2019, k = 3), recall also as a share of
  the floor's recall: below 0.5 the samples cover less than half of what real slices cover;
- the patch-fold artifact: mean radial power of the samples over that of real slices at the
  fold frequency (side / patch_size; the Nyquist radius for patch 1 and 2), 1 = clean;
- likely copies of training slices (evaluation/memorisation.py), with their chance rate;
- training images/s and the network's GFLOP per image, so quality per compute shows.
The CPU kind and the precision used are printed with the table; the recipes' choice depends on
both (see README: "Recipes by hardware").

Training by time: `train.minutes` stops each run at the first epoch end after which another
epoch would pass the budget (or, with `train.cooldown`, where its plan ends: made from the
pace of the last epochs, again after each). `--epochs N` trains every recipe for exactly N
epochs instead: the fair comparison for recipes whose steps cost the same (optimizer, LR
schedule, EMA) on a machine whose speed drifts (this one ran the same recipe at 57 and at 95
img/s within the hour). `--seeds 0 1 2` trains every recipe once per seed and reports mean and
spread. Fragments apply to today's `cpu-bf16`; `ema998-const-` in front gives the recipe that
screening rounds 1 and 2 ran on.

    .venv/bin/python benchmarks/quality.py --minutes 8 --recipes demo seed --samplers dpm++2m:25  # vs the original
    .venv/bin/python benchmarks/quality.py --minutes 8 --recipes old-demo uniform-minsnr5-ode \\
        uniform-ode minsnr5-ode ode demo bs16 lr2e3 ema999 ema995                    # screening
    .venv/bin/python benchmarks/quality.py --epochs 23 --recipes ema998-const-snap ema998-snap \\
        ema998-const-beta99-snap ema998-lr2e3-snap                                   # same steps (round 3)
    .venv/bin/python benchmarks/quality.py --minutes 0.3 --phantom 120 --held-out 0.5 \\
        --samples 24 --recipes demo                                                  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from kneegen.config import RunConfig, load_config
from kneegen.data.cache import open_cache
from kneegen.engine.device import resolve_compute
from kneegen.engine.trained import TrainedModel, load_trained_model
from kneegen.evaluation.features import INSTALL_HINT, extract_features, find_feature_weights, load_feature_extractor
from kneegen.evaluation.frechet import frechet_distance
from kneegen.evaluation.kid import kernel_inception_distance
from kneegen.evaluation.memorisation import compare_with_training, copy_chance, copy_fraction, pixel_vectors
from kneegen.evaluation.precision_recall import precision_recall
from kneegen.evaluation.spectrum import fold_radius, power_ratio_at
from kneegen.recipes import recipe_path
from kneegen.sampling import SamplerChoice, choose_sampler, sample_batches
from kneegen.training_run import run_training

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
IMAGE_SIZE = 64
SAME_FOR_ALL = {"device": "cpu", "train.val_images": 32, "train.val_timesteps": 2, "train.val_every": 1}
FEATURE_BATCH = 50
SAMPLE_BATCH = 64
MAX_EPOCHS = 100_000  # the budget ends every run first
CPU = torch.device("cpu")

# Named recipes: a YAML file and overrides on it. The shipped ones first, then screening variants.
RECIPES: dict[str, tuple[Path, dict[str, Any]]] = {
    "demo": (recipe_path("cpu-bf16"), {}),
    "demo-fp32": (recipe_path("cpu-fp32"), {}),
    "seed": (EXAMPLES / "seed.yaml", {}),
    "old-demo": (
        recipe_path("cpu-bf16"),
        {
            "model.unet.channels": 32,
            "model.unet.blocks_per_level": 2,
            "model.unet.patch_size": 4,
            "model.unet.attention_levels": [1],
            "train.batch_size": 16,
            "diffusion.timestep_sampling": "uniform",
            "diffusion.min_snr_gamma": 5.0,
            "sample.sampler": "dpm++2m",
        },
    ),  # examples/demo.yaml until 2026-12
}
SCREEN_AXES: dict[str, dict[str, Any]] = {  # name fragment → overrides on the bf16 recipe
    "w16": {"model.unet.channels": 16},
    "w24": {"model.unet.channels": 24},
    "w32": {"model.unet.channels": 32},
    "w48": {"model.unet.channels": 48},
    "w64": {"model.unet.channels": 64},
    "w96": {"model.unet.channels": 96},
    "p1": {"model.unet.patch_size": 1},
    "p2": {"model.unet.patch_size": 2},
    "p4": {"model.unet.patch_size": 4},
    "uh8": {"model.unet.unfold_head": 8},  # a full-resolution 3×3 conv after the patch unfold
    "b1": {"model.unet.blocks_per_level": 1},
    "b2": {"model.unet.blocks_per_level": 2},
    "bs16": {"train.batch_size": 16},
    "bs32": {"train.batch_size": 32},
    "bs64": {"train.batch_size": 64},
    "lr5e4": {"train.lr": 5e-4},
    "lr1e3": {"train.lr": 1e-3},
    "lr2e3": {"train.lr": 2e-3},
    "lr3e3": {"train.lr": 3e-3},
    "lr4e3": {"train.lr": 4e-3},
    "warm25": {"train.warmup_steps": 25},
    "snap": {"train.ema_snapshots": True},  # power-EMA snapshots for kneegen ema (post-hoc EMA)
    "keep": {
        "train.keep_checkpoints": 100_000
    },  # every epoch's checkpoint, e.g. as guides (benchmarks/autoguidance.py)
    "ag3": {"sample.autoguidance": 3.0},  # cpu-fp32's w (w32-fp32-ag3 is that recipe)
    "gat5": {"train.guide_at": 0.5},  # a guide from half-way through the run
    "gat25": {"train.guide_at": 0.25},
    "noag": {"train.guide_at": 0.0, "sample.autoguidance": 1.0},  # no autoguidance (the recipes until 2026-12-03)
    "beta99": {"train.adam_beta2": 0.99},
    "len03": {"train.ema_length": 0.03},  # the EMA a power-function one of sigma_rel 0.03
    "len05": {"train.ema_length": 0.05},
    "len10": {"train.ema_length": 0.10},
    "cool": {"train.cooldown": 0.2},  # the LR falls linearly to 0 over the last 20 % of the planned run
    "const": {"train.cooldown": 0.0},  # a constant LR after the warm-up (the recipes until round 3)
    "cool4": {"train.cooldown": 0.4},
    "ema995": {"train.ema_decay": 0.995, "train.ema_length": 0.0},
    "ema998": {"train.ema_decay": 0.998, "train.ema_length": 0.0},
    "ema999": {"train.ema_decay": 0.999, "train.ema_length": 0.0},
    "attn1": {"model.unet.attention_levels": [1, 2]},
    "attn0": {"model.unet.attention_levels": []},
    "m124": {"model.unet.channel_mults": [1, 2, 4]},
    "m1222": {"model.unet.channel_mults": [1, 2, 2, 2]},
    "drop": {"model.unet.dropout": 0.1},
    "fp32": {"precision": "fp32"},
    "minsnr0": {"diffusion.min_snr_gamma": 0.0},
    "offset": {"diffusion.offset_noise": 0.1},
    "importance": {"diffusion.timestep_sampling": "importance"},
    "lognormal": {"diffusion.timestep_sampling": "lognormal"},
    "uniform": {"diffusion.timestep_sampling": "uniform"},
    "pm120": {
        "diffusion.lognormal_mean": -1.2
    },  # EDM's P_mean (made for data of std 0.5; the recipes until 2026-12-04)
    "pm186": {"diffusion.lognormal_mean": -1.86},  # ln(0.6 · 0.258): EDM's centre for the slices' std
    "ps06": {"diffusion.lognormal_std": 0.6},  # P_std: narrower log-normal noise levels (1.0: EDM2's)
    "ps08": {"diffusion.lognormal_std": 0.8},
    "ps10": {"diffusion.lognormal_std": 1.0},
    "ps14": {"diffusion.lognormal_std": 1.4},
    "minsnr5": {"diffusion.min_snr_gamma": 5.0},
    "ode": {"sample.sampler": "dpm++2m", "sample.steps": 25},
    "sde": {"sample.sampler": "dpm++2m-sde", "sample.steps": 25},
    "cond": {"model.conditions": ["side", "position"]},  # conditioned on knee side and slice position
}


@dataclass
class Trained:
    name: str
    seed: int
    checkpoint: Path
    epochs: int
    minutes: float
    images_per_s: float  # training images per second of the whole budget (validation included)


@dataclass
class Scores:
    fid: float
    kid: float
    kid_std: float
    precision: float
    recall: float
    fold_ratio: float
    copies: float
    copies_chance: float
    seconds_per_image: float


def recipe_config(name: str, data: Path, epochs: int, seed: int) -> RunConfig:
    """A named recipe (RECIPES, or screening fragments like w64-p2-b1 on the bf16 recipe)."""
    if name in RECIPES:
        path, overrides = RECIPES[name]
    else:
        path, overrides = recipe_path("cpu-bf16"), {}
        for fragment in name.split("-"):
            if fragment not in SCREEN_AXES:
                sys.exit(
                    f"recipe {name!r}: {fragment!r} is neither a recipe ({', '.join(RECIPES)}) nor a screening "
                    f"fragment ({', '.join(SCREEN_AXES)})"
                )
            overrides = {**overrides, **SCREEN_AXES[fragment]}
    return load_config(
        path, {**overrides, **SAME_FOR_ALL, "data": str(data), "train.epochs": epochs, "train.seed": seed}
    )


@dataclass
class Judge:
    """Every score against the same held-out slices, with the same sample seeds every time."""

    data: Path
    extractor: torch.jit.ScriptModule
    held_out: np.ndarray  # (H, h, w) uint8 test slices
    held_out_features: np.ndarray  # (H, 2048)
    train: np.ndarray  # (T, h, w) uint8
    train_features: np.ndarray  # (T, 2048)
    seeds: list[int]

    @classmethod
    def on(cls, data: Path, feature_weights: Path | None, samples: int) -> Judge:
        weights = find_feature_weights(feature_weights)
        if weights is None:
            sys.exit(f"FID Inception weights not found: {INSTALL_HINT}, or give --feature-weights PATH")
        extractor = load_feature_extractor(weights, CPU)
        cache = open_cache(data)
        held_out, train = np.asarray(cache.split_8bit("test")), np.asarray(cache.split_8bit("train"))
        if min(len(held_out), len(train)) < samples:
            sys.exit(
                f"{data}: {len(train)} training and {len(held_out)} test slices, fewer than --samples {samples}: "
                f"give a larger --phantom or fewer --samples"
            )
        features = data / "quality_features.npz"  # the real slices' features, computed once per cache
        if not features.is_file():
            np.savez(features, held_out=features_of(extractor, held_out), train=features_of(extractor, train))
        with np.load(features) as stored:
            return cls(data, extractor, held_out, stored["held_out"], train, stored["train"], list(range(samples)))

    def floor(self) -> tuple[Scores, np.ndarray]:
        """Real training slices, as many as the samples, spread evenly over the patients."""
        pick = np.linspace(0, len(self.train) - 1, len(self.seeds)).round().astype(int)
        return self.score(self.train[pick], self.train_features[pick], patch=1, seconds=0.0, copies=False), pick

    def samples(
        self, checkpoint: Path, choice: SamplerChoice | None = None, guide: Path | None = None
    ) -> tuple[Scores, np.ndarray, str]:
        """Scores of the checkpoint's samples, drawn as `kneegen sample` would (its sampler unless
        `choice` says otherwise, its precision resolved on this machine), and the images; with
        `guide`, that checkpoint's weights are its autoguidance guide instead of its own."""
        probe = load_trained_model(checkpoint, resolve_compute("cpu", "fp32"))
        compute = resolve_compute("cpu", probe.config.precision)
        model = load_trained_model(checkpoint, compute)
        if guide is not None:
            model.guide = load_trained_model(guide, compute).network
        choice = choice or choose_sampler(model, None, None, None)
        started = time.perf_counter()
        images = np.concatenate(
            [batch for _, batch in sample_batches(model, compute, choice, self.seeds, SAMPLE_BATCH)]
        )
        seconds = (time.perf_counter() - started) / len(self.seeds)
        features = features_of(self.extractor, images)
        patch = model.fold
        return self.score(images, features, patch, seconds), images, f"{choice.describe()}, {compute.describe()}"

    def score(
        self, images: np.ndarray, features: np.ndarray, patch: int, seconds: float, copies: bool = True
    ) -> Scores:
        kid = kernel_inception_distance(features, self.held_out_features)
        pr = precision_recall(self.held_out_features, features)
        side = min(images.shape[1:])
        fold = power_ratio_at(images, self.held_out, fold_radius(side, max(patch, 2)))
        flagged, chance = 0.0, 0.0
        if copies:
            spaces = [
                compare_with_training(features, self.held_out_features, self.train_features),
                compare_with_training(images, self.held_out, self.train, pixel_vectors),
            ]
            flagged, chance = copy_fraction(*spaces), copy_chance(*spaces)
        return Scores(
            frechet_distance(features, self.held_out_features),
            kid.mean,
            kid.std,
            pr.precision,
            pr.recall,
            fold,
            flagged,
            chance,
            seconds,
        )


def judge_on_phantom(
    work: Path, count: int, held_out: float, feature_weights: Path | None, samples: int
) -> tuple[Judge, Scores]:
    """The CPU kind, then the phantom cache of `count` slices (made once) and its judge, with the
    real-vs-real floor at `samples` images, printed: the preamble of every phantom benchmark."""
    print(f"CPU: {cpu_kind()}", flush=True)
    judge = Judge.on(prepare_phantom(work, count, held_out), feature_weights, samples)
    floor, _ = judge.floor()
    print(
        f"{len(judge.train)} training and {len(judge.held_out)} held-out phantom slices at {IMAGE_SIZE}²; "
        f"{samples} samples per score; floor FID {floor.fid:.2f}, recall {floor.recall:.3f}",
        flush=True,
    )
    return judge, floor


def add_judge_arguments(parser: argparse.ArgumentParser, work: Path) -> None:
    """The phantom and the instrument's options, the same in every phantom benchmark."""
    parser.add_argument("--phantom", type=int, default=2900, help="phantom slices in the cache")
    parser.add_argument("--held-out", type=float, default=0.45, help="fraction of patients in the test split")
    parser.add_argument("--samples", type=int, default=1000, help="images per score (and real slices in the floor)")
    parser.add_argument("--work", type=Path, default=work, help="cache and run dirs go here")
    parser.add_argument("--feature-weights", type=Path, default=None)


def features_of(extractor: torch.jit.ScriptModule, images: np.ndarray) -> np.ndarray:
    return extract_features(extractor, images, FEATURE_BATCH, CPU)


def prepare_phantom(work: Path, count: int, held_out: float, size: int = IMAGE_SIZE) -> Path:
    """The phantom cache at `size`², made once through the CLI: train / val / test by patient, the
    test split `held_out` of the patients."""
    data = work / "data"
    if (data / "manifest.json").is_file():
        manifest = json.loads((data / "manifest.json").read_text())
        if len(manifest["slices"]) != count or manifest["image_shape"] != [size, size]:
            sys.exit(f"{data} holds another phantom: remove it or give another --work")
        return data
    val = 0.1
    command = [
        sys.executable,
        "-m",
        "kneegen",
        "prepare",
        "--phantom",
        str(count),
        "--size",
        str(size),
        "--out",
        str(data),
        "--phantom-dir",
        str(work / "phantom"),
        "--val-fraction",
        str(val),
        "--test-fraction",
        str(held_out),
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return data


def train_for(name: str, seed: int, data: Path, run_dir: Path, minutes: float, epochs: int = 0) -> Trained:
    """Train the recipe epoch by epoch while the last epoch's time still fits in the budget, or for
    exactly `epochs` epochs: the fair budget when recipes differ only in what a step does with the
    same compute (optimizer, LR schedule, EMA) on a machine whose speed drifts."""
    if run_dir.exists():
        sys.exit(f"{run_dir} exists: remove it or give another --work, so every recipe starts from scratch")
    if recipe_config(name, data, 1, seed).train.lr_schedule != "constant":
        sys.exit(f"{name}: train.lr_schedule must be constant here, since the run's length grows epoch by epoch")
    cfg = recipe_config(name, data, epochs or MAX_EPOCHS, seed)
    cfg.train.minutes = 0.0 if epochs else minutes
    started = time.perf_counter()
    epochs = run_training(cfg, run_dir).epoch
    elapsed = time.perf_counter() - started
    seen = epochs * len(open_cache(data).split("train"))
    return Trained(name, seed, run_dir / "last.pt", epochs, elapsed / 60, seen / elapsed)


def network_facts(model: TrainedModel) -> tuple[float, float]:
    """(million parameters, forward GFLOP per image)."""
    network = model.network
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        network(torch.zeros(1, *model.sample_shape), torch.zeros(1, dtype=torch.long))
    return sum(p.numel() for p in network.parameters()) / 1e6, counter.get_total_flops() / 1e9


def cpu_kind() -> str:
    """The CPU model, its widest vector ISA and whether bf16 is native: what a recipe depends on."""
    model = platform.processor() or "cpu"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    bf16 = resolve_compute("cpu", "auto").dtype is not None
    return (
        f"{model}, {torch.backends.cpu.get_cpu_capability()}, bf16 {'native' if bf16 else 'not native'}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )


def save_grid(path: Path, rows: dict[str, np.ndarray], count: int = 8) -> None:
    """One row of `count` images per entry (real slices first), for a look beside the numbers."""
    from kneegen.viz import image_grid, save_png

    tiles = np.concatenate([images[:count] for images in rows.values()])
    save_png(image_grid(tiles, columns=count), path)


def sampler_choice(text: str) -> SamplerChoice:
    """NAME:STEPS[:ETA[:SPACING[:AUTOGUIDANCE[:SIGMA_MAX[:keep]]]]], as --samplers takes it: autoguidance 1
    (off) unless given, at every noise level unless SIGMA_MAX is (the interval σ ≤ SIGMA_MAX); `keep`
    leaves a patch network's fold frequencies in (kneegen takes them out: engine/fold.py)."""
    name, steps, *rest = text.split(":")
    eta, spacing, autoguidance, sigma_max, fold = (rest + ["0", "auto", "1", "inf", "remove"][len(rest) :])[:5]
    if fold not in ("keep", "remove"):
        sys.exit(f"--samplers {text}: the seventh field is 'keep' or 'remove' (the fold frequencies), not {fold!r}")
    return SamplerChoice(
        name,
        int(steps),
        float(eta),
        spacing,
        autoguidance=float(autoguidance),
        autoguidance_sigma_max=float(sigma_max),
        keep_fold=fold == "keep",
    )


def score_samplers(judge: Judge, floor: Scores, checkpoint: Path, samplers: list[str]) -> None:
    """One trained checkpoint, several samplers: FID and the rest for each."""
    print(
        f"{checkpoint}\n{'sampler':<16} {'FID':>7} {'×floor':>6} {'KID':>7} {'prec':>5} {'recall':>6} {'fold':>5} "
        f"{'copies':>11} {'s/img':>6}"
    )
    for text in samplers or [None]:
        s, _, how = judge.samples(checkpoint, sampler_choice(text) if text else None)
        print(
            f"{text or how:<16} {s.fid:>7.2f} {s.fid / floor.fid:>6.2f} {s.kid:>7.4f} {s.precision:>5.3f} "
            f"{s.recall:>6.3f} {s.fold_ratio:>5.2f} {s.copies:>5.3f}/{s.copies_chance:<5.3f} "
            f"{s.seconds_per_image:>6.3f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=8.0, help="training budget per recipe and seed")
    parser.add_argument("--epochs", type=int, default=0, help="train exactly this many epochs instead of --minutes")
    parser.add_argument(
        "--recipes", nargs="+", default=["demo", "seed"], help="names from RECIPES or screening fragments"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="train.seed values; several give the spread")
    add_judge_arguments(parser, Path("runs/bench_quality"))
    parser.add_argument("--score", type=Path, nargs="+", help="only score these trained checkpoints (of --work's data)")
    parser.add_argument(
        "--samplers",
        nargs="+",
        default=[],
        help="NAME:STEPS[:ETA[:SPACING[:AUTOGUIDANCE[:SIGMA_MAX[:keep]]]]], e.g. ddim:50:1, ddim:4:0:trailing, "
        "dpm++2m-sde:25:0:auto:2 (autoguided at every step; 1 = off) or dpm++2m-sde:25:0:auto:2:1 (at σ ≤ 1 only): "
        "with --score, each; after "
        "training, one for every recipe instead of its own (seed.yaml's DDPM-1000 would take hours for 1,000 samples)",
    )
    args = parser.parse_args()
    if len(args.samplers) > 1 and not args.score:
        sys.exit("--samplers: one sampler after training (several only with --score)")
    forced = sampler_choice(args.samplers[0]) if args.samplers and not args.score else None
    for name in args.recipes:
        recipe_config(name, Path("data"), 1, 0)  # a misspelt recipe stops here, not after hours of training

    judge, floor = judge_on_phantom(args.work, args.phantom, args.held_out, args.feature_weights, args.samples)
    if args.score:
        for checkpoint in args.score:
            score_samplers(judge, floor, checkpoint, args.samplers)
        return
    rows: list[tuple[Trained, Scores, str, tuple[float, float]]] = []
    grid = {"real": judge.held_out[np.linspace(0, len(judge.held_out) - 1, 8).round().astype(int)]}
    for name in args.recipes:
        for seed in args.seeds:
            run = train_for(name, seed, judge.data, args.work / f"{name}-seed{seed}", args.minutes, args.epochs)
            scores, images, how = judge.samples(run.checkpoint, forced)
            facts = network_facts(load_trained_model(run.checkpoint, resolve_compute("cpu", "fp32")))
            rows.append((run, scores, how, facts))
            grid[f"{name}-seed{seed}"] = images
            print(
                f"  {name} seed {seed}: {run.epochs} epochs in {run.minutes:.1f} min, {run.images_per_s:.1f} img/s, "
                f"FID {scores.fid:.2f} ({scores.fid / floor.fid:.2f}× floor), KID {scores.kid:.4f}, precision "
                f"{scores.precision:.3f}, recall {scores.recall:.3f}, fold {scores.fold_ratio:.2f}, copies "
                f"{scores.copies:.3f}/{scores.copies_chance:.3f}; {how}",
                flush=True,
            )
    save_grid(args.work / "grid.png", grid)

    budget = f"{args.epochs} epochs" if args.epochs else f"{args.minutes:g} min"
    print(f"\n{budget} of training per recipe on {cpu_kind()}")
    print(
        f"floor (real vs real, N = {args.samples}): FID {floor.fid:.2f}, KID {floor.kid:.4f}, precision "
        f"{floor.precision:.3f}, recall {floor.recall:.3f}, fold-power ratio {floor.fold_ratio:.2f}"
    )
    header = (
        f"{'recipe':<22} {'seed':>4} {'params':>7} {'GFLOP':>6} {'epochs':>6} {'img/s':>6} {'FID':>7} {'×floor':>6} "
        f"{'KID':>7} {'prec':>5} {'recall':>6} {'÷floor':>6} {'fold':>5} {'copies':>11} {'s/img':>6}"
    )
    print(header)
    for run, s, _, (params, gflop) in rows:
        print(
            f"{run.name:<22} {run.seed:>4} {params:>6.2f}M {gflop:>6.2f} {run.epochs:>6} {run.images_per_s:>6.1f} "
            f"{s.fid:>7.2f} {s.fid / floor.fid:>6.2f} {s.kid:>7.4f} {s.precision:>5.3f} {s.recall:>6.3f} "
            f"{s.recall / floor.recall:>6.2f} {s.fold_ratio:>5.2f} {s.copies:>5.3f}/{s.copies_chance:<5.3f} "
            f"{s.seconds_per_image:>6.3f}"
        )
    for name in args.recipes:
        fids = [s.fid for run, s, _, _ in rows if run.name == name]
        if len(fids) > 1:
            print(f"{name}: FID {np.mean(fids):.2f} ± {np.std(fids, ddof=1):.2f} over seeds {args.seeds}")
    print("sampling: " + "; ".join(f"{run.name} {how}" for run, _, how, _ in rows[:: len(args.seeds)]))
    print(f"copies: share of samples flagged as likely copies / its chance rate; grid: {args.work / 'grid.png'}")
    print("reproduce: .venv/bin/python benchmarks/quality.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
