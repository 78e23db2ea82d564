"""Cost of one network evaluation while sampling, side by side, with achieved TFLOP/s.

Rows, measured in one run at 256² (override with --size):
  kneegen's default U-Net with the device's best settings (batch 8),
  with --compile, the same network through `sample.compile` (engine/compilation.py) at the
  same size and batch, after a first call whose time (the compilation) is printed,
  the original recipe's U-Net as it ran (fp32, batch 1),
  a diffusers UNet2DModel shaped like kneegen's default (64-128-128, attention at the
  lowest level; fp32, batch 8) — diffusers is the test extra.
FLOPs come from torch's FlopCounterMode; the peaks are large fp32 and bf16 matmuls measured in
the same run, and each row's share of both is printed (bf16 is emulated, and far slower, on
CPUs without bf16 units; kneegen then runs fp32).
    .venv/bin/python benchmarks/sampling.py                    # ~3 minutes on a 2-core CPU
    .venv/bin/python benchmarks/sampling.py --size 64 --compile  # + eager vs compiled
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from kneegen.config import ModelConfig
from kneegen.engine.compilation import compile_for_inference, compile_mode
from kneegen.engine.device import Compute, bf16_supported, resolve_compute
from kneegen.engine.network import build_network

MATMUL_SIZE = 2048  # the largest side of the peak's matmul
MATMUL_SECONDS = 0.5  # ... unless one product that large would take longer
DEFAULT_STEPS, ORIGINAL_STEPS = 25, 1000  # dpm++2m default vs the original's DDPM
DEFAULT_ROW, SEED_ROW = "kneegen default unet", "original seed U-Net"


def matmul_peak(dtype: torch.dtype) -> tuple[float, int]:
    """(TFLOP/s, n) of an n×n matmul, the practical ceiling for convolutions on this device.

    n doubles from 256 up to MATMUL_SIZE while the next size would still take under
    MATMUL_SECONDS: emulated bf16 runs ~1000x slower than fp32, and one 2048² product then
    takes a minute."""
    n = 256
    while True:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        started = time.perf_counter()
        a @ b  # also the warm-up
        if n >= MATMUL_SIZE or 8 * (time.perf_counter() - started) > MATMUL_SECONDS:
            break
        n *= 2
    started, repeats = time.perf_counter(), 3
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - started) / 1e12, n


def diffusers_unet() -> torch.nn.Module:
    from diffusers import UNet2DModel

    model = UNet2DModel(
        in_channels=1,
        out_channels=1,
        block_out_channels=(64, 128, 128),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    )
    return model


Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def per_image_step(
    forward: Forward, eager: Forward, batch: int, size: int, compute: Compute, repeats: int
) -> tuple[float, float, float]:
    """(seconds per image-step, GFLOP per image, seconds of the first call) of `forward(x, t)`
    under inference mode; the fastest of `repeats` calls, as other work on a shared machine
    only ever slows a call down. FLOPs are counted on `eager`, the same network uncompiled:
    FlopCounterMode does not see inside a compiled graph."""
    x = torch.randn(batch, 1, size, size).to(memory_format=compute.memory_format)
    t = torch.full((batch,), 500)
    with torch.inference_mode(), compute.autocast():
        with FlopCounterMode(display=False) as counter:
            eager(x, t)
        started = time.perf_counter()
        forward(x, t)  # warm-up; for a compiled network, the compilation
        first = time.perf_counter() - started
        fastest = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            forward(x, t)
            fastest = min(fastest, time.perf_counter() - started)
    return fastest / batch, counter.get_total_flops() / batch / 1e9, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="add kneegen's U-Net through sample.compile")
    args = parser.parse_args()
    torch.manual_seed(0)
    best = resolve_compute("cpu", "auto")
    fp32 = Compute(torch.device("cpu"), None)
    (fp32_peak, fp32_n), (bf16_peak, bf16_n) = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    peaks = {"fp32": fp32_peak, "bf16": bf16_peak}
    native = "native" if bf16_supported(best.device) else "emulated: no bf16 units"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; kneegen runs {best.describe()}")
    print(f"matmul peak: fp32 {fp32_peak:.4f} TFLOP/s ({fp32_n}²), bf16 {bf16_peak:.4f} TFLOP/s ({bf16_n}², {native})")

    kneegen_net = build_network(ModelConfig(), (args.size, args.size)).eval().to(memory_format=best.memory_format)
    seed_net = build_network(ModelConfig(arch="seed"), (args.size, args.size)).eval()
    rows: list[tuple[str, Forward, Forward, int, Compute]] = [(DEFAULT_ROW, kneegen_net, kneegen_net, args.batch, best)]
    compiled_row = f"  compiled ({compile_mode(best.device)})"
    if args.compile:
        rows.append((compiled_row, compile_for_inference(kneegen_net, best), kneegen_net, args.batch, best))
    rows.append((SEED_ROW, seed_net, seed_net, 1, fp32))
    try:
        reference = diffusers_unet().eval()
        diffusers_forward: Forward = lambda x, t: reference(x, t).sample  # noqa: E731
        rows.append(("diffusers UNet2DModel", diffusers_forward, diffusers_forward, args.batch, fp32))
    except ImportError:
        print("diffusers not installed: its row is skipped (pip install -e '.[test]')")

    print(
        f"{'model':<24} {'prec':>4} {'batch':>5} {'GFLOP/img':>10} {'ms/img-step':>12} {'TFLOP/s':>8} "
        f"{'of fp32 peak':>13} {'of bf16 peak':>13} {'first call s':>13}"
    )
    results = {}
    for name, forward, eager, batch, compute in rows:
        seconds, gflop, first = per_image_step(forward, eager, batch, args.size, compute, args.repeats)
        achieved = gflop / seconds / 1e3
        results[name] = seconds
        precision = "bf16" if compute.dtype else "fp32"
        print(
            f"{name:<24} {precision:>4} {batch:>5} {gflop:>10.1f} {1e3 * seconds:>12.1f} {achieved:>8.3f} "
            f"{achieved / peaks['fp32']:>13.0%} {achieved / peaks['bf16']:>13.0%} {first:>13.1f}",
            flush=True,
        )

    if args.compile:
        eager_s, compiled_s = results[DEFAULT_ROW], results[compiled_row]
        print(
            f"compiled vs eager at {args.size}², batch {args.batch}: {eager_s / compiled_s:.2f}x "
            f"({1e3 * eager_s:.1f} → {1e3 * compiled_s:.1f} ms/img-step)"
        )
    default_100 = 100 * DEFAULT_STEPS * results[DEFAULT_ROW]
    original_100 = 100 * ORIGINAL_STEPS * results[SEED_ROW]
    print(
        f"100 images at {args.size}²: kneegen dpm++2m-{DEFAULT_STEPS} {default_100 / 60:.1f} min vs original "
        f"DDPM-{ORIGINAL_STEPS} {original_100 / 60:.1f} min ({original_100 / default_100:.1f}x faster)"
    )


if __name__ == "__main__":
    main()
