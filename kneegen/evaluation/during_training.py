"""A light FID/KID every `train.fid_every` epochs, so a run can keep best.pt by sample quality.

The validation loss measures denoising at fixed t; it can keep falling while samples stop
improving. Every N epochs the EMA network draws `train.fid_samples` images with fixed seeds
(the same images each time, so the numbers are comparable along the run) and they are scored
against the **val** split: the test split is left untouched for the final `kneegen validate`.
The val features are computed once and cached in the data dir like validate's references.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kneegen.data.cache import PreparedData
from kneegen.data.conditions import CONDITIONS
from kneegen.engine.device import Compute, evaluating
from kneegen.engine.trained import TrainedModel
from kneegen.errors import KneegenError
from kneegen.evaluation import frechet, kid
from kneegen.evaluation.condition_checks import held_out_conditions_for
from kneegen.evaluation.features import (
    INSTALL_HINT,
    InceptionFeatures,
    extract_features,
    find_feature_weights,
    load_feature_extractor,
)
from kneegen.evaluation.reference import reference_features
from kneegen.sampling import choose_sampler, sample_batches

FEATURE_BATCH = 32
SPLIT = "val"


@dataclass
class SampleQuality:
    fid: float
    kid: float
    samples: int


class TrainingFid:
    """The Inception network and the val features, loaded once per run."""

    def __init__(
        self,
        cache: PreparedData,
        compute: Compute,
        n_samples: int,
        asked_by: str = "train.fid_every",
        samples_flag: str = "train.fid_samples",
    ) -> None:
        """`asked_by` and `samples_flag`: the key or command that wants the FID and the one that
        sets `n_samples`, which a refusal names."""
        weights = find_feature_weights(None)
        if weights is None:
            raise KneegenError(f"{asked_by} needs the FID Inception weights: {INSTALL_HINT}")
        if len(cache.split(SPLIT)) < kid.MIN_IMAGES or n_samples < kid.MIN_IMAGES:
            raise KneegenError(
                f"{asked_by}: FID/KID need at least {kid.MIN_IMAGES} val images and {samples_flag} "
                f"(have {len(cache.split(SPLIT))} and {n_samples})"
            )
        self.compute = compute
        self.seeds = list(range(n_samples))
        self.extractor: InceptionFeatures = load_feature_extractor(weights, compute.device)
        self.reference = reference_features(cache, SPLIT, self.extractor, FEATURE_BATCH, compute.device)
        self.conditions = cache.split_conditions(SPLIT, list(CONDITIONS))  # (V, 2), NaN where unknown

    def score(self, model: TrainedModel) -> SampleQuality:
        """FID and KID of the fixed-seed samples of `model.network` (the weights sampling would use); a
        conditional model is asked for the val slices' own conditions with its `sample.guidance`, as
        it will be sampled, so best.pt and `kneegen ema` choose by that."""
        choice = choose_sampler(model, None, None, None)
        asked = (
            held_out_conditions_for(model, self.conditions, len(self.seeds), None)
            if model.config.model.conditions
            else None
        )
        with evaluating(model.network):
            batches = sample_batches(
                model, self.compute, choice, self.seeds, model.config.sample.batch_size, conditions=asked
            )
            samples = np.concatenate([np.asarray(images) for _, images in batches])  # (N, H, W) uint8
        features = extract_features(self.extractor, samples, FEATURE_BATCH, self.compute.device)
        return SampleQuality(
            fid=frechet.frechet_distance(features, self.reference),
            kid=kid.kernel_inception_distance(features, self.reference).mean,
            samples=len(samples),
        )
