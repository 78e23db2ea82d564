"""`kneegen validate` as a function: score checkpoints on held-out slices and write their reports.

Per checkpoint: the deterministic validation loss (engine/validation.py) on the val split, N
images drawn with seeds S…S+N−1, and, against the held-out split (reference.py):
1. fidelity — FID and KID of Inception features (frechet.py, kid.py),
2. diversity — mean pairwise MS-SSIM of the samples and of the held-out slices (diversity.py),
3. memorisation — nearest training slices in pixels and features, copy fraction (memorisation.py).
Every checkpoint is scored on the same data with the same seeds, so `--compare` is fair. A
metric whose extra or weights are missing is skipped with a one-line note; the loss is always
there.

Sample counts: FID and KID need at least MIN_SAMPLES images. Below FEATURE_DIM (2048) images on
either side the covariance is singular and FID is biased upward, so the notes say to compare
FIDs only at equal counts; KID has no such bias and is the number to trust at CPU sizes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress, TaskID

from kneegen.data.cache import PreparedData, open_cache, open_trained_on
from kneegen.data.conditions import CONDITIONS
from kneegen.data.latent_cache import encode_images
from kneegen.engine.device import Compute
from kneegen.engine.trained import TrainedModel, load_trained_model
from kneegen.engine.validation import validation_loss
from kneegen.errors import KneegenError
from kneegen.evaluation import frechet, kid
from kneegen.evaluation.condition_checks import ConditionJudge, condition_report, held_out_conditions_for
from kneegen.evaluation.condition_classifier import TRAIN_STEPS as CLASSIFIER_STEPS
from kneegen.evaluation.diversity import mean_pairwise_ms_ssim, ms_ssim_available, ms_ssim_setting
from kneegen.evaluation.features import (
    FEATURE_DIM,
    INSTALL_HINT,
    InceptionFeatures,
    extract_features,
    find_feature_weights,
    load_feature_extractor,
)
from kneegen.evaluation.memorisation import (
    SpaceReport,
    compare_with_training,
    copy_chance,
    copy_fraction,
    pixel_vectors,
)
from kneegen.evaluation.reference import held_out_images, patients_trained_on, reference_features
from kneegen.evaluation.report import write_report
from kneegen.progress import progress_bar
from kneegen.sampling import SamplerChoice, choose_sampler, sample_batches

GUIDANCE_UNUSED = "--guidance was not used: no checkpoint here is conditional (model.conditions)"
FEATURE_COPIES_OFF = (
    "copies were looked for in pixel space only (--no-feature-copies): leave the flag out to look in "
    "Inception space too, which computes the training slices' features once per data dir"
)
MIN_SAMPLES = max(frechet.MIN_IMAGES, kid.MIN_IMAGES)
FEATURE_BATCH = 32  # images per Inception call


@dataclass(frozen=True)
class ValidateRequest:
    checkpoints: list[Path]  # the first one's data is the default --data
    data: Path | None
    samples: int
    sampler: str | None
    steps: int | None
    seed: int
    feature_weights: Path | None
    guidance: float | None = None  # of conditional checkpoints; None: each one's sample.guidance
    autoguidance: float | None = None  # of checkpoints with a guide; None: each one's sample.autoguidance
    autoguidance_sigma_max: float | None = None  # ... and its interval; None: each one's own
    feature_copies: bool = True  # look for copies in Inception space too (the training split's features)

    def sampler_of(self, model: TrainedModel) -> SamplerChoice:
        """The sampler `model` is scored with: the request's, else the run's own."""
        return choose_sampler(
            model,
            self.sampler,
            self.steps,
            None,
            autoguidance=self.autoguidance,
            autoguidance_sigma_max=self.autoguidance_sigma_max,
        )


@dataclass
class Reference:
    """The real images samples are judged against, with Inception features when the weights exist."""

    root: Path
    split: str  # the held-out split: test, else val
    held_out: np.ndarray  # (H, h, w) uint8
    held_out_conditions: np.ndarray  # (H, 2) [side, position] (kneegen/data/conditions.py), NaN where unknown
    train: np.ndarray  # (T, h, w) uint8
    extractor: InceptionFeatures | None
    held_out_features: np.ndarray | None  # (H, 2048)
    train_features: np.ndarray | None  # (T, 2048)
    held_out_ms_ssim: float | None


@dataclass
class Evaluation:
    reports: list[dict[str, Any]]
    notes: list[str]  # one line each: what was skipped, what to read with care


def evaluate_checkpoints(request: ValidateRequest, compute: Compute) -> Evaluation:
    """Score every checkpoint of `request` and write report.json/report.png beside each."""
    if request.samples < MIN_SAMPLES:
        raise KneegenError(
            f"--samples {request.samples}: FID, KID and MS-SSIM need at least {MIN_SAMPLES} images "
            f"(a stable FID needs {FEATURE_DIM})"
        )
    models = [load_trained_model(path, compute) for path in request.checkpoints]
    for model in models:  # a bad --sampler or --steps is refused before minutes of feature extraction
        request.sampler_of(model).timesteps(model.schedule)
    cache = (
        open_cache(request.data)
        if request.data
        else open_trained_on(models[0].config.data, request.checkpoints[0], "--data")
    )
    for model in models:
        check_image_size(model, cache)
    split, held_out = held_out_images(cache)
    if len(cache.split("val")) == 0:
        raise KneegenError(f"{cache.root} has no validation split: prepare it again with --val-fraction > 0")
    weights = find_feature_weights(request.feature_weights)
    with progress_bar() as progress:
        extractor = load_feature_extractor(weights, compute.device) if weights is not None else None
        reference = load_reference(cache, split, held_out, extractor, compute, progress, request.feature_copies)
        judge, skipped = condition_judge(models, cache, reference, progress)
        reports = [evaluate_model(model, cache, reference, request, compute, progress, judge) for model in models]
    unused = [] if request.guidance is None or judge is not None or skipped else [GUIDANCE_UNUSED]
    unchecked = [] if request.feature_copies or extractor is None else [FEATURE_COPIES_OFF]
    seen = [seen_patients_note(model, cache, split) for model in models]
    notes = evaluation_notes(reference, request.samples) + skipped + unused + unchecked
    return Evaluation(reports, notes + [note for note in seen if note])


def seen_patients_note(model: TrainedModel, cache: PreparedData, split: str) -> str:
    """A line when the held-out split holds patients the model trained on (validated on another
    cache of the same slices), whose scores then do not measure unseen patients; else ""."""
    trained_on = Path(model.config.data)
    seen = patients_trained_on(trained_on, cache, split)
    if not seen:
        return ""
    held_out = sum(1 for part in cache.manifest.get("patients", {}).values() if part == split)
    return (
        f"{model.source}: {len(seen)} of the {held_out} held-out ({split}) patients of {cache.root} are in the "
        f"training split of {trained_on}, which it trained on: its scores are not on unseen patients; "
        f"validate with --data {trained_on}"
    )


def condition_judge(
    models: list[TrainedModel], cache: PreparedData, reference: Reference, progress: Progress
) -> tuple[ConditionJudge | None, list[str]]:
    """The condition classifier when a checkpoint is conditional (and a note when it cannot be had)."""
    if not any(model.config.model.conditions for model in models):
        return None, []
    advance = counter(progress, "condition classifier", CLASSIFIER_STEPS)
    try:
        return ConditionJudge.of(cache, reference.held_out, reference.held_out_conditions, advance), []
    except KneegenError as error:
        return None, [f"skipped the condition checks: {error}"]


def check_image_size(model: TrainedModel, cache: PreparedData) -> None:
    if cache.image_shape != model.image_shape:
        raise KneegenError(
            f"{model.source} was trained on {model.image_shape[0]}x{model.image_shape[1]} images but "
            f"{cache.root} holds "
            f"{cache.image_shape[0]}x{cache.image_shape[1]}: pass --data with a cache of the trained size"
        )


def load_reference(
    cache: PreparedData,
    split: str,
    held_out: np.ndarray,
    extractor: InceptionFeatures | None,
    compute: Compute,
    progress: Progress | None = None,
    train_features: bool = True,
) -> Reference:
    """Held-out and training images, their features (cached in the data dir) and the held-out MS-SSIM.

    The training split's features serve only the copy check in Inception space; without
    `train_features` they are not computed — on a CPU they cost minutes per thousand slices."""
    train = cache.split_8bit("train")
    features: dict[str, np.ndarray | None] = {split: None, "train": None}
    if extractor is not None:
        wanted = ((split, held_out), ("train", train)) if train_features else ((split, held_out),)
        for name, images in wanted:
            advance = counter(progress, f"features: {name}", len(images))
            features[name] = reference_features(cache, name, extractor, FEATURE_BATCH, compute.device, advance)
    diversity = mean_pairwise_ms_ssim(held_out) if ms_ssim_available() and len(held_out) >= 2 else None
    conditions = cache.split_conditions(split, list(CONDITIONS))
    return Reference(
        cache.root, split, held_out, conditions, train, extractor, features[split], features["train"], diversity
    )


def evaluate_model(
    model: TrainedModel,
    cache: PreparedData,
    reference: Reference,
    request: ValidateRequest,
    compute: Compute,
    progress: Progress,
    judge: ConditionJudge | None = None,
) -> dict[str, Any]:
    """Loss, samples, scores and report files of one checkpoint; a conditional one is asked for
    the held-out slices' conditions and checked by `judge` (condition_checks.py)."""
    # 1. The deterministic validation loss (a conditional model given each image's conditions).
    val_images = cache.split("val")
    conditions = model.config.model.conditions
    loss = validation_loss(
        model.network,
        encode_images(val_images, model.latent, compute) if model.latent else val_images,
        model.schedule,
        model.config.diffusion,
        compute,
        model.config.train.val_timesteps,
        model.config.train.batch_size,
        counter(progress, f"loss: {model.source.name}", len(val_images)),
        conditions=cache.split_conditions("val", conditions),
    )

    # 2. Samples, one seed per image.
    choice = request.sampler_of(model)
    seeds = list(range(request.seed, request.seed + request.samples))
    asked = (
        held_out_conditions_for(model, reference.held_out_conditions, len(seeds), request.guidance)
        if conditions
        else None
    )
    advance = counter(progress, f"sampling: {choice.describe()}", len(seeds))
    batches = []
    for _, images in sample_batches(model, compute, choice, seeds, model.config.sample.batch_size, conditions=asked):
        batches.append(images)
        advance(len(images))
    samples = np.concatenate(batches)  # (N, H, W) uint8

    # 3. Scores against the held-out split.
    scores = score_samples(samples, reference, compute, progress)

    # 4. The report beside the checkpoint.
    report: dict[str, Any] = {
        "checkpoint": str(model.source),
        "epoch": model.epoch,
        "data": str(cache.root),
        "val_images": len(val_images),
        "val_loss": loss.loss,
        "loss_by_t": dict(zip(loss.bucket_timesteps, loss.bucket_losses)),
        "sampler": choice.describe(),
        "samples": len(seeds),
        "seeds": [seeds[0], seeds[-1]],
        "held_out_split": reference.split,
        "held_out_images": len(reference.held_out),
        "held_out_patients_trained_on": len(patients_trained_on(Path(model.config.data), cache, reference.split)),
        **scores.summary(reference),
    }
    if asked is not None:
        report["conditions"] = (
            condition_report(judge, samples, asked, scores.sample_features, reference.held_out_features)
            if judge is not None
            else {"guidance": asked.guidance, "asked": "the held-out slices' own conditions, cycling"}
        )
    return write_report(report_dir(model.source), report, samples, reference.train, scores.pixels, scores.features)


def report_dir(checkpoint: Path) -> Path:
    """validation_<stem>/ beside the checkpoint; -2, -3, … when earlier reports are there, which
    stay as they were (they may have used other samplers, seeds or data)."""
    first = checkpoint.parent / f"validation_{checkpoint.stem}"
    candidate, n = first, 1
    while candidate.exists():
        n += 1
        candidate = first.with_name(f"{first.name}-{n}")
    return candidate


@dataclass
class Scores:
    fid: float | None
    kid: kid.KernelDistance | None
    ms_ssim: float | None  # mean pairwise MS-SSIM of the samples
    pixels: SpaceReport  # memorisation in pixel space
    features: SpaceReport | None  # and in Inception feature space
    sample_features: np.ndarray | None  # (N, 2048) Inception features of the samples

    def summary(self, reference: Reference) -> dict[str, Any]:
        spaces = [space for space in (self.pixels, self.features) if space is not None]
        return {
            "fid": self.fid,
            "kid_mean": self.kid.mean if self.kid else None,
            "kid_std": self.kid.std if self.kid else None,
            "kid_subset_size": self.kid.subset_size if self.kid else None,
            "ms_ssim_samples": self.ms_ssim,
            "ms_ssim_held_out": reference.held_out_ms_ssim,
            "ms_ssim_setting": ms_ssim_setting(*reference.held_out.shape[1:]).describe() if self.ms_ssim else None,
            "copy_fraction": copy_fraction(*spaces),
            "copy_chance": copy_chance(*spaces),
            "memorisation": {
                "pixels": self.pixels.summary(),
                "features": self.features.summary() if self.features else None,
            },
        }


def score_samples(
    samples: np.ndarray, reference: Reference, compute: Compute, progress: Progress | None = None
) -> Scores:
    """FID, KID, MS-SSIM and memorisation of (N, H, W) uint8 samples; None where unavailable."""
    fid = kernel = feature_space = features = None
    if reference.extractor is not None and reference.held_out_features is not None:
        advance = counter(progress, "features: samples", len(samples))
        features = extract_features(reference.extractor, samples, FEATURE_BATCH, compute.device, advance)
        if len(reference.held_out_features) >= MIN_SAMPLES:
            fid = frechet.frechet_distance(features, reference.held_out_features)
            kernel = kid.kernel_inception_distance(features, reference.held_out_features)
        if reference.train_features is not None and len(reference.train_features):
            feature_space = compare_with_training(features, reference.held_out_features, reference.train_features)
    diversity = mean_pairwise_ms_ssim(samples) if reference.held_out_ms_ssim is not None else None
    pixels = compare_with_training(samples, reference.held_out, reference.train, pixel_vectors)
    return Scores(fid, kernel, diversity, pixels, feature_space, features)


def counter(progress: Progress | None, description: str, total: int) -> Callable[[int], None]:
    """advance(n) of a progress task that appears at its first advance (a cached phase shows none)."""
    tasks: list[TaskID] = []

    def advance(n: int) -> None:
        if progress is None:
            return
        if not tasks:
            tasks.append(progress.add_task(description, total=total, status=""))
        progress.advance(tasks[0], n)

    return advance


def evaluation_notes(reference: Reference, samples: int) -> list[str]:
    """One line per thing the reader should know: skipped metrics, small-sample FID."""
    skipped = []
    if reference.extractor is None:
        skipped.append("FID, KID and feature-space memorisation (no Inception weights)")
    if reference.held_out_ms_ssim is None:
        skipped.append("MS-SSIM (torchmetrics not installed)")
    notes = []
    if skipped:
        notes.append(f"skipped {' and '.join(skipped)}: {INSTALL_HINT} (or give --feature-weights PATH)")
    held_out = len(reference.held_out)
    if reference.extractor is not None and held_out < MIN_SAMPLES:
        notes.append(f"skipped FID and KID: {reference.root} has {held_out} held-out images, they need {MIN_SAMPLES}")
    elif reference.extractor is not None and min(samples, held_out) < FEATURE_DIM:
        notes.append(
            f"FID from {samples} samples vs {held_out} held-out images is biased upward (a stable FID needs "
            f"{FEATURE_DIM} of each, the feature dimension): compare FIDs only at equal counts; KID is unbiased"
        )
    return notes
