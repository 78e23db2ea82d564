"""The training step, one epoch of them, and the state that makes a resumed run equal an
uninterrupted one.

Every random draw of training comes from sources kept in `TrainState`: the data order of an
epoch from (seed, epoch); t and ε from one generator whose state is checkpointed, t through a
timestep sampler whose loss history is checkpointed; dropout from the global RNGs, whose states
are checkpointed too. With the position inside the epoch, a run
resumed from any checkpoint, even one written mid-epoch, continues with exactly the losses it
would have had (bit for bit on the CPU). How data-parallel processes share a step is described
in `kneegen.engine.distributed`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kneegen.config import RunConfig, TrainConfig
from kneegen.engine.adversary import SMALLEST_SIDE, Adversary, make_adversary
from kneegen.engine.augment import augment
from kneegen.engine.autoencoder import Autoencoder, AutoencoderConfig, autoencoder_loss, latent_shape
from kneegen.engine.checkpoint import CHANGED_CONFIG, load_weights
from kneegen.engine.conditioning import call_network, drop_conditions
from kneegen.engine.device import Compute
from kneegen.engine.distillation import Distillation
from kneegen.engine.distributed import SINGLE, Distributed
from kneegen.engine.ema import EMA
from kneegen.engine.loss import min_snr_weight, per_image_loss
from kneegen.engine.network import build_network
from kneegen.engine.optimizer import make_optimizer
from kneegen.engine.perceptual import SMALLEST_SIDE as PERCEPTUAL_SMALLEST_SIDE
from kneegen.engine.perceptual import perceptual_weights
from kneegen.engine.pixels import model_range_std, stored_shape, to_network_input
from kneegen.engine.posthoc_ema import STORED_SIGMA_RELS, PowerEMA
from kneegen.engine.schedule import Schedule
from kneegen.engine.timesteps import TimestepSampler, centred_lognormal_mean
from kneegen.errors import KneegenError

EPOCH_SEED_STRIDE = 1_000_003  # separates the per-epoch shuffling seeds of different run seeds
PROCESS_SEED_STRIDE = 7_919  # separates the dropout seeds of data-parallel processes
CPU = torch.device("cpu")


@dataclass
class TrainState:
    """What a checkpoint must hold to continue training exactly."""

    network: nn.Module  # the weights, as checkpoints hold them
    train_network: nn.Module  # what a step calls: `network`, compiled and/or wrapped by DDP
    ema: EMA | PowerEMA | None  # on rank 0 only
    power_emas: list[PowerEMA]  # with train.ema_snapshots, on rank 0: EDM2's pair, snapshotted for post-hoc EMA
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # fp16 loss scaling; switched off otherwise
    generator: torch.Generator  # draws t and ε; in the same state in every process
    timestep_sampler: TimestepSampler  # how t is drawn from it, with its loss history; the same in every process
    step: int = 0  # optimizer steps taken, skipped ones included
    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # batches of the current epoch already trained
    epoch_losses: list[float] = field(default_factory=list)  # loss of each step of the current epoch
    epoch_skipped: list[int] = field(default_factory=list)  # indices into epoch_losses of skipped steps
    bad_in_a_row: int = 0  # consecutive steps with a non-finite loss or gradient
    best_val_loss: float = math.inf
    best_fid: float = math.inf  # only tracked with train.fid_every
    end_step: int = 0  # where the LR schedule ends, once a time budget has fixed it (train.cooldown); 0 = train.epochs
    distillation: Distillation | None = None  # a `kneegen distill` run's teacher and rounds
    guide: nn.Module | None = None  # on rank 0, with train.guide_at: the EMA weights as they were then
    adversary: Adversary | None = None  # an autoencoder's patch discriminator (model.vae.adversarial_weight)

    @property
    def eval_network(self) -> nn.Module:
        """The weights validation and sampling use: the EMA when there is one."""
        return self.ema.model if self.ema is not None else self.network


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean per-image loss of the global batch, unweighted (comparable to validation)
    grad_norm: float  # of the whole gradient, before clipping
    lr: float
    images: int  # in the global batch
    skipped: bool  # the loss or a gradient was not finite: the weights were left as they were


def with_noise_centre(cfg: RunConfig, train_images: np.ndarray) -> tuple[RunConfig, str]:
    """`cfg` with `diffusion.lognormal_mean: auto` made a number, ln(0.6 σ_data), and a line that says
    so ("" when it was a number). σ_data is the training split's standard deviation in [-1, 1]; a
    latent model's is 1, since its latents are scaled to unit variance. The number is what the run
    dir's config and the checkpoints record, so a resumed or distilled run draws the same noise levels."""
    if cfg.diffusion.lognormal_mean != "auto":
        return cfg, ""
    data_std = 1.0 if cfg.model.autoencoder else model_range_std(train_images)
    if not data_std > 0:
        raise KneegenError(
            f"diffusion.lognormal_mean auto: the training images of {cfg.data} are all one value, so they have no "
            "spread to centre the noise levels on: set a number, e.g. --set diffusion.lognormal_mean=-1.2"
        )
    centre = round(centred_lognormal_mean(data_std), 3)
    diffusion = dataclasses.replace(cfg.diffusion, lognormal_mean=centre)
    where = "latents' (unit variance)" if cfg.model.autoencoder else "training images'"
    return dataclasses.replace(cfg, diffusion=diffusion), (
        f"diffusion.lognormal_mean auto: {centre:g} = ln(0.6 × {data_std:.3f}), the {where} standard deviation"
    )


def create_state(
    cfg: RunConfig, image_shape: tuple[int, int], compute: Compute, dist: Distributed = SINGLE, channels: int = 1
) -> TrainState:
    """A fresh network, EMA and optimizer, all seeded from `train.seed`, ready for `dist`; the
    network takes `channels` × `image_shape` inputs (a latent model: the latent's)."""
    torch.manual_seed(cfg.train.seed)
    network = build_network(cfg.model, image_shape, channels)
    if dist.enabled and compute.device.type == "cuda":
        network = nn.SyncBatchNorm.convert_sync_batchnorm(network)  # `arch: seed` normalises over the global batch
    network = network.to(compute.device, memory_format=compute.memory_format)
    check_perceptual(network, image_shape)
    adversary = make_run_adversary(network, image_shape, channels, cfg, compute, dist)  # before dropout seeds
    ema = make_ema(network, cfg.train) if dist.is_main else None
    keeps_snapshots = cfg.train.ema_snapshots and dist.is_main
    power_emas = [PowerEMA(network, sigma_rel) for sigma_rel in STORED_SIGMA_RELS] if keeps_snapshots else []
    if dist.enabled:
        torch.manual_seed(cfg.train.seed + PROCESS_SEED_STRIDE * dist.rank)  # each process its own dropout
    train_network = torch.compile(network) if cfg.train.compile else network
    return TrainState(
        network=network,
        train_network=dist.wrap(train_network),
        ema=ema,
        power_emas=power_emas,
        optimizer=make_optimizer(network, cfg.train),
        scaler=compute.grad_scaler(),
        generator=torch.Generator().manual_seed(cfg.train.seed),
        timestep_sampler=TimestepSampler(
            cfg.diffusion.timesteps,
            cfg.diffusion.timestep_sampling,
            Schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps).log_sigmas(),
            (cfg.diffusion.lognormal_mean, cfg.diffusion.lognormal_std),
        ),
        adversary=adversary,
    )


def check_perceptual(network: nn.Module, image_shape: tuple[int, int]) -> None:
    """Refuse to train an autoencoder with a perceptual distance when the Inception is not
    installed or its crops are too small for it. (Only training needs it: a latent model
    encodes and decodes with an autoencoder trained with it wherever the Inception is missing.)"""
    if not (isinstance(network, Autoencoder) and network.cfg.perceptual_weight):
        return
    perceptual_weights()
    side = min(crop_side(network.cfg, length) for length in image_shape)
    if side < PERCEPTUAL_SMALLEST_SIDE:
        raise KneegenError(
            f"model.vae.perceptual_weight: the Inception's layers need inputs at least {PERCEPTUAL_SMALLEST_SIDE} px "
            f"a side, and this run trains on {side} px: set model.vae.crop to {PERCEPTUAL_SMALLEST_SIDE} or more "
            "(on images that large), or set model.vae.perceptual_weight to 0"
        )


def make_run_adversary(
    network: nn.Module, image_shape: tuple[int, int], channels: int, cfg: RunConfig, compute: Compute, dist: Distributed
) -> Adversary | None:
    """A patch discriminator when the run asks for one: an autoencoder's (`model.vae.adversarial_weight`,
    judging reconstructed crops) or a distillation's (`distill.adversarial_weight`, judging the
    student's x̂_0). Its weights are drawn after the network's, from the same seeded global RNG, so
    in every process alike."""
    if isinstance(network, Autoencoder) and network.cfg.adversarial_weight:
        vae = network.cfg
        key, side = "model.vae", min(crop_side(vae, length) for length in image_shape)
        weight, start, width = vae.adversarial_weight, vae.adversarial_start, vae.discriminator_channels
        fix = f"set model.vae.crop to {SMALLEST_SIDE} or more (on images that large)"
    elif cfg.distill.teacher and cfg.distill.adversarial_weight:
        side, key = min(image_shape), "distill"
        weight, start, width = cfg.distill.adversarial_weight, 0, cfg.distill.discriminator_channels
        fix = f"distil a model of inputs {SMALLEST_SIDE} px a side or more"
    else:
        return None
    if side < SMALLEST_SIDE:
        raise KneegenError(
            f"{key}.adversarial_weight: the discriminator judges patches of inputs at least {SMALLEST_SIDE} px "
            f"a side, and this run trains on {side} px: {fix}, or set {key}.adversarial_weight to 0"
        )
    return make_adversary(channels, width, weight, start, cfg.train.lr, compute, dist)


def make_ema(network: nn.Module, train: TrainConfig) -> EMA | PowerEMA | None:
    """The average validation and sampling use: a power-function EMA of `ema_length` (σ_rel, a
    fixed fraction of the run whatever its length), else `ema_decay` with its warm-up; None if off."""
    if train.ema_length > 0:
        return PowerEMA(network, train.ema_length)
    return EMA(network, train.ema_decay) if train.ema_decay > 0 else None


# --- checkpoints ----------------------------------------------------------------------------------


def state_payload(state: TrainState, rng: list[dict[str, Any]]) -> dict[str, Any]:
    """The checkpoint's training part, with `rng` the RNG states of every process in rank order
    (the caller adds config and data facts)."""
    return {
        "model": state.network.state_dict(),
        "ema": state.ema.model.state_dict() if state.ema is not None else None,
        "power_emas": [power.model.state_dict() for power in state.power_emas],
        "optimizer": state.optimizer.state_dict(),
        "scaler": state.scaler.state_dict(),
        "generator": state.generator.get_state(),
        "timestep_sampler": state.timestep_sampler.state_dict(),
        "rng": rng,
        "step": state.step,
        "epoch": state.epoch,
        "batch_in_epoch": state.batch_in_epoch,
        "epoch_losses": list(state.epoch_losses),
        "epoch_skipped": list(state.epoch_skipped),
        "bad_in_a_row": state.bad_in_a_row,
        "best_val_loss": state.best_val_loss,
        "best_fid": state.best_fid,
        "end_step": state.end_step,
        "distillation": state.distillation.state_dict() if state.distillation is not None else None,
        "guide": state.guide.state_dict() if state.guide is not None else None,
        "adversary": state.adversary.state_dict() if state.adversary is not None else None,
    }


def restore_state(
    state: TrainState, payload: dict[str, Any], dist: Distributed = SINGLE, source: str = "the checkpoint"
) -> None:
    """Load a checkpoint written by `state_payload` into a state built from the same config;
    `source` names it when its weights do not fit that config's network.

    Dropout continues exactly when the number of processes is the one that wrote the checkpoint;
    data order, t and ε continue exactly in any case.
    """
    load_weights(state.network, payload["model"], source, CHANGED_CONFIG)
    if state.ema is not None:
        state.ema.model.load_state_dict(payload["ema"] if payload["ema"] is not None else payload["model"])
    saved_powers = payload.get("power_emas") or [payload["model"]] * len(state.power_emas)  # snapshots newly asked
    for power, saved in zip(state.power_emas, saved_powers):
        power.model.load_state_dict(saved)
    state.optimizer.load_state_dict(payload["optimizer"])
    if payload["scaler"]:
        state.scaler.load_state_dict(payload["scaler"])
    state.generator.set_state(payload["generator"])
    if "timestep_sampler" in payload:  # absent from checkpoints before diffusion.timestep_sampling: no history yet
        state.timestep_sampler.load_state_dict(payload["timestep_sampler"])
    if len(payload["rng"]) == dist.world_size:
        set_rng_states(payload["rng"][dist.rank])
    state.step, state.epoch, state.batch_in_epoch = payload["step"], payload["epoch"], payload["batch_in_epoch"]
    state.epoch_losses, state.epoch_skipped = list(payload["epoch_losses"]), list(payload["epoch_skipped"])
    state.bad_in_a_row = payload["bad_in_a_row"]
    state.best_val_loss = payload["best_val_loss"]
    state.best_fid = payload.get("best_fid", math.inf)  # absent from checkpoints before train.fid_every
    state.end_step = payload.get("end_step", 0)  # absent before train.cooldown
    if state.distillation is not None:
        state.distillation.load_state_dict(payload["distillation"])
    if state.adversary is not None and payload.get("adversary") is not None:  # absent: not asked for until now
        state.adversary.load_state_dict(payload["adversary"])
    if payload.get("guide") is not None and dist.is_main:  # absent before train.guide_at; rank 0 keeps it
        keep_guide(state)
        state.guide.load_state_dict(payload["guide"])


def keep_guide(state: TrainState) -> None:
    """Freeze a copy of the weights sampling uses as the run's autoguidance guide: the same
    network, less trained, whose errors are the model's own, only larger (Karras et al. 2024)."""
    state.guide = copy.deepcopy(state.eval_network).requires_grad_(False).eval()


def rng_states() -> dict[str, Any]:
    """This process's global RNG states (dropout draws from torch's), in checkpoint-safe types."""
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": numpy_state["state"]["pos"],
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    }


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    numpy_state = states["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


# --- the data and the draws of an epoch ---------------------------------------------------------------


def learning_rate(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Linear warm-up over `warmup_steps`, then constant, or a half cosine that reaches 0 after
    `total_steps`; a constant LR with `cooldown` falls linearly to 0 over that last fraction of
    `total_steps` (warmup-stable-decay). A function of the step and the planned length alone."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        cooldown_steps = cfg.cooldown * total_steps
        return cfg.lr * min(1.0, max(0.0, total_steps - step) / cooldown_steps) if cooldown_steps else cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def epoch_order(n_images: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled image order of one epoch, a function of (seed, epoch) only."""
    generator = torch.Generator().manual_seed(seed * EPOCH_SEED_STRIDE + epoch)
    return torch.randperm(n_images, generator=generator)


def steps_per_epoch(n_images: int, batch_size: int, world_size: int = 1) -> int:
    """Full batches, and the last, smaller one unless it has fewer images than processes."""
    full, rest = divmod(n_images, batch_size)
    return full + int(rest >= world_size)


def epoch_batches(n_images: int, train: TrainConfig, epoch: int, world_size: int = 1) -> list[np.ndarray]:
    """The global batches of one epoch: sorted indices (the memory-mapped cache reads sequentially)."""
    order = epoch_order(n_images, train.seed, epoch).numpy()
    size = train.batch_size
    return [np.sort(order[k * size : (k + 1) * size]) for k in range(steps_per_epoch(n_images, size, world_size))]


def draw_noise(generator: torch.Generator, shape: tuple[int, ...], offset: float) -> Tensor:
    """ε ~ N(0, I), plus with offset noise (Guttenberg 2023) a constant per image and channel of
    std `offset`, which lets the model change the mean brightness of an image."""
    noise = torch.randn(shape, generator=generator)  # (B, C, H, W)
    if offset > 0:
        noise = noise + offset * torch.randn((*shape[:2], 1, 1), generator=generator)
    return noise


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """A CPU tensor on `device`; to CUDA through pinned memory, so the copy does not block."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


# --- training ----------------------------------------------------------------------------------


def epoch_steps(
    state: TrainState,
    images: np.ndarray,
    schedule: Schedule,
    cfg: RunConfig,
    compute: Compute,
    dist: Distributed = SINGLE,
    conditions: np.ndarray | None = None,
) -> Iterator[StepResult]:
    """Train the rest of the current epoch of `images` ((N, H, W) unsigned ints), one optimizer
    step per item; `state.epoch` counts up after the last. Between items the state may be
    checkpointed: a run resumed from it continues with the next batch. A conditional network is
    given each image's `conditions` ((N, K), NaN where unknown), some dropped at random."""
    train = cfg.train
    if bool(cfg.model.conditions) != (conditions is not None):
        raise ValueError(f"model.conditions {cfg.model.conditions} needs the images' conditions, and only then")
    batches = epoch_batches(len(images), train, state.epoch, dist.world_size)
    total_steps = state.end_step or train.epochs * len(batches)
    if state.batch_in_epoch == 0:
        state.epoch_losses, state.epoch_skipped = [], []
        if state.adversary is not None:
            state.adversary.epoch_losses = []
        if state.distillation is not None and state.distillation.fake_score is not None:
            state.distillation.fake_score.epoch_losses = []
    state.train_network.train()
    for index in batches[state.batch_in_epoch :]:
        # 0. A distillation run whose round is over hands the student on as the next round's teacher.
        distillation = state.distillation
        if distillation is not None and distillation.round_over(state.step, total_steps):
            distillation.begin_next_round(state.network, state.step)
            state.optimizer.state.clear()  # a new round is a new optimisation, as in the paper
            state.best_val_loss = math.inf  # best.pt: the best student of the newest round

        # 1. The draws of the whole global batch (t, ε, loss weights, augmentation, crops), from the
        #    generator every process holds in the same state; this process trains on its rows.
        if isinstance(state.network, Autoencoder):
            loss_of, t_all = autoencoder_batch(state, images, index, compute), None
        else:
            loss_of, t_all = diffusion_batch(state, images, index, schedule, cfg, compute, conditions)
        rows = dist.share(len(index))
        micro_batches = np.array_split(rows, min(train.grad_accumulation, len(rows)))

        # 2. Forward and backward per micro-batch. Gradients add up; DDP averages them over the
        #    processes on the last one. The scale makes the sum the gradient of the mean loss.
        state.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=compute.device)
        row_losses = []  # (b,) per micro-batch: this process's rows, in order
        for k, part in enumerate(micro_batches):
            with dist.no_sync(state.train_network, sync=k == len(micro_batches) - 1):
                per_image, weight = loss_of(part)  # (b,) each
                loss = (weight * per_image).sum() * (dist.world_size / len(index))
                state.scaler.scale(loss).backward()
            loss_sum += per_image.detach().sum()
            row_losses.append(per_image.detach())

        # 3. Update: unscale, clip, step, EMA and the loss history of importance-sampled t (with
        #    the losses of the whole global batch), unless the loss or a gradient is not finite.
        start, length = (0, total_steps) if distillation is None else distillation.span(total_steps)
        lr = learning_rate(train, state.step - start, length)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        state.scaler.unscale_(state.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(state.network.parameters(), train.grad_clip or math.inf).item()
        mean_loss = dist.sum(loss_sum) / len(index)
        skipped = not (math.isfinite(mean_loss) and math.isfinite(grad_norm))
        if state.adversary is not None and state.adversary.pending:
            state.adversary.step(lr, len(index), dist, skipped)  # learns from this step's crops (unless skipped)
        if distillation is not None and distillation.fake_score is not None:
            distillation.fake_score.step(lr, len(index), dist, skipped)  # learns this step's samples (unless skipped)
        if not skipped:
            state.scaler.step(state.optimizer)
            for average in ([state.ema] if state.ema is not None else []) + state.power_emas:
                average.update(state.network, state.step + 1)  # steps done, this one included
            if state.timestep_sampler.importance and t_all is not None:
                batch_losses = torch.zeros(len(index), device=compute.device)  # (B,) zeros outside this share
                batch_losses[rows] = torch.cat(row_losses)
                state.timestep_sampler.update(t_all, dist.sum_tensor(batch_losses))
        state.scaler.update()

        # 4. Position and tallies; too many bad steps in a row stop the run before it saves them.
        state.step += 1
        state.batch_in_epoch += 1
        state.epoch_losses.append(mean_loss)
        if skipped:
            state.epoch_skipped.append(len(state.epoch_losses) - 1)
        state.bad_in_a_row = state.bad_in_a_row + 1 if skipped else 0
        if train.max_bad_steps and state.bad_in_a_row >= train.max_bad_steps:
            raise KneegenError(
                f"{state.bad_in_a_row} steps in a row up to step {state.step} had a non-finite loss or gradient "
                f"(train.max_bad_steps): stopped without saving them, so the last checkpoint holds finite "
                f"weights; lower train.lr or set train.grad_clip, then --resume"
            )
        yield StepResult(mean_loss, grad_norm, lr, len(index), skipped)
    state.epoch += 1
    state.batch_in_epoch = 0


LossOf = Callable[[np.ndarray], tuple[Tensor, Tensor]]  # rows of the global batch → (per-image loss, weight), (b,)


def diffusion_batch(
    state: TrainState,
    images: np.ndarray,
    index: np.ndarray,
    schedule: Schedule,
    cfg: RunConfig,
    compute: Compute,
    conditions: np.ndarray | None,
) -> tuple[LossOf, Tensor | None]:
    """Draw t, ε, the loss weights, augmentation and dropped conditions of the global batch
    `index`; return the loss of any of its rows, and the drawn t (B,)."""
    train, diffusion, distillation = cfg.train, cfg.diffusion, state.distillation
    if distillation is not None:
        t_all, weight_all = distillation.draw(len(index), state.generator)  # the student's grid, max(SNR, 1)
    else:
        t_all, importance_all = state.timestep_sampler.draw(len(index), state.generator)
    noise_all = draw_noise(state.generator, (len(index), *stored_shape(images)), diffusion.offset_noise)
    matching_all = (
        distillation.draw_matching(t_all, stored_shape(images), state.generator) if distillation is not None else None
    )
    if distillation is None:
        min_snr_all = min_snr_weight(schedule.snr(t_all), diffusion.min_snr_gamma, diffusion.prediction)
        weight_all = min_snr_all * importance_all  # (B,); importance weights are 1 for uniform t
    augmented = augment(to_network_input(images[index], CPU), train.augment, state.generator) if train.augment else None
    c_all = (
        drop_conditions(torch.from_numpy(conditions[index]), train.condition_dropout, state.generator)
        if conditions is not None
        else None
    )  # (B, K), NaN = not given

    def loss_of(part: np.ndarray) -> tuple[Tensor, Tensor]:
        x0 = augmented[part] if augmented is not None else to_network_input(images[index[part]], CPU)
        x0 = to_device(x0, compute.device).to(memory_format=compute.memory_format)  # (b, C, H, W)
        t, noise, weight = (to_device(a[part], compute.device) for a in (t_all, noise_all, weight_all))
        c = to_device(c_all[part], compute.device) if c_all is not None else None
        x_t = schedule.add_noise(x0, noise, t)
        draws = matching_all.part(torch.from_numpy(part)).to(compute.device) if matching_all is not None else None
        if distillation is not None:
            # dmd: later steps from the student's own samples, first steps from the teacher pairs' noise
            x_t = distillation.simulated_inputs(x_t, t, noise, c, draws)
            x_t, c = distillation.anchored_inputs(x_t, c, draws)
        with compute.autocast():
            prediction = call_network(state.train_network, x_t, t, c)
        if distillation is not None:
            per_image, student_x0 = distillation.loss(prediction, x_t, t, c, draws)
            if draws is not None:
                distillation.fake_score.keep(student_x0, draws, c)  # type: ignore[union-attr]  # for its updates
            if state.adversary is not None:  # its term is not to be weighted by max(SNR, 1): divided back out
                judged = state.adversary.generator_term(x0, student_x0, weight * per_image, student_x0)
                per_image = per_image + judged / weight
            return per_image, weight
        target = schedule.target(x0, noise, t, diffusion.prediction)
        return per_image_loss(prediction, target, diffusion.loss), weight

    return loss_of, t_all if distillation is None else None


def autoencoder_batch(state: TrainState, images: np.ndarray, index: np.ndarray, compute: Compute) -> LossOf:
    """Draw a random crop of each image of the global batch `index` and the posterior's noise;
    return the autoencoder loss of any of its rows (weight 1), with the adversarial term once the
    discriminator is active (so the logged training loss then differs from the validation loss)."""
    settings: AutoencoderConfig = state.network.cfg  # type: ignore[assignment]
    height, width = images.shape[1:]
    side_y, side_x = (crop_side(settings, side) for side in (height, width))
    tops = torch.randint(0, height - side_y + 1, (len(index),), generator=state.generator).tolist()
    lefts = torch.randint(0, width - side_x + 1, (len(index),), generator=state.generator).tolist()
    noise_all = torch.randn((len(index), *latent_shape(settings, (side_y, side_x))), generator=state.generator)
    adversary = state.adversary

    def loss_of(part: np.ndarray) -> tuple[Tensor, Tensor]:
        crops = np.stack([images[index[i], tops[i] : tops[i] + side_y, lefts[i] : lefts[i] + side_x] for i in part])
        x0 = to_device(to_network_input(crops, CPU), compute.device).to(memory_format=compute.memory_format)
        with compute.autocast():
            reconstruction, mean, logvar = state.train_network(x0, to_device(noise_all[part], compute.device))
        per_image = autoencoder_loss(reconstruction, x0, mean, logvar, settings, compute.autocast)
        if adversary is not None and adversary.active(state.epoch):
            last_layer = state.network.last_layer()  # type: ignore[operator]
            per_image = per_image + adversary.generator_term(x0, reconstruction, per_image, last_layer)
        return per_image, torch.ones_like(per_image)

    return loss_of


def training_input_shape(network: nn.Module, item_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """(C, H, W) of one training input: an autoencoder's crop of a (C, H, W) item, else the item."""
    channels, height, width = item_shape
    if isinstance(network, Autoencoder):
        return channels, crop_side(network.cfg, height), crop_side(network.cfg, width)
    return channels, height, width


def crop_side(settings: AutoencoderConfig, side: int) -> int:
    """The training crop along an image side: `crop`, or the whole side when it is shorter (or crop 0)."""
    return min(settings.crop, side) if settings.crop else side
