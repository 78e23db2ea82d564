"""Drawing images from a trained model, batch by batch, for `sample` and `validate`.

Image k of a run uses seed `seed + k`, so the same seed gives the same images whatever the
batch size; batches are yielded as they finish so N images never sit in memory at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from kneegen.engine.device import Compute
from kneegen.engine.pixels import to_uint8
from kneegen.engine.samplers import generate, get_sampler, timesteps_for
from kneegen.engine.trained import TrainedModel
from kneegen.errors import KneegenError


@dataclass(frozen=True)
class SamplerChoice:
    name: str
    steps: int
    eta: float

    def describe(self) -> str:
        return f"{self.name}, {self.steps} steps" + (f", eta {self.eta}" if self.name == "ddim" else "")


def choose_sampler(model: TrainedModel, name: str | None, steps: int | None, eta: float | None) -> SamplerChoice:
    """Flags first, then the run's `sample` config; DDPM defaults to every timestep, as trained."""
    chosen = name or model.config.sample.sampler
    default_steps = model.schedule.timesteps if chosen == "ddpm" else model.config.sample.steps
    return SamplerChoice(chosen, steps or default_steps, model.config.sample.eta if eta is None else eta)


def sample_batches(
    model: TrainedModel,
    compute: Compute,
    choice: SamplerChoice,
    seeds: list[int],
    batch_size: int,
    on_step: Callable[[int, Tensor, Tensor], None] | None = None,
) -> Iterator[tuple[list[int], np.ndarray]]:
    """(seeds, (B, H, W) uint8 images) for each batch of `seeds`."""
    sampler = get_sampler(choice.name, eta=choice.eta)
    timesteps = timesteps_for(choice.name, model.schedule, choice.steps)
    denoise = model.denoiser(compute)
    shape = (1, *model.image_shape)
    for start in range(0, len(seeds), batch_size):
        batch = seeds[start : start + batch_size]
        images = generate(denoise, sampler, timesteps, model.schedule, batch, shape, compute.device, on_step)
        yield batch, to_uint8(images)


def pick_frames(n_steps: int, n_frames: int) -> list[int]:
    """`n_frames` step indices from first to last, evenly spread (fewer if there are fewer steps)."""
    if n_steps <= n_frames:
        return list(range(n_steps))
    return sorted({round(i * (n_steps - 1) / (n_frames - 1)) for i in range(n_frames)})


def parse_seeds(text: str) -> list[int]:
    """"0-63" → 0…63; "1,5,9-12" → [1, 5, 9, 10, 11, 12]; order kept, repeats refused."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            seeds += list(range(int(first), int(last or first) + 1))
    except ValueError:
        raise KneegenError(f"--seeds {text!r}: expected numbers and ranges such as 0-63 or 1,5,9-12") from None
    if not seeds:
        raise KneegenError(f"--seeds {text!r} names no seed: ranges run low-high, e.g. 0-63")
    if len(set(seeds)) != len(seeds):
        raise KneegenError(f"--seeds {text!r} names a seed twice: each seed is one image")
    return seeds
