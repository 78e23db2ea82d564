"""`validate` on a conditional checkpoint: are the samples the knees they were asked for?

The samples are asked for the held-out slices' own conditions (image k for held-out slice k,
cycling), so the usual FID compares like with like. On top of it: an independent classifier,
trained on the real training split (condition_classifier.py), reads side and position back from
the samples; its score on the real held-out slices is printed beside it as the ceiling; and FID
is computed per side, samples asked for a side against the held-out slices of that side.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from kneegen.asked_conditions import AskedConditions
from kneegen.data.cache import PreparedData
from kneegen.data.conditions import CONDITIONS, SIDE_CODES, select_conditions
from kneegen.engine.trained import TrainedModel
from kneegen.evaluation import frechet
from kneegen.evaluation.condition_classifier import (
    ConditionClassifier,
    cached_condition_classifier,
    condition_scores,
    predict_conditions,
)


@dataclass
class ConditionJudge:
    """The classifier of the cache's training split and its score on the real held-out slices."""

    classifier: ConditionClassifier
    held_out_conditions: np.ndarray  # (H, 2) [side, position], NaN where unknown
    real: dict[str, Any]  # condition_scores of the real held-out slices

    @classmethod
    def of(
        cls,
        cache: PreparedData,
        held_out: np.ndarray,
        held_out_conditions: np.ndarray,
        on_step: Callable[[int], None] | None = None,
    ) -> ConditionJudge:
        """Refuses (KneegenError) a cache none of whose training slices has a known side or position."""
        classifier = cached_condition_classifier(cache, on_step)
        real = condition_scores(*predict_conditions(classifier, held_out), held_out_conditions)
        return cls(classifier, held_out_conditions, real)


def held_out_conditions_for(
    model: TrainedModel, held_out_conditions: np.ndarray, count: int, guidance: float | None
) -> AskedConditions:
    """`count` rows of the held-out slices' conditions, cycling, in the model's column order."""
    names = model.config.model.conditions
    rows = held_out_conditions[np.arange(count) % len(held_out_conditions)]  # (N, 2)
    return AskedConditions(
        names, select_conditions(rows, names), model.config.sample.guidance if guidance is None else guidance
    )


def condition_report(
    judge: ConditionJudge,
    samples: np.ndarray,
    asked: AskedConditions,
    sample_features: np.ndarray | None,
    held_out_features: np.ndarray | None,
) -> dict[str, Any]:
    """Side accuracy and position error on the samples (beside the real held-out ones) and FID per side."""
    wanted = np.full((len(samples), len(CONDITIONS)), np.nan, dtype=np.float32)
    for column, name in enumerate(asked.names):
        wanted[:, CONDITIONS.index(name)] = asked.values[:, column]
    generated = condition_scores(*predict_conditions(judge.classifier, samples), wanted)
    report: dict[str, Any] = {
        "guidance": asked.guidance,
        "asked": "the held-out slices' own conditions, cycling",
        "side_accuracy": generated["side_accuracy"] if "side" in asked.names else None,
        "position_mae": generated["position_mae"] if "position" in asked.names else None,
        "real_side_accuracy": judge.real["side_accuracy"],
        "real_position_mae": judge.real["position_mae"],
    }
    for side, code in SIDE_CODES.items():
        report[f"fid_{side}"] = side_fid(code, wanted, sample_features, judge.held_out_conditions, held_out_features)
    return report


def side_fid(
    code: float,
    wanted: np.ndarray,
    sample_features: np.ndarray | None,
    held_out_conditions: np.ndarray,
    held_out_features: np.ndarray | None,
) -> float | None:
    """FID of the samples asked for one side against the held-out slices of that side; None
    without features or with fewer than FID's minimum of images on either side."""
    if sample_features is None or held_out_features is None:
        return None
    ours, theirs = sample_features[wanted[:, 0] == code], held_out_features[held_out_conditions[:, 0] == code]
    if min(len(ours), len(theirs)) < frechet.MIN_IMAGES:
        return None
    return frechet.frechet_distance(ours, theirs)
