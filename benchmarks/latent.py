"""Latent diffusion at 256² against pixel diffusion, measured side by side in one run.

`speed` (no data; networks with their initial weights, which cost what trained ones cost):
- training images/s of the pixel recipe (examples/akoa-256.yaml) and of the latent recipe
  (examples/latent-256.yaml on 4×64×64 latents) at equal batch, and the latent one at its own
  batch, with the minutes an epoch of 18,000 slices takes (the one-off encoding shown apart);
- the autoencoder's (examples/autoencoder-256.yaml) training crops/s and encoding images/s;
- sampling images/min through `kneegen.sampling.sample_batches` with each recipe's default
  sampler and steps, the latent one decoder included;
- the peak memory (resident set) of a process training the latent recipe at its default batch.
`autoencoder`: autoencoders at each `--factors` trained for `--minutes` on a 256² phantom, then
  ≥ 1,000 held-out slices reconstructed: reconstruction FID against the same originals, next to
  the real-vs-real floor at that N, PSNR and SSIM.
`latent`: the whole latent recipe on the same phantom within `--minutes` (autoencoder for
  `--autoencoder-share` of it, encoding, then diffusion), scored as benchmarks/quality.py scores.
`pixel`: a pixel recipe (`--recipe`: an example or a shipped recipe) trained on the same phantom
  for `--minutes`, scored the same way, beside any `--against` checkpoints (e.g. a latent run's
  last.pt) scored with the same slices and seeds: the "quality at equal budget" comparison.
The CPU kind and precision are printed first.

    .venv/bin/python benchmarks/latent.py speed
    ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python benchmarks/latent.py speed --precision fp32 --pixel-images 1
                                                                  # as an AVX2-only CPU would
    .venv/bin/python benchmarks/latent.py autoencoder --minutes 8 --factors 4 8
    .venv/bin/python benchmarks/latent.py autoencoder --minutes 8 --factors 4 --name gn --set model.vae.norm=group
                                                                  # a variant, in its own run dir
    .venv/bin/python benchmarks/latent.py autoencoder --epochs 7 --factors 4 --name s1 --set model.vae.spectral_weight=1
                                                                  # exactly 7 epochs: paired on a busy machine
    .venv/bin/python benchmarks/latent.py autoencoder --score runs/bench-latent/autoencoder/best.pt
    .venv/bin/python benchmarks/latent.py latent --minutes 30
    .venv/bin/python benchmarks/latent.py latent --minutes 30 --set KEY=VALUE --samplers dpm++2m-sde:25 …
                                                                  # a variant, scored with several samplers
    .venv/bin/python benchmarks/latent.py latent --minutes 30 --autoencoder-set KEY=VALUE
                                                                  # another autoencoder recipe
    .venv/bin/python benchmarks/latent.py pixel --minutes 30 --set train.batch_size=4 --samples 200 \
        --against runs/bench-latent/latent/last.pt              # the 256² example (batch 32 does not fit);
                                                                  # its samples take ~30 s each on 2 cores
    .venv/bin/python benchmarks/latent.py pixel --minutes 30 --recipe cpu-bf16 --set model.unet.patch_size=8
                                                                  # the latent recipe's network on 8×8 pixel patches
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml

from kneegen.config import RunConfig, load_config
from kneegen.data.cache import open_cache
from kneegen.data.latent_cache import open_latents
from kneegen.engine.autoencoder import Autoencoder, autoencoder_loss, latent_shape
from kneegen.engine.device import Compute, resolve_compute
from kneegen.engine.latent import LatentSpace, load_latent_space
from kneegen.engine.network import build_network
from kneegen.engine.pixels import to_model_range
from kneegen.engine.schedule import Schedule
from kneegen.engine.ssim import psnr, ssim
from kneegen.engine.trained import TrainedModel
from kneegen.evaluation.frechet import frechet_distance
from kneegen.metrics_log import peak_resident_mib
from kneegen.recipes import recipe_path
from kneegen.sampling import SamplerChoice, sample_batches
from kneegen.training_run import run_training
from kneegen.viz import image_grid, save_png

from quality import Judge, cpu_kind, features_of, prepare_phantom, sampler_choice  # benchmarks/ on sys.path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SIZE = 256
AKOA_SLICES = 18_000
EQUAL_BATCH = 4  # the pixel recipe's batch that fits in 24 GiB on a CPU (32 was killed)
SAMPLED = 8  # images per sampling measurement
CPU = torch.device("cpu")


def example(name: str, **overrides: object) -> RunConfig:
    """examples/NAME.yaml, or else the shipped recipe NAME, on the CPU with `overrides`."""
    path = EXAMPLES / f"{name}.yaml"
    return load_config(path if path.is_file() else recipe_path(name), {"device": "cpu", **overrides})


def per_second(step: Callable[[], None], items: int, repeats: int) -> float:
    """Items per second of `step`, after one warm-up call."""
    step()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    return items * repeats / (time.perf_counter() - started)


def diffusion_training_rate(cfg: RunConfig, shape: tuple[int, int, int], batch: int, compute: Compute) -> float:
    """Training images/s of the denoiser of `cfg` on inputs of `shape`, a bare step (forward,
    backward, fused AdamW): the engine's own overhead is measured by benchmarks/training.py."""
    torch.manual_seed(0)
    network = build_network(cfg.model, shape[1:], shape[0]).to(memory_format=compute.memory_format).train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4, fused=True)
    x = torch.randn(batch, *shape).to(memory_format=compute.memory_format)
    t = torch.randint(0, 1000, (batch,))

    def step() -> None:
        with compute.autocast():
            loss = network(x, t).float().square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return per_second(step, batch, repeats=3)


def autoencoder_rates(cfg: RunConfig, compute: Compute) -> tuple[float, float, Autoencoder]:
    """(training crops/s at the config's batch and crop, encoding images/s at 256²), and the network."""
    torch.manual_seed(0)
    network: Autoencoder = build_network(cfg.model, (SIZE, SIZE)).to(memory_format=compute.memory_format)  # type: ignore[assignment]
    settings, batch = network.cfg, cfg.train.batch_size
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4, fused=True)
    crops = torch.rand(batch, 1, settings.crop, settings.crop).mul(2).sub(1).to(memory_format=compute.memory_format)
    noise = torch.randn(batch, *latent_shape(settings, (settings.crop, settings.crop)))

    def train_step() -> None:
        with compute.autocast():
            reconstruction, mean, logvar = network(crops, noise)
        loss = autoencoder_loss(reconstruction, crops, mean, logvar, settings, compute.autocast).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    slices = torch.rand(16, 1, SIZE, SIZE).mul(2).sub(1)
    space = LatentSpace(network.eval(), "random", Path("(initial weights)"))
    train_rate = per_second(train_step, batch, repeats=3)
    encode_rate = per_second(lambda: space.encode(slices, compute), len(slices), repeats=2)
    return train_rate, encode_rate, network


def sampling_rate(model: TrainedModel, compute: Compute, count: int) -> float:
    """Images per minute of the model's default sampler and steps, decoding included, over
    `count` images in one batch."""
    choice = SamplerChoice(model.config.sample.sampler, model.config.sample.steps)
    seeds = list(range(count))
    list(sample_batches(model, compute, choice, seeds[:1], 1))  # warm-up
    started = time.perf_counter()
    for _ in sample_batches(model, compute, choice, seeds, count):
        pass
    return 60 * count / (time.perf_counter() - started)


def untrained_model(cfg: RunConfig, latent: LatentSpace | None) -> TrainedModel:
    shape = latent.shape_of((SIZE, SIZE)) if latent else (1, SIZE, SIZE)
    torch.manual_seed(0)
    network = build_network(cfg.model, shape[1:], shape[0]).eval()
    schedule = Schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps)
    return TrainedModel(network, schedule, cfg, (SIZE, SIZE), 0, Path("(initial weights)"), latent)


def peak_training_memory_mib(batch: int, precision: str) -> float:
    """Peak resident memory of a fresh process that takes training steps of the latent recipe."""
    probe = [sys.executable, __file__, "memory-probe", "--batch", str(batch), "--precision", precision]
    return float(subprocess.run(probe, check=True, capture_output=True, text=True).stdout.split()[-1])


def memory_probe(batch: int, precision: str) -> None:
    compute = resolve_compute("cpu", precision)
    diffusion_training_rate(example("latent-256"), (4, SIZE // 4, SIZE // 4), batch, compute)
    print(peak_resident_mib())


def speed(precision: str, pixel_images: int) -> None:
    compute = resolve_compute("cpu", precision)
    pixel_cfg, latent_cfg, vae_cfg = example("akoa-256"), example("latent-256"), example("autoencoder-256")
    latent_input = latent_shape(
        build_network(vae_cfg.model, (SIZE, SIZE)).cfg,  # type: ignore[union-attr]
        (SIZE, SIZE),
    )
    print(f"{cpu_kind()}; {compute.describe()}")

    pixel_rate = diffusion_training_rate(pixel_cfg, (1, SIZE, SIZE), EQUAL_BATCH, compute)
    latent_equal = diffusion_training_rate(latent_cfg, latent_input, EQUAL_BATCH, compute)
    own_batch = latent_cfg.train.batch_size
    latent_own = diffusion_training_rate(latent_cfg, latent_input, own_batch, compute)
    crops_rate, encode_rate, autoencoder = autoencoder_rates(vae_cfg, compute)
    print("\ntraining at 256² (bare steps: forward, backward, AdamW)")
    print(f"  pixel  akoa-256,   batch {EQUAL_BATCH:>2}: {pixel_rate:8.2f} img/s")
    print(f"  latent latent-256, batch {EQUAL_BATCH:>2}: {latent_equal:8.2f} img/s  (×{latent_equal / pixel_rate:.1f})")
    print(f"  latent latent-256, batch {own_batch:>2}: {latent_own:8.2f} img/s")
    print(
        f"  an epoch of {AKOA_SLICES:,} slices: latent {AKOA_SLICES / latent_own / 60:.1f} min "
        f"(+ {AKOA_SLICES / encode_rate / 60:.1f} min encoding, once), pixel {AKOA_SLICES / pixel_rate / 3600:.1f} h"
    )
    crop = vae_cfg.model.sections["vae"]["crop"]
    print(f"  autoencoder: {crops_rate:.1f} crops/s of {crop}² at batch {vae_cfg.train.batch_size}")

    space = LatentSpace(autoencoder.eval(), "random", Path("(initial weights)"))
    pixel_per_min = sampling_rate(untrained_model(pixel_cfg, None), compute, pixel_images)
    latent_per_min = sampling_rate(untrained_model(latent_cfg, space), compute, SAMPLED)
    print(f"\nsampling 256² slices (default sampler and steps; latent batch {SAMPLED}, pixel batch {pixel_images})")
    print(f"  pixel  {pixel_cfg.sample.sampler}-{pixel_cfg.sample.steps}: {pixel_per_min:8.1f} img/min")
    print(
        f"  latent {latent_cfg.sample.sampler}-{latent_cfg.sample.steps} + decoder: {latent_per_min:8.1f} img/min "
        f"(×{latent_per_min / pixel_per_min:.1f})"
    )
    peak = peak_training_memory_mib(own_batch, precision)
    print(f"\npeak memory training latent-256 at batch {own_batch}: {peak:,.0f} MiB")


def train(cfg: RunConfig, run_dir: Path, minutes: float, epochs: int = 0) -> tuple[Path, float, int]:
    """(best.pt, minutes taken, epochs) of `cfg` trained for a wall-clock budget, or for exactly
    `epochs` when given (paired comparisons, unaffected by what else the machine runs)."""
    if run_dir.exists():
        sys.exit(f"{run_dir} exists: remove it or give another --work, so every run starts from scratch")
    cfg.train.minutes, cfg.train.epochs = (0.0, epochs) if epochs else (minutes, 100_000)
    started = time.perf_counter()
    epochs = run_training(cfg, run_dir).epoch
    return run_dir / "best.pt", (time.perf_counter() - started) / 60, epochs


def reconstruct(space: LatentSpace, images: np.ndarray, compute: Compute) -> tuple[np.ndarray, float, float]:
    """(reconstructed uint8 slices, mean PSNR, mean SSIM) of (N, H, W) uint8 slices."""
    outputs, psnrs, ssims = [], [], []
    for start in range(0, len(images), 32):
        x = to_model_range(images[start : start + 32], CPU)
        y = space.decode(space.encode(x, compute), compute).clamp(-1, 1).cpu()
        psnrs.append(psnr(y, x))
        ssims.append(ssim(y, x))
        outputs.append(((y + 1) * 127.5).round().squeeze(1).to(torch.uint8).numpy())
    return np.concatenate(outputs), torch.cat(psnrs).mean().item(), torch.cat(ssims).mean().item()


RECONSTRUCTION_HEADER = (
    f"{'f':>3} {'latent':>10} {'minutes':>8} {'epochs':>7} {'rec. FID':>9} {'×floor':>7} {'PSNR':>7} {'SSIM':>7}"
)


def reconstruction_row(
    judge: Judge, floor_fid: float, checkpoint: Path, minutes: float, epochs: int, compute: Compute
) -> tuple[str, np.ndarray]:
    """The table row of an autoencoder: its reconstructions of the held-out slices scored
    against the same originals; and the reconstructions."""
    space = load_latent_space(checkpoint, compute, "benchmark")
    held_out = judge.held_out[: len(judge.seeds)]
    images, mean_psnr, mean_ssim = reconstruct(space, held_out, compute)
    fid = frechet_distance(features_of(judge.extractor, images), judge.held_out_features[: len(held_out)])
    shape = "x".join(map(str, space.shape_of((SIZE, SIZE))))
    row = (
        f"{space.settings.factor:>3} {shape:>10} {minutes:>8.1f} {epochs:>7} {fid:>9.2f} {fid / floor_fid:>7.2f} "
        f"{mean_psnr:>7.2f} {mean_ssim:>7.4f}"
    )
    return row, images


def open_judge(args: argparse.Namespace) -> tuple[Judge, float]:
    """The 256² phantom's judge and its real-vs-real floor FID, printed with the CPU kind."""
    judge = Judge.on(prepare_phantom(args.work, args.phantom, args.held_out, SIZE), None, args.samples)
    floor, _ = judge.floor()
    print(f"{cpu_kind()}; {resolve_compute('cpu', 'auto').describe()}")
    print(
        f"{len(judge.train)} training and {len(judge.held_out)} held-out phantom slices at {SIZE}²; "
        f"{args.samples} per score; real-vs-real floor FID {floor.fid:.2f}, recall {floor.recall:.3f}"
    )
    return judge, floor.fid


def overrides_of(settings: list[str]) -> dict[str, object]:
    """--set KEY=VALUE … as config overrides, each value read as YAML."""
    return {key: yaml.safe_load(value) for key, value in (setting.split("=", 1) for setting in settings)}


def autoencoders(args: argparse.Namespace) -> None:
    compute = resolve_compute("cpu", "auto")
    judge, floor_fid = open_judge(args)
    print(RECONSTRUCTION_HEADER)
    rows = {"real": judge.held_out}
    for checkpoint in args.score:  # already trained: no training below
        epochs = torch.load(checkpoint, map_location="cpu", weights_only=True)["epoch"]
        row, rows[checkpoint.parent.name] = reconstruction_row(judge, floor_fid, checkpoint, math.nan, epochs, compute)
        print(f"{row}  {checkpoint}", flush=True)
    for factor in [] if args.score else args.factors:
        cfg = example("autoencoder-256", data=str(judge.data), **{"model.vae.factor": factor, **overrides_of(args.set)})
        run_dir = args.work / f"autoencoder-f{factor}{'-' + args.name if args.name else ''}"
        checkpoint, minutes, epochs = train(cfg, run_dir, args.minutes, args.epochs)
        row, rows[f"f{factor}"] = reconstruction_row(judge, floor_fid, checkpoint, minutes, epochs, compute)
        print(row, flush=True)
    grid = image_grid([image for row in rows.values() for image in row[:6]], columns=6)
    save_png(grid, args.work / "reconstructions.png", {"rows": ", ".join(rows)})
    print(f"grid (rows: {', '.join(rows)}): {args.work / 'reconstructions.png'}")


def latent_budget(args: argparse.Namespace) -> None:
    compute = resolve_compute("cpu", "auto")
    judge, floor_fid = open_judge(args)
    started = time.perf_counter()
    vae_cfg = example("autoencoder-256", data=str(judge.data), **overrides_of(args.autoencoder_set))
    autoencoder, vae_minutes, vae_epochs = train(
        vae_cfg, args.work / "autoencoder", args.minutes * args.autoencoder_share
    )
    left = args.minutes - (time.perf_counter() - started) / 60
    latent_cfg = example(
        "latent-256", data=str(judge.data), **{"model.autoencoder": str(autoencoder), **overrides_of(args.set)}
    )
    # The budget includes encoding the cache: run_training encodes before its clock starts, so
    # encode first and take its time off the diffusion's share.
    encode_started = time.perf_counter()
    open_latents(open_cache(judge.data), load_latent_space(autoencoder, compute, "benchmark"), compute)
    left -= (time.perf_counter() - encode_started) / 60
    checkpoint, latent_minutes, latent_epochs = train(latent_cfg, args.work / "latent", left)
    total = (time.perf_counter() - started) / 60
    print(RECONSTRUCTION_HEADER)
    print(reconstruction_row(judge, floor_fid, autoencoder, vae_minutes, vae_epochs, compute)[0])
    print(
        f"autoencoder {vae_minutes:.1f} min ({vae_epochs} epochs), diffusion {latent_minutes:.1f} min "
        f"({latent_epochs} epochs), {total:.1f} min in all"
    )
    samples = [
        sample_row(judge, floor_fid, checkpoint.parent / "last.pt", sampler_choice(text) if text else None)
        for text in args.samplers or [None]
    ]
    grid = image_grid([*judge.held_out[:8], *samples[0][:8]], columns=8)
    save_png(grid, args.work / "latent_samples.png", {"rows": "held-out slices, latent samples"})
    print(f"grid (held-out above, samples below): {args.work / 'latent_samples.png'}")


def sample_row(judge: Judge, floor_fid: float, checkpoint: Path, choice: SamplerChoice | None = None) -> np.ndarray:
    """Print the scores of the checkpoint's samples (its own sampler unless `choice`); return them."""
    scores, images, described = judge.samples(checkpoint, choice)
    print(
        f"sampled with {described}: FID {scores.fid:.2f} (floor {floor_fid:.2f}, ×{scores.fid / floor_fid:.2f}), "
        f"KID {scores.kid:.4f}, precision {scores.precision:.3f}, recall {scores.recall:.3f}, "
        f"likely copies {scores.copies:.1%}, {scores.seconds_per_image:.3f} s/image  {checkpoint}",
        flush=True,
    )
    return images


def pixel_budget(args: argparse.Namespace) -> None:
    judge, floor_fid = open_judge(args)
    cfg = example(args.recipe, data=str(judge.data), **overrides_of(args.set))
    run_dir = args.work / f"pixel-{args.recipe}{'-' + args.name if args.name else ''}"
    checkpoint, minutes, epochs = train(cfg, run_dir, args.minutes, args.epochs)
    print(f"pixel {args.recipe} {' '.join(args.set)}: {minutes:.1f} min, {epochs} epochs")
    rows = [judge.held_out, sample_row(judge, floor_fid, checkpoint.parent / "last.pt")]
    rows += [sample_row(judge, floor_fid, against) for against in args.against]
    grid = image_grid([image for row in rows for image in row[:8]], columns=8)
    save_png(grid, run_dir / "samples.png", {"rows": "held-out slices, pixel samples, then each --against"})
    print(f"grid (held-out, pixel samples, then each --against): {run_dir / 'samples.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("speed", "memory-probe"):
        command = commands.add_parser(name)
        command.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    commands.choices["speed"].add_argument(
        "--pixel-images", type=int, default=SAMPLED, help="pixel samples timed (fewer: faster on slow CPUs)"
    )
    commands.choices["memory-probe"].add_argument("--batch", type=int, required=True)
    for name in ("autoencoder", "latent", "pixel"):
        command = commands.add_parser(name)
        command.add_argument("--work", type=Path, default=Path("runs/bench-latent"))
        command.add_argument("--minutes", type=float, default=8.0 if name == "autoencoder" else 30.0)
        command.add_argument("--phantom", type=int, default=2600)
        command.add_argument("--held-out", type=float, default=0.45)
        command.add_argument("--samples", type=int, default=1000)
    commands.choices["autoencoder"].add_argument("--factors", type=int, nargs="+", default=[4, 8])
    for name in ("autoencoder", "latent", "pixel"):
        commands.choices[name].add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override on the example, e.g. train.lr=2e-3",
        )
    commands.choices["latent"].add_argument(
        "--samplers",
        nargs="+",
        default=[],
        help="score the latent model with each (benchmarks/quality.py's NAME:STEPS[:ETA[:SPACING[:AUTOGUIDANCE"
        "[:SIGMA_MAX]]]]); default: its own sampler",
    )
    for name in ("autoencoder", "pixel"):
        commands.choices[name].add_argument("--name", default="", help="suffix of the run dirs: one per variant")
        commands.choices[name].add_argument(
            "--epochs", type=int, default=0, help="train exactly this many epochs instead of --minutes"
        )
    commands.choices["pixel"].add_argument(
        "--recipe", default="akoa-256", help="an example (examples/NAME.yaml) or a shipped recipe (cpu-bf16)"
    )
    commands.choices["pixel"].add_argument(
        "--against", type=Path, nargs="+", default=[], help="checkpoints scored beside it, e.g. a latent run's last.pt"
    )
    commands.choices["autoencoder"].add_argument(
        "--score", type=Path, nargs="+", default=[], help="score these autoencoder checkpoints instead of training"
    )
    commands.choices["latent"].add_argument("--autoencoder-share", type=float, default=0.3)
    commands.choices["latent"].add_argument(
        "--autoencoder-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override on the autoencoder's example, e.g. model.vae.adversarial_weight=0.5",
    )
    args = parser.parse_args()
    if args.command == "speed":
        speed(args.precision, args.pixel_images)
    elif args.command == "memory-probe":
        memory_probe(args.batch, args.precision)
    elif args.command == "autoencoder":
        autoencoders(args)
    elif args.command == "latent":
        latent_budget(args)
    else:
        pixel_budget(args)


if __name__ == "__main__":
    main()
