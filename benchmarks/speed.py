"""Training images/s and sampling ms per image-step, side by side, for kneegen's networks.

Measured in one process so the ratios are comparable on a noisy machine:
    .venv/bin/python benchmarks/speed.py                  # 64² and 256², fp32 (+ bf16 where native)
    .venv/bin/python benchmarks/speed.py --sizes 64 --precisions bf16 fp32 --models unet-cpu-bf16
bf16 on a CPU without bf16 units is emulated and far slower; it is skipped there unless asked for.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import yaml

from kneegen.config import ModelConfig, model_from_mapping
from kneegen.engine.device import Compute, bf16_supported
from kneegen.engine.network import build_network
from kneegen.recipes import recipe_names, recipe_path


def models() -> dict[str, ModelConfig]:
    recipes = {
        f"unet-{name}": model_from_mapping(
            yaml.safe_load(recipe_path(name).read_text())["model"], str(recipe_path(name))
        )
        for name in recipe_names()
    }
    return {
        "unet-default": ModelConfig(),
        **recipes,
        "seed": ModelConfig(arch="seed"),
    }


def timed(step: Callable[[], None], repeats: int) -> float:
    """Seconds per call after one warm-up call."""
    step()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - started) / repeats


def measure(cfg: ModelConfig, size: int, batch: int, compute: Compute, repeats: int) -> tuple[float, float]:
    """(training images/s, inference ms per image-step) at size², batch `batch`."""
    torch.manual_seed(0)
    network = build_network(cfg, (size, size)).to(memory_format=compute.memory_format)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    x = torch.randn(batch, 1, size, size).to(memory_format=compute.memory_format)
    t = torch.randint(0, 1000, (batch,))

    def train_step() -> None:
        with compute.autocast():
            loss = network(x, t).float().square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer_step() -> None:
        with torch.inference_mode(), compute.autocast():
            network(x, t)

    network.train()
    train_seconds = timed(train_step, repeats)
    network.eval()
    infer_seconds = timed(infer_step, repeats)
    return batch / train_seconds, 1000 * infer_seconds / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=list(models()), choices=list(models()))
    args = parser.parse_args()
    cpu = torch.device("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: {bf16_supported(cpu)}")
    print(f"{'model':<18} {'size':>5} {'prec':>5} {'batch':>5} {'train img/s':>12} {'ms/img-step':>12}")
    for size in args.sizes:
        batch = 32 if size <= 64 else 4
        baseline: dict[str, tuple[float, float]] = {}
        for precision in args.precisions:
            if precision == "bf16" and not bf16_supported(cpu) and args.precisions == ["fp32", "bf16"]:
                print(
                    f"{'(all)':<18} {size:>5} {'bf16':>5}   "
                    "skipped: this CPU has no native bf16 (pass --precisions bf16)"
                )
                continue
            compute = Compute(cpu, torch.bfloat16 if precision == "bf16" else None)
            for name, cfg in models().items():
                if name not in args.models:
                    continue
                images_per_s, ms = measure(cfg, size, batch, compute, args.repeats)
                if precision == "fp32":
                    baseline[name] = (images_per_s, ms)
                print(f"{name:<18} {size:>5} {precision:>5} {batch:>5} {images_per_s:>12.1f} {ms:>12.1f}", flush=True)
        if "seed" in baseline:
            seed_train, seed_ms = baseline["seed"]
            for name, (images_per_s, ms) in baseline.items():
                print(
                    f"  {size}² fp32 vs seed: {name}: "
                    f"train ×{images_per_s / seed_train:.2f}, sampling ×{seed_ms / ms:.2f} faster"
                )


if __name__ == "__main__":
    main()
