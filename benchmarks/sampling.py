"""Cost of one network evaluation while sampling, side by side, with achieved TFLOP/s.

Rows, measured in one run at 256² (override with --size):
  kneegen's default U-Net with the device's best settings (batch 8),
  the original recipe's U-Net as it ran (fp32, batch 1),
  a diffusers UNet2DModel shaped like kneegen's default (64-128-128, attention at the
  lowest level; fp32, batch 8) — diffusers is the test extra.
FLOPs come from torch's FlopCounterMode; the peak is a large matmul measured in the same run.
    .venv/bin/python benchmarks/sampling.py            # ~3 minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from kneegen.config import ModelConfig
from kneegen.engine.device import Compute, resolve_compute
from kneegen.engine.network import build_network

MATMUL_SIZE = 2048
DEFAULT_STEPS, ORIGINAL_STEPS = 25, 1000  # dpm++2m default vs the original's DDPM


def matmul_peak(dtype: torch.dtype) -> float:
    """TFLOP/s of a square matmul, the practical ceiling for convolutions on this device."""
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, dtype=dtype)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, dtype=dtype)
    a @ b
    started, repeats = time.perf_counter(), 5
    for _ in range(repeats):
        a @ b
    return 2 * MATMUL_SIZE**3 * repeats / (time.perf_counter() - started) / 1e12


def diffusers_unet() -> torch.nn.Module:
    from diffusers import UNet2DModel

    model = UNet2DModel(
        in_channels=1, out_channels=1, block_out_channels=(64, 128, 128), layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    )
    return model


def per_image_step(forward, batch: int, size: int, compute: Compute, repeats: int) -> tuple[float, float]:
    """(seconds per image-step, GFLOP per image) of `forward(x, t)` under inference mode."""
    x = torch.randn(batch, 1, size, size).to(memory_format=compute.memory_format)
    t = torch.full((batch,), 500)
    with torch.inference_mode(), compute.autocast():
        with FlopCounterMode(display=False) as counter:
            forward(x, t)
        started = time.perf_counter()
        for _ in range(repeats):
            forward(x, t)
    seconds = (time.perf_counter() - started) / repeats / batch
    return seconds, counter.get_total_flops() / batch / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    best = resolve_compute("cpu", "auto")
    fp32 = Compute(torch.device("cpu"), None)
    peak = matmul_peak(best.dtype or torch.float32)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; kneegen runs {best.describe()}; "
          f"matmul peak {peak:.3f} TFLOP/s ({'bf16' if best.dtype else 'fp32'})")

    kneegen_net = build_network(ModelConfig(), (args.size, args.size)).eval().to(memory_format=best.memory_format)
    seed_net = build_network(ModelConfig(arch="seed"), (args.size, args.size)).eval()
    rows = [
        ("kneegen default unet", lambda x, t: kneegen_net(x, t), args.batch, best),
        ("original seed U-Net", lambda x, t: seed_net(x, t), 1, fp32),
    ]
    try:
        reference = diffusers_unet().eval()
        rows.append(("diffusers UNet2DModel", lambda x, t: reference(x, t).sample, args.batch, fp32))
    except ImportError:
        print("diffusers not installed: its row is skipped (pip install -e '.[test]')")

    print(f"{'model':<22} {'batch':>5} {'GFLOP/img':>10} {'ms/img-step':>12} {'TFLOP/s':>8} {'of peak':>8}")
    results = {}
    for name, forward, batch, compute in rows:
        seconds, gflop = per_image_step(forward, batch, args.size, compute, args.repeats)
        achieved = gflop / seconds / 1e3
        results[name] = seconds
        print(f"{name:<22} {batch:>5} {gflop:>10.1f} {1e3 * seconds:>12.1f} {achieved:>8.3f} {achieved / peak:>8.0%}", flush=True)

    default_100 = 100 * DEFAULT_STEPS * results["kneegen default unet"]
    original_100 = 100 * ORIGINAL_STEPS * results["original seed U-Net"]
    print(f"100 images at {args.size}²: kneegen dpm++2m-{DEFAULT_STEPS} {default_100 / 60:.1f} min vs original "
          f"DDPM-{ORIGINAL_STEPS} {original_100 / 60:.1f} min ({original_100 / default_100:.1f}x faster)")


if __name__ == "__main__":
    main()
