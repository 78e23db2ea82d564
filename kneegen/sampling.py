"""Drawing images from a trained model, batch by batch, for `sample` and `validate`.

Image k of a run uses seed `seed + k`, so the same seed gives the same images whatever the
batch size; batches are yielded as they finish so N images never sit in memory at once.
The device's settings (bf16 autocast where native, channels_last on GPUs, inference mode) come with
the `Compute`; whether the network is `torch.compile`d comes with the `SamplerChoice`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import get_args

import numpy as np
import torch
from torch import Tensor

from kneegen.asked_conditions import AskedConditions
from kneegen.config import MAX_GUIDANCE, Spacing
from kneegen.engine.compilation import compile_for_inference
from kneegen.engine.denoiser import make_denoiser
from kneegen.engine.device import Compute
from kneegen.engine.distillation import halvings
from kneegen.engine.latent import LatentSpace
from kneegen.engine.pixels import to_uint8
from kneegen.engine.samplers import CONSISTENCY, DISTILLED, StepCallback, generate, get_sampler, timesteps_for
from kneegen.engine.schedule import Schedule
from kneegen.engine.trained import TrainedModel
from kneegen.errors import KneegenError


@dataclass(frozen=True)
class SamplerChoice:
    name: str
    steps: int
    eta: float = 0.0
    spacing: str = "auto"
    compile: bool = False  # torch.compile the network (engine/compilation.py)
    autoguidance: float = 1.0  # w away from the checkpoint's guide; 1 = off (and always without a guide)
    autoguidance_sigma_max: float = math.inf  # ... at noise levels σ ≤ this only
    keep_fold: bool = False  # leave a patch network's fold frequencies in x̂_0 (engine/fold.py): for comparisons

    def describe(self) -> str:
        eta = f", eta {self.eta}" if self.name in ("ddim", DISTILLED) else ""
        spacing = f", {self.spacing} spacing" if self.spacing != "auto" else ""
        guided = f", autoguidance {self.autoguidance:g}" if self.autoguidance != 1.0 else ""
        if guided and math.isfinite(self.autoguidance_sigma_max):
            guided += f" at σ ≤ {self.autoguidance_sigma_max:g}"
        compiled = ", compiled" if self.compile else ""
        fold = ", fold kept" if self.keep_fold else ""
        return f"{self.name}, {self.steps} steps{eta}{spacing}{guided}{compiled}{fold}"

    def timesteps(self, schedule: Schedule) -> list[int]:
        """The timesteps this choice visits; refuses a bad sampler name or step count."""
        get_sampler(self.name)
        return timesteps_for(self.name, schedule, self.steps, self.spacing)


def choose_sampler(
    model: TrainedModel,
    name: str | None,
    steps: int | None,
    eta: float | None,
    spacing: str | None = None,
    compile: bool = False,
    autoguidance: float | None = None,
    autoguidance_sigma_max: float | None = None,
) -> SamplerChoice:
    """Flags first, then the run's `sample` config; DDPM defaults to every timestep, as trained.
    A checkpoint without a guide samples unguided whatever its `sample.autoguidance` says (a run
    stopped before `train.guide_at`); asked for by the flag, autoguidance needs a guide.

    `compile` is the caller's decision, not read from `sample.compile`: `kneegen sample` honours
    that key, while the short runs of validation and training previews would spend longer
    compiling than sampling (and a preview would compile the network being trained)."""
    sample = model.config.sample
    chosen = name or sample.sampler
    default_steps = model.schedule.timesteps if chosen == "ddpm" else sample.steps
    if chosen == DISTILLED:
        chosen, default_steps = distilled_sampler(model, steps)
    if spacing is not None and spacing not in get_args(Spacing):
        raise KneegenError(f"--spacing {spacing}: choose one of {', '.join(get_args(Spacing))}")
    if steps is not None and steps < 1:
        raise KneegenError(f"--steps {steps}: give at least 1 sampling step")
    if autoguidance_sigma_max is not None and not autoguidance_sigma_max > 0:
        raise KneegenError(
            f"--autoguidance-sigma-max {autoguidance_sigma_max}: give a noise level above 0 (inf: every step)"
        )
    if eta is not None and not 0 <= eta <= 1:
        raise KneegenError(f"--eta {eta}: give a value from 0 (deterministic DDIM) to 1 (ancestral, like DDPM)")
    return SamplerChoice(
        chosen,
        default_steps if steps is None else steps,
        sample.eta if eta is None else eta,
        spacing or sample.spacing,
        compile,
        autoguidance_of(model, autoguidance),
        sample.autoguidance_sigma_max if autoguidance_sigma_max is None else autoguidance_sigma_max,
    )


def autoguidance_of(model: TrainedModel, asked: float | None) -> float:
    """The autoguidance w the model samples with: `asked`, else its `sample.autoguidance`; 1 without a guide."""
    if asked is not None and not 1 <= asked <= MAX_GUIDANCE:
        raise KneegenError(f"--autoguidance {asked}: give a weight from 1 (off) to {MAX_GUIDANCE:g}; 2 is typical")
    if model.guide is None:
        if asked not in (None, 1.0):
            raise KneegenError(
                f"--autoguidance {asked}: {model.source} holds no guide (a run keeps one once train.guide_at of it "
                "is done): train with --set train.guide_at=0.3, or leave --autoguidance out"
            )
        return 1.0
    return model.config.sample.autoguidance if asked is None else asked


def distilled_sampler(model: TrainedModel, asked: int | None) -> tuple[str, int]:
    """What `distilled` means for this checkpoint, and its default steps: a progressive student's
    DDIM on the one grid it learnt (another count refused), a consistency student's multistep
    consistency sampling (any count), a dmd student's on the grid it learnt or a coarser one
    within it (a count that divides its steps); refused for a checkpoint that was not distilled."""
    if model.distilled_steps is None:
        raise KneegenError(
            f"--sampler {DISTILLED}: {model.source} is no distilled student (kneegen distill makes one): "
            f"choose another sampler"
        )
    if model.distill_method == "consistency":
        return CONSISTENCY, model.distilled_steps
    if model.distill_method == "dmd":
        if asked is not None and model.distilled_steps % asked:
            counts = [n for n in range(1, model.distilled_steps + 1) if model.distilled_steps % n == 0]
            raise KneegenError(
                f"--steps {asked}: {model.source} learnt the levels of {model.distilled_steps} steps, whose grid holds "
                f"those of {', '.join(map(str, counts))} steps only: give one of them, or choose another --sampler"
            )
        return CONSISTENCY, model.distilled_steps
    if asked is not None and asked != model.distilled_steps:
        further = ""
        if asked in halvings(model.distilled_steps):  # fewer steps: one more round or two
            further = f"distil it to {asked} (kneegen distill {model.source} --steps {asked}), "
        raise KneegenError(
            f"--steps {asked}: {model.source} was distilled for {model.distilled_steps} steps, the only count its "
            f"sampler runs: give --steps {model.distilled_steps}, {further}or choose another --sampler"
        )
    return DISTILLED, model.distilled_steps


def sample_batches(
    model: TrainedModel,
    compute: Compute,
    choice: SamplerChoice,
    seeds: list[int],
    batch_size: int,
    on_step: StepCallback | None = None,
    conditions: AskedConditions | None = None,
) -> Iterator[tuple[list[int], np.ndarray]]:
    """(seeds, (B, H, W) uint8 images) for each batch of `seeds`, image k asked for row k of
    `conditions` (None: unconditional); with `choice.compile` the network is compiled once, here,
    for the first batch's size (the last batch is padded to it), and so is an autoguidance guide.
    A latent model's samples are decoded by its autoencoder, once per batch. A pixel network with a
    patch fold has its fold frequencies taken out of every x̂_0 unless `choice.keep_fold`."""
    if choice.autoguidance != 1.0 and model.guide is None:
        raise KneegenError(f"autoguidance {choice.autoguidance:g}: {model.source} holds no guide (train.guide_at)")
    sampler = get_sampler(choice.name, eta=choice.eta)
    timesteps = choice.timesteps(model.schedule)
    network = compile_for_inference(model.network, compute) if choice.compile else model.network
    guide = model.guide if choice.autoguidance != 1.0 else None
    if guide is not None and choice.compile:
        guide = compile_for_inference(guide, compute)
    latent = model.latent
    fold = 1 if choice.keep_fold or latent is not None else model.fold  # images only: a latent's are unmeasured
    if latent is not None and on_step is not None:
        on_step = decoded_steps(on_step, latent, compute)
    for start in range(0, len(seeds), batch_size):
        batch = seeds[start : start + batch_size]
        c, guidance = None, 1.0
        if conditions is not None:
            c = torch.from_numpy(conditions.values[start : start + len(batch)]).to(compute.device)  # (B, K)
            guidance = conditions.guidance
        denoise = make_denoiser(
            network,
            model.schedule,
            model.config.diffusion.prediction,
            compute,
            c,
            guidance,
            clip=latent is None,
            guide=guide,
            autoguidance=choice.autoguidance,
            autoguidance_sigma_max=choice.autoguidance_sigma_max,
            fold=fold,
        )
        x0 = generate(denoise, sampler, timesteps, model.schedule, batch, model.sample_shape, compute.device, on_step)
        yield batch, to_uint8(latent.decode(x0, compute) if latent else x0)


def decoded_steps(on_step: StepCallback, latent: LatentSpace, compute: Compute) -> StepCallback:
    """A latent sampler's per-step callback that sees decoded images (x_t and x̂_0), as a pixel
    sampler's would."""

    def decoded(i: int, x_t: Tensor, x0: Tensor) -> None:
        on_step(i, latent.decode(x_t, compute), latent.decode(x0, compute))

    return decoded


def pick_frames(n_steps: int, n_frames: int) -> list[int]:
    """`n_frames` step indices from first to last, evenly spread (fewer if there are fewer steps)."""
    if n_steps <= n_frames:
        return list(range(n_steps))
    return sorted({round(i * (n_steps - 1) / (n_frames - 1)) for i in range(n_frames)})


MAX_SEED = 2**63 - 1  # torch.Generator seeds are 64-bit
MAX_IMAGES = 10_000_000  # a list of seeds beyond this is a typo, not a plan (and would not fit in memory)


def parse_seeds(text: str) -> list[int]:
    """ "0-63" → 0…63; "1,5,9-12" → [1, 5, 9, 10, 11, 12]; order kept, repeats refused."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            low, high = int(first), int(last or first)
            check_seed(low, f"--seeds {text!r}")
            check_seed(high, f"--seeds {text!r}")
            if len(seeds) + high - low + 1 > MAX_IMAGES:
                raise KneegenError(f"--seeds {text!r} names more than {MAX_IMAGES:,} images: ask for fewer")
            seeds += list(range(low, high + 1))
    except ValueError:
        raise KneegenError(f"--seeds {text!r}: expected numbers and ranges such as 0-63 or 1,5,9-12") from None
    if not seeds:
        raise KneegenError(f"--seeds {text!r} names no seed: ranges run low-high, e.g. 0-63")
    if len(set(seeds)) != len(seeds):
        raise KneegenError(f"--seeds {text!r} names a seed twice: each seed is one image")
    return seeds


def check_seed(seed: int, flag: str) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise KneegenError(f"{flag}: seed {seed} is outside 0 … 2^63−1 (64-bit generator seeds)")
