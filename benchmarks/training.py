"""Training speed and memory of one training step, side by side, each in its own process.

Rows, measured in one run at 64² (override with --size / --batch / --seed-batch):
  kneegen's recipe for this CPU (kneegen/recipes: cpu-bf16 where bf16 is native, else cpu-fp32)
    through kneegen's own training step (`epoch_steps`: fused AdamW, EMA, clipping, Min-SNR
    weights, the checkpointable generator);
  a plain loop around the same network and precision: random images, v-target MSE, backward,
    fused AdamW, nothing else. kneegen's step should match it: what it adds is not the network;
  a diffusers UNet2DModel shaped like it (64-128-128 family, attention at the lowest level),
    its width chosen so its forward FLOPs match kneegen's, trained the way diffusers'
    train_unconditional.py example does: fp32, AdamW(betas 0.95/0.999, wd 1e-6), MSE on ε,
    clipping at 1.0, cosine LR schedule, no compile;
  the original recipe (examples/seed.yaml: arch seed, fp32, Adam, L1, batch 16) through
    kneegen's training step.
TFLOP/s counts 3× the forward FLOPs per image (forward and backward) and is set against the
matmul peak of the row's precision, measured in the same run (2048² matmuls).
Peak memory is the growth of the process's peak RSS (VmHWM) over the run, or
torch.cuda.max_memory_allocated on a GPU; each row runs in a fresh process so peaks are its own.
    .venv/bin/python benchmarks/training.py                       # a few minutes on a 2-core CPU
    .venv/bin/python benchmarks/training.py --size 32 --steps 3   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from kneegen.config import ModelConfig, RunConfig, load_config
from kneegen.engine.device import Compute, resolve_compute
from kneegen.engine.network import build_network
from kneegen.engine.schedule import Schedule
from kneegen.engine.training import create_state, epoch_steps, with_noise_centre
from kneegen.metrics_log import peak_resident_mib
from kneegen.recipes import recipe_for, recipe_path

from quality import cpu_kind  # benchmarks/ is on sys.path when a script in it runs

SEED_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "seed.yaml"
DIFFUSERS_WIDTHS = (32, 64, 96, 128)  # base widths tried for the FLOP match (GroupNorm needs multiples of 32)
CONTENDERS = ("kneegen", "plain", "diffusers", "original")
PEAK_SIDE = 2048  # matmul size for the peak


# --- the contenders ------------------------------------------------------------------------------


def diffusers_unet(width: int) -> torch.nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(
        in_channels=1,
        out_channels=1,
        block_out_channels=(width, 2 * width, 2 * width),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    )


def forward_gflop(network: torch.nn.Module, size: int, call: Callable) -> float:
    """GFLOP of one forward of one image, counted on the meta device (no compute)."""
    network = network.to("meta")
    x, t = torch.zeros(1, 1, size, size, device="meta"), torch.zeros(1, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        call(network, x, t)
    return counter.get_total_flops() / 1e9


def matched_diffusers_width(size: int, model: ModelConfig) -> int:
    """The diffusers base width whose forward FLOPs are closest to kneegen's network."""
    target = forward_gflop(build_network(model, (size, size)), size, lambda n, x, t: n(x, t))
    flops = {w: forward_gflop(diffusers_unet(w), size, lambda n, x, t: n(x, t).sample) for w in DIFFUSERS_WIDTHS}
    return min(flops, key=lambda w: abs(flops[w] - target))


def kneegen_config(name: str, batch: int, seed_batch: int, device: str, precision: str) -> RunConfig:
    """The original recipe, or the recipe `kneegen train` picks here (the built-in defaults on a GPU)."""
    if name == "original":
        return load_config(SEED_CONFIG, {"train.batch_size": seed_batch, "device": device})
    chosen = recipe_for(resolve_compute(device, precision, allow_fp16=True))
    recipe = recipe_path(chosen[0]) if chosen else None
    return load_config(recipe, {"train.batch_size": batch, "device": device, "precision": precision})


def plain_steps(cfg: RunConfig, size: int, compute: Compute) -> tuple[torch.nn.Module, Callable]:
    """The least a training step can be for the same network: no EMA, clipping or weighting."""
    torch.manual_seed(0)
    network = build_network(cfg.model, (size, size)).to(compute.device, memory_format=compute.memory_format)
    optimizer = torch.optim.AdamW(network.parameters(), lr=cfg.train.lr, fused=True)
    alpha_bar = Schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps).alphas_cumprod.float()
    batch = cfg.train.batch_size

    def step() -> None:
        x0 = torch.rand(batch, 1, size, size) * 2 - 1
        noise = torch.randn_like(x0)
        t = torch.randint(0, len(alpha_bar), (batch,))
        a, s = alpha_bar[t].sqrt().view(-1, 1, 1, 1), (1 - alpha_bar[t]).sqrt().view(-1, 1, 1, 1)
        x_t, v = a * x0 + s * noise, a * noise - s * x0
        with compute.autocast():
            prediction = network(x_t.to(compute.device, memory_format=compute.memory_format), t.to(compute.device))
        loss = torch.nn.functional.mse_loss(prediction.float(), v.to(compute.device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return network, step


def matmul_peak(dtype: torch.dtype, device: torch.device) -> float:
    """TFLOP/s of square matmuls in `dtype`: the ceiling a network's step is set against."""
    a = torch.randn(PEAK_SIDE, PEAK_SIDE, device=device, dtype=dtype)
    for _ in range(2):
        a @ a
    synchronize_device(device)
    repeats, started = 10, time.perf_counter()
    for _ in range(repeats):
        a @ a
    synchronize_device(device)
    return 2 * PEAK_SIDE**3 * repeats / (time.perf_counter() - started) / 1e12


def kneegen_steps(cfg: RunConfig, size: int, steps: int, compute: Compute) -> tuple[torch.nn.Module, Callable]:
    """kneegen's real training step on random images: one call = one optimizer step."""
    cfg.train.epochs = 1
    images = np.random.default_rng(0).integers(0, 256, (cfg.train.batch_size * (steps + 1), size, size), np.uint8)
    cfg, _ = with_noise_centre(cfg, images)
    state = create_state(cfg, (size, size), compute)
    iterator = epoch_steps(state, images, Schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps), cfg, compute)
    return state.network, lambda: next(iterator)


def diffusers_steps(width: int, size: int, batch: int, compute: Compute) -> tuple[torch.nn.Module, Callable]:
    """One step of diffusers' examples/unconditional_image_generation/train_unconditional.py."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    model = diffusers_unet(width).to(compute.device).train()
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=500, num_training_steps=10_000)
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        clean = (torch.rand(batch, 1, size, size, generator=generator) * 2 - 1).to(compute.device)
        noise = torch.randn(clean.shape, generator=generator).to(compute.device)
        timesteps = torch.randint(0, 1000, (batch,), generator=generator).to(compute.device)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        loss = torch.nn.functional.mse_loss(model(noisy, timesteps).sample.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()

    return model, step


# --- one row, in a worker process ------------------------------------------------------------------


def peak_memory_mb(compute: Compute, rss_before_mib: float) -> float:
    if compute.device.type == "cuda":
        return torch.cuda.max_memory_allocated(compute.device) / 2**20
    return peak_resident_mib() - rss_before_mib


def measure(args: argparse.Namespace) -> dict:
    """Build one contender, take a warm-up step, then time `--steps` steps."""
    rss_before_mib = peak_resident_mib()
    if args.worker == "plain":
        cfg = kneegen_config("kneegen", args.batch, args.seed_batch, args.device, args.precision)
        compute = resolve_compute(cfg.device, cfg.precision, allow_fp16=True)
        network, step = plain_steps(cfg, args.size, compute)
        batch, label = cfg.train.batch_size, f"plain loop, same network ({precision_name(compute)})"
        call = lambda n, x, t: n(x, t)  # noqa: E731
    elif args.worker == "diffusers":
        compute = resolve_compute(args.device, "fp32")
        network, step = diffusers_steps(args.diffusers_width, args.size, args.batch, compute)
        batch, label = args.batch, f"diffusers UNet2DModel {args.diffusers_width}-{2 * args.diffusers_width}x2, fp32"
        call = lambda n, x, t: n(x, t).sample  # noqa: E731
    else:
        cfg = kneegen_config(args.worker, args.batch, args.seed_batch, args.device, args.precision)
        compute = resolve_compute(cfg.device, cfg.precision, allow_fp16=True)
        network, step = kneegen_steps(cfg, args.size, args.steps, compute)
        batch = cfg.train.batch_size
        label = (
            f"{'kneegen recipe' if args.worker == 'kneegen' else 'original recipe'} ({cfg.model.arch}, "
            f"{precision_name(compute)})"
        )
        call = lambda n, x, t: n(x, t)  # noqa: E731
    params = sum(p.numel() for p in network.parameters())
    step()  # warm-up: allocations, cuDNN / oneDNN kernel choice
    synchronize(compute)
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(compute)
    seconds = (time.perf_counter() - started) / args.steps
    memory = peak_memory_mb(compute, rss_before_mib)
    gflop = forward_gflop(network, args.size, call)
    return {
        "label": label,
        "batch": batch,
        "params": params,
        "gflop": gflop,
        "images_per_s": batch / seconds,
        "peak_mb": memory,
        "precision": precision_name(compute),
    }


def precision_name(compute: Compute) -> str:
    return compute.describe().split("(")[1].rstrip(")")


def synchronize(compute: Compute) -> None:
    synchronize_device(compute.device)


def synchronize_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the table --------------------------------------------------------------------------------------


def run_worker(name: str, args: argparse.Namespace, width: int) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        name,
        "--size",
        str(args.size),
        "--batch",
        str(args.batch),
        "--seed-batch",
        str(args.seed_batch),
        "--steps",
        str(args.steps),
        "--device",
        args.device,
        "--precision",
        args.precision,
        "--diffusers-width",
        str(width),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=32, help="batch of kneegen's recipe, the plain loop and diffusers")
    parser.add_argument("--seed-batch", type=int, default=16, help="batch of the original recipe (it used 16)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--precision", default="auto", help="kneegen recipe's and the plain loop's precision (diffusers: fp32)"
    )
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--diffusers-width", type=int, default=64, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args)))
        return

    ours = kneegen_config("kneegen", args.batch, args.seed_batch, args.device, args.precision).model
    width = matched_diffusers_width(args.size, ours) if "diffusers" in args.contenders else 0
    device = resolve_compute(args.device, "fp32").device
    peaks = {"fp32": matmul_peak(torch.float32, device)}
    if resolve_compute(args.device, "auto").dtype == torch.bfloat16:
        peaks["bf16"] = matmul_peak(torch.bfloat16, device)
    print(
        f"CPU: {cpu_kind()}; device {args.device}; {args.size}², {args.steps} timed steps after 1 warm-up, each "
        f"row in its own process; matmul peak " + ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in peaks.items()),
        flush=True,
    )
    print(
        f"{'contender':<44} {'params':>8} {'GFLOP/img':>10} {'batch':>6} {'img/s':>9} {'TFLOP/s':>8} {'% peak':>7} "
        f"{'peak MB':>9}"
    )
    rows = {}
    for name in args.contenders:
        row = rows[name] = run_worker(name, args, width)
        achieved = 3 * row["gflop"] * row["images_per_s"] / 1000
        peak = peaks.get(row["precision"])
        share = f"{100 * achieved / peak:>6.0f}%" if peak else f"{'-':>7}"
        print(
            f"{row['label']:<44} {row['params'] / 1e6:>7.2f}M {row['gflop']:>10.2f} {row['batch']:>6} "
            f"{row['images_per_s']:>9.1f} {achieved:>8.3f} {share} {row['peak_mb']:>9.0f}",
            flush=True,
        )
    if "kneegen" in rows:
        ours = rows["kneegen"]
        for name in ("plain", "diffusers", "original"):
            if name in rows:
                other = rows[name]
                print(
                    f"kneegen recipe vs {name}: ×{ours['images_per_s'] / other['images_per_s']:.2f} images/s, "
                    f"×{ours['peak_mb'] / max(other['peak_mb'], 1e-9):.2f} peak memory"
                )
    print("reproduce: .venv/bin/python benchmarks/training.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
