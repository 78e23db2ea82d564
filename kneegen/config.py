"""The run config: one dataclass per concern, loaded from YAML, overridden from the CLI.

Every built-in choice is validated once, here, so the rest of the code can trust it: unknown keys
are named with the closest known key, wrong types name the key and the expected type. Names that
plugins can extend (the network and its settings, the sampler) are checked where the registries
are loaded (kneegen/engine/plugins.py), so this module imports nothing of the engine. The resolved
config is written into the run dir and into every checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from kneegen.errors import KneegenError

ScheduleKind = Literal["linear", "cosine"]
Prediction = Literal["eps", "v"]
LossKind = Literal["l1", "l2", "huber"]
OptimizerKind = Literal["adamw", "adam"]
Spacing = Literal["auto", "uniform", "trailing", "logsnr", "karras"]
Precision = Literal["auto", "fp32", "bf16"]
DeviceName = Literal["auto", "cpu", "cuda", "mps"]
AugmentKind = Literal["shift", "intensity", "flip"]  # kneegen/engine/augment.py
TimestepSampling = Literal["uniform", "importance", "lognormal"]  # kneegen/engine/timesteps.py
ConditionName = Literal["side", "position"]  # kneegen/data/conditions.py
DistillMethod = Literal["progressive", "consistency", "dmd"]  # engine/distillation.py, engine/fake_score.py
TeacherSolver = Literal["ddim", "dpm++2m"]  # how round 0's teacher takes its two steps (engine/distillation.py)


@dataclass
class ModelConfig:
    """The denoising network: `arch` names one of the registry (kneegen/engine/network.py), and
    each network's own keys sit in a section under its name (`model.unet.channels`). Networks can
    come from plugins, so the sections are checked where the network is looked up, not here."""

    arch: str = "unet"
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    conditions: list[ConditionName] = field(default_factory=list)  # e.g. [side, position]; [] = unconditional
    autoencoder: str = ""  # a `model.arch: vae` checkpoint: diffuse in its latent space (latent diffusion); "" = pixels


# The U-Net's keys as configs and checkpoints wrote them before networks had sections (until
# 2026-12): read as `model.unet.*`, so those runs keep loading and resuming.
FLAT_UNET_KEYS = ("channels", "channel_mults", "blocks_per_level", "attention_levels", "patch_size", "dropout")


def model_from_mapping(raw: Any, source: str) -> ModelConfig:
    """`model:` of a config: `arch` plus one mapping per network section."""
    if not isinstance(raw, dict):
        raise KneegenError(f"{source}: model must be a mapping of keys")
    raw = dict(raw)
    arch = raw.pop("arch", ModelConfig.arch)
    if not isinstance(arch, str):
        raise KneegenError(f"{source}: model.arch must be the name of a network, e.g. unet; got {arch!r}")
    conditions = model_conditions(raw.pop("conditions", []), source)
    autoencoder = raw.pop("autoencoder", "") or ""
    if not isinstance(autoencoder, str):
        raise KneegenError(
            f"{source}: model.autoencoder must be the path of an autoencoder checkpoint "
            f"(e.g. runs/autoencoder/best.pt); got {autoencoder!r}"
        )
    sections: dict[str, dict[str, Any]] = {}
    flat = {key: raw.pop(key) for key in FLAT_UNET_KEYS if key in raw}
    for name, section in raw.items():
        if not isinstance(section, dict):
            example = f"model.{name}.channels" if name == arch else f"model.{arch}.{name}"
            raise KneegenError(
                f"{source}: model.{name} is given a value ({section!r}), but under model only arch, conditions and "
                f"autoencoder take one; the other keys are networks' sections of keys, e.g. {example}"
            )
        sections[str(name)] = dict(section)
    if flat:
        sections["unet"] = {**sections.get("unet", {}), **flat}
    return ModelConfig(arch, sections, conditions, autoencoder)


def model_conditions(raw: Any, source: str) -> list[ConditionName]:
    """`model.conditions`: a list of distinct condition names (None or [] = unconditional)."""
    if raw is not None and not isinstance(raw, list):
        raise KneegenError(f"{source}: model.conditions must be a list, e.g. [side, position]; got {raw!r}")
    conditions = coerce(list[ConditionName], raw or [], source, "model.conditions")
    if len(set(conditions)) != len(conditions):
        raise KneegenError(f"{source}: model.conditions {conditions} names a condition twice")
    return conditions


def model_to_mapping(model: ModelConfig) -> dict[str, Any]:
    """The `model:` mapping; an unconditional pixel model writes no `conditions` and no `autoencoder`,
    as before they existed."""
    conditions = {"conditions": list(model.conditions)} if model.conditions else {}
    autoencoder = {"autoencoder": model.autoencoder} if model.autoencoder else {}
    return {"arch": model.arch, **conditions, **autoencoder, **copy.deepcopy(model.sections)}


@dataclass
class DiffusionConfig:
    """The forward process and what the network is trained to predict."""

    timesteps: int = 1000
    schedule: ScheduleKind = "cosine"
    prediction: Prediction = "v"
    loss: LossKind = "l2"
    min_snr_gamma: float = (
        5.0  # Min-SNR-γ loss weighting (Hang et al. 2023); 0 = off. 5 chosen by benchmarks/defaults.py
    )
    offset_noise: float = 0.0  # std of a per-image, per-channel constant added to ε; 0 = off
    # importance: t ∝ √E[L_t²] of recent losses (Improved DDPM); lognormal: ln σ_t ~ N(P_mean, P_std²) (EDM)
    timestep_sampling: TimestepSampling = "uniform"
    # P_mean: EDM's −1.2 suits data of std 0.5; auto = ln(0.6 · std) of the training split (latents: std 1)
    lognormal_mean: float | Literal["auto"] = -1.2
    lognormal_std: float = 1.2  # P_std


@dataclass
class TrainConfig:
    """The optimisation, the EMA and the deterministic validation."""

    epochs: int = 50
    minutes: float = 0.0  # stop at the epoch end where another would pass this (or amid a longer first epoch); 0 = off
    batch_size: int = 32
    optimizer: OptimizerKind = "adamw"
    lr: float = 2e-4
    weight_decay: float = 0.0
    adam_beta2: float = 0.999  # the second-moment decay; EDM2 trains with 0.99 (adapts faster in short runs)
    warmup_steps: int = 200
    grad_clip: float = 1.0  # 0 disables clipping
    ema_decay: float = 0.999  # 0 disables EMA: sampling then uses the raw weights
    ema_length: float = 0.0  # > 0: the EMA is a power-function one averaging this σ_rel of the run (EDM2); 0: ema_decay
    ema_snapshots: bool = False  # keep power-EMA snapshots each epoch, for any EMA length after training (kneegen ema)
    guide_at: float = (
        0.0  # keep the EMA weights once this fraction of the run is done, as the autoguidance guide; 0 = off
    )
    seed: int = 0
    val_every: int = 1  # epochs between validations
    val_images: int = 256  # held-out images used for the validation loss
    val_timesteps: int = 10  # fixed t grid: one bucket each
    lr_schedule: Literal["constant", "cosine"] = "constant"  # after warm-up; cosine decays to 0 over train.epochs
    cooldown: float = 0.0  # constant LR, then linear to 0 over this last fraction of the run (with minutes: as planned)
    grad_accumulation: int = 1  # micro-batches per step; batch_size stays the images per step
    max_bad_steps: int = 20  # stop after this many steps in a row with a non-finite loss/gradient; 0 = never
    checkpoint_every_steps: int = 0  # also checkpoint every N steps (0 = at epoch ends only)
    keep_checkpoints: int = 0  # keep the last K checkpoints as checkpoints/step-*.pt; 0 = only last.pt/best.pt
    log_every_steps: int = 0  # a metrics.jsonl record every N steps as well as per epoch; 0 = per epoch only
    preview_every: int = 0  # a fixed-seed sample grid in previews/ every N epochs; 0 = off
    compile: bool = False  # torch.compile the network for training (not validation)
    tensorboard: bool = False  # also write TensorBoard scalars to tensorboard/ when it is installed
    augment: list[AugmentKind] = field(default_factory=list)  # e.g. [shift, intensity]; flip swaps knee sides
    condition_dropout: float = 0.1  # with model.conditions: chance each condition, and all together, is dropped
    fid_every: int = 0  # FID/KID of fixed-seed samples vs the val split every N epochs; 0 = off
    fid_samples: int = 64  # images drawn for that FID
    best_by: Literal["val_loss", "fid"] = "val_loss"  # what makes best.pt best; fid needs fid_every


@dataclass
class SampleConfig:
    """How images are drawn from a trained model."""

    sampler: str = "dpm++2m"  # a registered sampler; measured best at <= 25 steps (benchmarks/)
    steps: int = 25
    eta: float = 0.0  # DDIM stochasticity: 0 deterministic, 1 ancestral-like
    batch_size: int = 16
    spacing: Spacing = "auto"  # timesteps: auto = the sampler's best (log-SNR for multistep)
    guidance: float = 1.0  # classifier-free guidance w of a conditional model: 0 unconditional, 1 conditional
    autoguidance: float = 1.0  # w away from the run's guide (train.guide_at), Karras et al. 2024; 1 = off
    autoguidance_sigma_max: float = 1.0  # autoguide only at noise levels σ ≤ this (.inf: every step)
    compile: bool = False  # `kneegen sample` only: torch.compile the network (CUDA graphs on GPU); slow first batch


@dataclass
class DistillConfig:
    """A distillation run (`kneegen distill`): a student learns to sample in `steps` network calls
    what the `teacher` checkpoint samples in many; off while `teacher` is empty."""

    teacher: str = ""  # the teacher checkpoint (stored absolute); "" = an ordinary training run
    method: DistillMethod = "progressive"  # Salimans & Ho 2022: each round halves the DDIM steps; or consistency, dmd
    steps: int = 4  # the student's network calls per image
    teacher_steps: int = 16  # the first teacher's DDIM steps: steps × 2^rounds (consistency: its grid)
    autoguidance: float = 1.0  # round 0's teacher steps autoguided by this w (default: the teacher's own)
    autoguidance_sigma_max: float = 1.0  # ... at noise levels σ ≤ this (default: the teacher's own)
    teacher_solver: TeacherSolver = "ddim"  # round 0's second teacher step: DDIM, or with DPM-Solver++(2M)'s correction
    adversarial_weight: float = 0.0  # a patch discriminator judges the student's x̂_0 (engine/adversary.py); 0 = none
    discriminator_channels: int = 64  # its first layer's width, doubling at each halving up to 8×
    fake_score_updates: int = 5  # dmd: the fake score's optimiser steps per student step (engine/fake_score.py)
    regression_weight: float = 1.0  # dmd: the first step regressed on the teacher's ODE images (teacher_pairs.py)
    regression_pairs: int = 1024  # dmd: how many noise → image pairs the teacher draws for it, once
    backward_simulation: bool = False  # dmd: later steps learn from the student's own earlier steps (DMD2)


@dataclass
class RunConfig:
    """Everything one training run needs; saved as `config.yaml` next to its outputs."""

    data: str = "data/prepared"
    device: DeviceName = "auto"
    precision: Precision = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Defaults, then the YAML file, then dotted-key overrides (`train.lr`), validated once."""
    if path is None:
        return config_from_mapping({}, "defaults", overrides)
    return config_from_mapping(read_yaml_mapping(path), str(path), overrides)


def config_from_mapping(raw: dict[str, Any], source: str, overrides: dict[str, Any] | None = None) -> RunConfig:
    """A config from a mapping (a YAML file's, or the one inside a checkpoint) and overrides.

    The overrides are checked on their own first (unknown key, type, range), so a bad value given
    on the command line is blamed on it, not on the file it did not come from."""
    overrides = overrides or {}
    given: dict[str, Any] = {}
    for dotted, value in overrides.items():
        set_dotted(given, dotted, value, "the command line")
    given_config = from_dict(RunConfig, given, "the command line", prefix="")
    for key in RANGES.keys() & overrides.keys():
        check_bound(key, get_dotted(given_config, key), RANGES[key], "the command line")
    raw = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        set_dotted(raw, dotted, value, source)
    config = from_dict(RunConfig, raw, source, prefix="")
    check_ranges(config, f"{source} with the command line" if overrides else source)  # keys checked together
    return config


MAX_GUIDANCE = 100.0  # beyond this guidance w the samples are saturated noise: a larger value is a typo

# (low, high, low inclusive, high inclusive); None = unbounded on that side.
Bounds = tuple[float | None, float | None, bool, bool]
AT_LEAST_0: Bounds = (0, None, True, False)
AT_LEAST_1: Bounds = (1, None, True, False)
POSITIVE: Bounds = (0, None, False, False)
UNIT: Bounds = (0, 1, True, True)
RANGES: dict[str, Bounds] = {
    "diffusion.timesteps": (2, None, True, False),
    "diffusion.min_snr_gamma": AT_LEAST_0,
    "diffusion.offset_noise": AT_LEAST_0,
    "diffusion.lognormal_mean": (-10, 10, True, True),  # ln σ: beyond ±10 every draw lands on the schedule's end
    "diffusion.lognormal_std": POSITIVE,
    "train.epochs": AT_LEAST_1,
    "train.minutes": AT_LEAST_0,
    "train.batch_size": AT_LEAST_1,
    "train.lr": POSITIVE,
    "train.weight_decay": AT_LEAST_0,
    "train.adam_beta2": (0, 1, False, False),
    "train.ema_length": (0, 0.2886, True, True),
    "train.guide_at": (0, 1, True, False),
    "train.cooldown": (0, 1, True, True),  # 1: linear from the warm-up's end (a distillation round's own LR)
    "train.warmup_steps": AT_LEAST_0,
    "train.grad_clip": AT_LEAST_0,
    "train.ema_decay": (0, 1, True, False),
    "train.seed": (0, 2**63 - 1, True, True),
    "train.val_every": AT_LEAST_1,
    "train.val_images": AT_LEAST_1,
    "train.val_timesteps": AT_LEAST_1,
    "train.grad_accumulation": AT_LEAST_1,
    "train.max_bad_steps": AT_LEAST_0,
    "train.checkpoint_every_steps": AT_LEAST_0,
    "train.keep_checkpoints": AT_LEAST_0,
    "train.log_every_steps": AT_LEAST_0,
    "train.preview_every": AT_LEAST_0,
    "train.fid_every": AT_LEAST_0,
    "train.fid_samples": (4, None, True, False),
    "train.condition_dropout": (0, 1, True, False),
    "sample.steps": AT_LEAST_1,
    "sample.eta": UNIT,
    "sample.batch_size": AT_LEAST_1,
    "sample.guidance": (0, MAX_GUIDANCE, True, True),
    "sample.autoguidance": (1, MAX_GUIDANCE, True, True),
    "sample.autoguidance_sigma_max": (0, None, False, False),
    "distill.steps": AT_LEAST_1,
    "distill.autoguidance": (1, MAX_GUIDANCE, True, True),
    "distill.autoguidance_sigma_max": (0, None, False, False),
    "distill.adversarial_weight": AT_LEAST_0,
    "distill.discriminator_channels": AT_LEAST_1,
    "distill.fake_score_updates": AT_LEAST_1,
    "distill.regression_weight": AT_LEAST_0,
    "distill.regression_pairs": AT_LEAST_1,
}
UNBOUNDED = {"sample.autoguidance_sigma_max", "distill.autoguidance_sigma_max"}  # where .inf means "no limit"


def check_ranges(config: RunConfig, source: str = "config") -> None:
    """The bounds the types cannot express, each named by its key; lists are checked per item."""
    for key, bounds in RANGES.items():
        check_bound(key, get_dotted(config, key), bounds, source)
    if not config.data.strip():
        raise KneegenError(f"{source}: data is empty: give the prepared data dir, e.g. --data data/prepared")
    if config.train.best_by == "fid" and config.train.fid_every == 0:
        raise KneegenError(
            f"{source}: train.best_by = fid needs train.fid_every > 0 (epochs between FIDs): set both, "
            "e.g. --set train.fid_every=5"
        )
    if config.model.conditions and "flip" in config.train.augment:
        raise KneegenError(
            f"{source}: train.augment flip mirrors knees, which turns a left knee into a right one whose stack "
            "runs the other way, and would teach model.conditions wrong labels: drop flip, or the conditions"
        )
    if config.model.autoencoder and config.model.arch == "vae":
        raise KneegenError(
            f"{source}: model.autoencoder names the autoencoder a latent diffusion model works in; "
            "an autoencoder (model.arch: vae) trains on pixels: drop model.autoencoder"
        )
    if config.model.autoencoder and config.train.augment:
        raise KneegenError(
            f"{source}: train.augment works on pixels, and a latent model (model.autoencoder) trains on cached "
            "latents: drop train.augment"
        )
    if config.model.arch == "vae" and (config.train.augment or config.train.ema_snapshots):
        raise KneegenError(
            f"{source}: train.augment and train.ema_snapshots are for diffusion runs; an autoencoder "
            "(model.arch: vae) trains on random crops and keeps one EMA: drop them"
        )
    if config.model.arch == "vae" and config.train.guide_at:
        raise KneegenError(
            f"{source}: train.guide_at keeps a guide for sampling, and an autoencoder (model.arch: vae) draws no "
            "samples: set train.guide_at to 0"
        )
    if config.model.arch == "vae" and config.train.fid_every:
        raise KneegenError(
            f"{source}: train.fid_every measures samples, and an autoencoder (model.arch: vae) draws none; "
            "its validation reports PSNR and SSIM: set train.fid_every to 0"
        )
    if config.distill.teacher:
        check_distillation(config, source)
    if config.train.cooldown and config.train.lr_schedule != "constant":
        raise KneegenError(
            f"{source}: train.cooldown ends a constant LR; train.lr_schedule = {config.train.lr_schedule} "
            "decays on its own: set one of them"
        )


def check_distillation(config: RunConfig, source: str) -> None:
    """What a distillation run cannot do: its rounds hand the student's own weights on, and it
    trains no autoencoder."""
    train = config.train
    if config.model.arch == "vae":
        raise KneegenError(f"{source}: distill.teacher names a diffusion model; an autoencoder draws no samples")
    if train.ema_length or train.ema_decay or train.ema_snapshots:
        raise KneegenError(
            f"{source}: a distillation round hands its student's own weights to the next round (its LR cooldown "
            "averages them), so it keeps no EMA: set train.ema_length, train.ema_decay to 0 and "
            "train.ema_snapshots to false"
        )
    steps, teacher_steps = config.distill.steps, config.distill.teacher_steps
    if teacher_steps <= steps or teacher_steps % steps or (teacher_steps // steps) & (teacher_steps // steps - 1):
        raise KneegenError(
            f"{source}: distill.teacher_steps {teacher_steps} must be distill.steps {steps} times a power of two "
            f"(each round halves the steps), e.g. {steps * 4}"
        )
    if config.sample.sampler == "distilled" and config.sample.steps != config.distill.steps:
        raise KneegenError(
            f"{source}: sample.steps {config.sample.steps} differs from distill.steps {config.distill.steps}, "
            "the steps the student learns: make them equal"
        )


def check_bound(key: str, value: float | str, bounds: Bounds, source: str) -> None:
    if isinstance(value, str):  # a word a number key also takes (`auto`): resolved, and bounded, where it is used
        return
    low, high, low_inclusive, high_inclusive = bounds
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if too_low or too_high:
        raise KneegenError(
            f"{source}: {key} = {value} must be {describe_bounds(bounds)}: fix it in the config or with --set {key}=…"
        )


def describe_bounds(bounds: Bounds) -> str:
    low, high, low_inclusive, high_inclusive = bounds
    parts = []
    if low is not None:
        parts.append(f"{'≥' if low_inclusive else '>'} {low:g}")
    if high is not None:
        parts.append(f"{'≤' if high_inclusive else '<'} {high:g}")
    return " and ".join(parts)


def finite(value: float, source: str, key: str) -> float:
    """`value`, unless NaN, or infinite where no bound means anything (`UNBOUNDED` allows +inf)."""
    if math.isnan(value) or (math.isinf(value) and not (value > 0 and key in UNBOUNDED)):
        raise KneegenError(
            f"{source}: {key} = {value} is not a finite number: fix it in the config or with --set {key}=…"
        )
    return value


def get_dotted(config: Any, dotted: str) -> Any:
    for name in dotted.split("."):
        config = getattr(config, name)
    return config


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A UTF-8 YAML file that must hold a mapping with each key once; any other content is the
    user's to fix."""
    if path.is_dir():
        raise KneegenError(f"config file {path} is a folder: give a YAML file (see examples/)")
    if not path.is_file():
        raise KneegenError(f"config file {path} not found: give an existing YAML file (see examples/)")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a leading byte-order mark is still text
    except UnicodeDecodeError as exc:
        raise KneegenError(
            f"{path}: not a UTF-8 text YAML file (byte {exc.start} is not UTF-8): give a YAML config "
            "(see examples/), saved as UTF-8"
        ) from None
    try:
        loaded = load_unique_keys(text, path)
    except yaml.reader.ReaderError:  # UTF-8, but with control bytes no text file holds (a binary file)
        raise KneegenError(
            f"{path}: not a UTF-8 text YAML file (it holds control bytes): give a YAML config (see examples/)"
        ) from None
    except yaml.YAMLError as exc:
        raise KneegenError(f"{path}: not valid YAML ({exc.__class__.__name__}); fix the syntax") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise KneegenError(f"{path}: expected a mapping of config keys at the top level")
    return loaded


def load_unique_keys(text: str, path: Path) -> Any:
    """`yaml.safe_load`, but a key given twice in one mapping is refused: YAML keeps the last one
    silently, so `lr` written twice under `train:` would train with whichever came last."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        repeated = repeated_key(node, "", set())
        if repeated is not None:
            dotted, first, second = repeated
            where = f"line {first}" if first == second else f"lines {first} and {second}"
            raise KneegenError(
                f"{path}: config key '{dotted}' is given twice ({where}), and YAML would keep only the last: delete one"
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


def repeated_key(node: yaml.Node, prefix: str, visited: set[int]) -> tuple[str, int, int] | None:
    """(dotted key, first line, second line) of the first key written twice in one mapping under
    `node`, or None. Keys brought in by a merge (`<<: *defaults`) may be overridden, as YAML intends."""
    if id(node) in visited:  # an alias met again (anchors can even nest themselves)
        return None
    visited.add(id(node))
    children: list[tuple[str, yaml.Node]] = []
    if isinstance(node, yaml.MappingNode):
        lines: dict[tuple[str, str], int] = {}  # by tag too: `1` and "1" are two keys
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                children.append((prefix, value_node))
                continue
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if isinstance(key_node, yaml.ScalarNode):
                if (key_node.tag, key) in lines:
                    return f"{prefix}{key}", lines[key_node.tag, key], line
                lines[key_node.tag, key] = line
            children.append((f"{prefix}{key}.", value_node))
    elif isinstance(node, yaml.SequenceNode):
        children = [(prefix, item) for item in node.value]
    for child_prefix, child in children:
        found = repeated_key(child, child_prefix, visited)
        if found is not None:
            return found
    return None


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=3e-4` → ("train.lr", 3e-4); the value is read as YAML so lists work too."""
    key, sep, value = text.partition("=")
    if not sep or not all(part.strip() for part in key.split(".")):
        raise KneegenError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.lr=3e-4")
    try:
        return key.strip(), yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as exc:
        raise KneegenError(
            f"--set {text!r}: the value is not valid YAML ({exc.__class__.__name__}); "
            f"e.g. --set model.unet.channel_mults=[1,2,2]"
        ) from None


def set_dotted(raw: dict[str, Any], dotted: str, value: Any, source: str = "config") -> None:
    """Put `value` at `a.b.c` in a nested dict, creating the sections on the way."""
    *sections, leaf = dotted.split(".")
    node = raw
    for section in sections:
        child = node.setdefault(section, {})
        if not isinstance(child, dict):
            raise KneegenError(
                f"{source}: '{section}' is a value ({child!r}), not a section of keys, so --set {dotted} cannot go in "
                f"it: make {section} a mapping of keys, or leave it out"
            )
        node = child
    node[leaf] = value


def to_dict(config: RunConfig) -> dict[str, Any]:
    """Plain nested dict (YAML and checkpoint friendly); the distill section only in distillation runs."""
    mapping = {**dataclasses.asdict(config), "model": model_to_mapping(config.model)}
    if not config.distill.teacher:
        del mapping["distill"]
    return mapping


def save_config(config: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def from_dict(cls: type, raw: dict[str, Any], source: str, prefix: str) -> Any:
    """Build dataclass `cls` from `raw`, naming `source` and the dotted key in every error."""
    if not isinstance(raw, dict):
        raise KneegenError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping of keys")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
            raise KneegenError(f"{source}: unknown config key '{prefix}{key}'{hint}")
    values = {}
    for name in known:
        if name in raw:
            values[name] = coerce(hints[name], raw[name], source, f"{prefix}{name}")
    return cls(**values)


def coerce(expected: Any, value: Any, source: str, key: str) -> Any:
    """Check `value` against a field type (dataclass, Literal, list[int], scalar) and return it."""
    if expected is ModelConfig:
        return model_from_mapping(value, source)
    if dataclasses.is_dataclass(expected):
        return from_dict(expected, value, source, prefix=f"{key}.")
    origin = typing.get_origin(expected)
    if origin is Literal:
        choices = typing.get_args(expected)
        if value not in choices:
            raise KneegenError(f"{source}: {key} = {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        (item_type,) = typing.get_args(expected)
        if not isinstance(value, list):
            raise KneegenError(f"{source}: {key} must be a list, e.g. {list_example(item_type)}; got {value!r}")
        return [coerce(item_type, item, source, key) for item in value]
    if origin in (typing.Union, types.UnionType):
        return coerce_either(typing.get_args(expected), value, source, key)
    return coerce_scalar(expected, value, source, key)


def coerce_either(members: tuple[Any, ...], value: Any, source: str, key: str) -> Any:
    """`value` as the first of a union's members (a number or a word like `auto`) that takes it;
    the error names them all."""
    for member in members:
        try:
            return coerce(member, value, source, key)
        except KneegenError:
            continue
    described = " or ".join(describe_type(member) for member in members)
    raise KneegenError(f"{source}: {key} must be {described}; got {value!r}")


def describe_type(expected: Any) -> str:
    """`float`, or `auto` for a Literal: how an error names what a key takes."""
    if typing.get_origin(expected) is Literal:
        return " or ".join(map(str, typing.get_args(expected)))
    return expected.__name__


def list_example(item_type: Any) -> str:
    """A list of `item_type` as YAML writes it: [shift, intensity] for choices, [1, 2, 2] for numbers."""
    if typing.get_origin(item_type) is Literal:
        return f"[{', '.join(map(str, typing.get_args(item_type)[:2]))}]"
    return "[1, 2, 2]" if item_type is int else "[]"


def coerce_scalar(expected: type, value: Any, source: str, key: str) -> Any:
    """int/float/bool/str with the one lenience YAML needs: `1e-3` arrives as a string."""
    if expected is float and isinstance(value, str):
        try:
            return finite(float(value), source, key)
        except ValueError:
            pass
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is float and isinstance(value, float):
        return finite(value, source, key)
    if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    raise KneegenError(f"{source}: {key} must be {expected.__name__}; got {value!r}")
