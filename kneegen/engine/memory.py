"""Will a training step fit in memory? An estimate before the first step, and the micro-batches
that make a batch fit when it would not.

A step's peak is the tensors autograd keeps for a backward pass, which grow with the
micro-batch, plus what does not: weights, gradients, the optimizer's two moments and the EMA,
and the networks trained or called beside the run's own (a patch discriminator, a distillation's
teacher, guide and fake score). The first are counted exactly, once, with saved-tensor hooks on
a forward pass of one image (in eval mode, so dropout draws nothing from the RNG and training
stays bit-exact), for each pass a step makes with a backward: the largest decides; the
backward pass's own buffers come on top (HEADROOM, measured). A batch whose micro-batch would
not fit is split into more micro-batches (`train.grad_accumulation`: the same updates) instead
of letting the kernel kill the process with no message and no checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from kneegen.config import RunConfig
from kneegen.engine.adversary import PatchDiscriminator
from kneegen.engine.autoencoder import Autoencoder, latent_shape
from kneegen.engine.device import Compute
from kneegen.engine.perceptual import PerceptualDistance, perceptual_distance
from kneegen.errors import KneegenError

if TYPE_CHECKING:  # training imports nothing from here, but the engine's heaviest module is not needed at run time
    from kneegen.engine.training import TrainState

HEADROOM = 1.5  # step peak / (saved tensors + gradients + moments): measured 1.0-1.2 for CPU steps of the U-Nets here
BYTES_PER_PARAMETER = 4 * 5  # fp32 weight, gradient, two Adam moments, EMA copy
COMPANION_BYTES_PER_PARAMETER = 4 * 4  # a discriminator's or fake score's: fp32 weight, gradient, two Adam moments
FROZEN_BYTES_PER_PARAMETER = 4  # a teacher's, a guide's, a post-hoc EMA snapshot's: fp32 weights only
PAIR_BYTES_PER_VALUE = 4 * 2  # a dmd student's teacher pairs: fp32 noise and image
USABLE = 0.85  # share of the free memory a step may plan on; the rest is the OS's and the data's
GIB = 2**30


@dataclass(frozen=True)
class MemoryPlan:
    per_image: int  # bytes autograd keeps per image of a micro-batch
    fixed: int  # bytes that do not grow with the batch
    available: int  # free bytes on the device, for this process

    def step_bytes(self, micro_batch: int) -> int:
        return int(HEADROOM * micro_batch * self.per_image) + self.fixed

    def fits(self, micro_batch: int) -> bool:
        return self.step_bytes(micro_batch) <= USABLE * self.available


def saved_bytes_per_image(network: nn.Module, input_shape: tuple[int, ...], compute: Compute) -> int:
    """Bytes of the tensors one image's forward pass keeps for backward (weights excluded), for
    inputs of `input_shape`: (H, W) of one channel, or (C, H, W). A network whose weights are
    frozen (a discriminator judging the trained network's output) is measured as the backward
    pass through it to its input sees it."""
    weights = {p.untyped_storage().data_ptr() for p in network.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    shape = (1, *input_shape) if len(input_shape) == 3 else (1, 1, *input_shape)
    x = torch.zeros(shape, device=compute.device).to(memory_format=compute.memory_format)
    x.requires_grad_(not any(p.requires_grad for p in network.parameters()))
    if isinstance(network, Autoencoder):  # its training pass takes the posterior's noise instead of t
        inputs = (x, torch.zeros((1, *latent_shape(network.cfg, shape[-2:])), device=compute.device))
    elif isinstance(network, PatchDiscriminator):  # it judges an image, at no noise level
        inputs = (x,)
    elif isinstance(network, PerceptualDistance):  # a reconstruction against its target
        inputs = (x, x.detach())
    else:
        inputs = (x, torch.zeros(1, dtype=torch.long, device=compute.device))
    was_training = network.training
    network.eval()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), compute.autocast():
            network(*inputs)
    finally:
        network.train(was_training)
    return sum(saved.values())


def free_memory(device: torch.device, processes_here: int) -> int | None:
    """Free bytes for one of `processes_here` processes sharing the machine; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if device.type != "cpu" or not meminfo.is_file():
        return None
    fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
    if "MemAvailable" not in fields:
        return None
    return int(fields["MemAvailable"].split()[0]) * 1024 // max(1, processes_here)


def plan_memory(
    state: TrainState, input_shape: tuple[int, ...], compute: Compute, processes_here: int, keeps_guide: bool = False
) -> MemoryPlan | None:
    """The plan of a step of `state` on inputs of `input_shape` (C, H, W), with room for the guide
    a run `keeps_guide` (train.guide_at) keeps later; None where the free memory is unknown."""
    available = free_memory(compute.device, processes_here)
    if available is None:
        return None
    held = held_bytes(state, input_shape, compute, keeps_guide)
    return MemoryPlan(largest_pass_per_image(state, input_shape, compute), held, available)


def largest_pass_per_image(state: TrainState, input_shape: tuple[int, ...], compute: Compute) -> int:
    """Saved bytes per image of the largest of a step's passes with a backward, which run one
    after the other: the trained network's (through an autoencoder's perceptual distance and a
    discriminator's judgement of its output, when there are), the discriminator's own update (a
    real and a generated image per row), and a fake score's updates (the teacher's network on the
    student's samples)."""
    trained = saved_bytes_per_image(state.network, input_shape, compute)
    perceptual = perceptual_network(state, compute)
    if perceptual is not None:
        trained += saved_bytes_per_image(perceptual, input_shape, compute)
    passes = [trained]
    if state.adversary is not None:
        judged = saved_bytes_per_image(state.adversary.network, input_shape, compute)
        passes = [trained + judged, 2 * judged]
    fake_score = state.distillation.fake_score if state.distillation is not None else None
    if fake_score is not None:
        passes.append(saved_bytes_per_image(fake_score.network, input_shape, compute))
    return max(passes)


def held_bytes(state: TrainState, input_shape: tuple[int, ...], compute: Compute, keeps_guide: bool = False) -> int:
    """Bytes a step holds whatever its batch: the trained network's weights, gradients, moments
    and EMA; each companion's weights, gradients and moments; the frozen networks' weights (a
    training guide, kept or to be kept, post-hoc EMA snapshots, a distillation's teacher and its
    guide); and a dmd student's teacher pairs, which stay in the CPU's memory."""
    distillation = state.distillation
    companions = [state.adversary, distillation.fake_score if distillation is not None else None]
    guide = state.guide if state.guide is not None else state.network if keeps_guide else None
    frozen = [guide, *(power.model for power in state.power_emas), perceptual_network(state, compute)]
    pairs = 0
    if distillation is not None:
        frozen += [distillation.teacher, distillation.guide]
        if distillation.has_regression_anchor and compute.device.type == "cpu":
            pairs = distillation.anchor_pairs * math.prod(input_shape) * PAIR_BYTES_PER_VALUE
    return (
        BYTES_PER_PARAMETER * parameter_count(state.network)
        + COMPANION_BYTES_PER_PARAMETER * sum(parameter_count(c.network) for c in companions if c is not None)
        + FROZEN_BYTES_PER_PARAMETER * sum(parameter_count(network) for network in frozen if network is not None)
        + pairs
    )


def perceptual_network(state: TrainState, compute: Compute) -> nn.Module | None:
    """The Inception layers an autoencoder's loss runs its reconstructions through, if it does."""
    network = state.network
    if isinstance(network, Autoencoder) and network.cfg.perceptual_weight:
        return perceptual_distance(compute.device)
    return None


def parameter_count(network: nn.Module) -> int:
    return sum(p.numel() for p in network.parameters())


def fit_batch_in_memory(cfg: RunConfig, plan: MemoryPlan, world_size: int = 1) -> tuple[RunConfig, str]:
    """`cfg` with enough micro-batches for this process's share of a batch to fit, and a line
    saying so (empty when nothing changed); refuses when one image does not fit."""
    rows = math.ceil(cfg.train.batch_size / world_size)  # the largest share of a batch
    most = cfg.train.batch_size // world_size  # every process needs an image of every micro-batch
    accumulation = cfg.train.grad_accumulation
    while accumulation < most and not plan.fits(math.ceil(rows / accumulation)):
        accumulation += 1
    micro = math.ceil(rows / accumulation)
    if not plan.fits(micro):
        raise KneegenError(
            f"one training image needs about {plan.step_bytes(1) / GIB:.1f} GiB and "
            f"{plan.available / GIB:.1f} GiB are free: "
            "lower the network's width (model.unet.channels) or the image size (kneegen prepare --size), or free memory"
        )
    if accumulation == cfg.train.grad_accumulation:
        return cfg, ""
    before = math.ceil(rows / cfg.train.grad_accumulation)
    note = (
        f"memory: a micro-batch of {before} needs about "
        f"{plan.step_bytes(before) / GIB:.1f} GiB and {plan.available / GIB:.1f} GiB "
        f"are free: training each batch of {cfg.train.batch_size} as {accumulation} micro-batches of up to {micro} "
        f"(train.grad_accumulation {accumulation}; the same updates)"
    )
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accumulation=accumulation)), note


def processes_on_this_machine() -> int:
    """torchrun's LOCAL_WORLD_SIZE: processes sharing this machine's memory."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
