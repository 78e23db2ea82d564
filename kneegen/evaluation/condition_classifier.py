"""Condition recovery: does a generated slice show the knee side and slice position it was asked for?

A small CNN, independent of the generator, learns side and position from the real training
split; `validate` then scores it on generated images against the conditions they were sampled
with, beside its own score on real held-out slices (the ceiling a perfect generator reaches).
Side is a logit (BCE), position a sigmoid in [0, 1] (L1, the loss of the MAE it is judged by);
a row whose side or position is unknown (NaN) teaches only the other one.

Training is a fixed number of AdamW steps on 64² copies of the slices, batches drawn from a
generator seeded by `seed`, with a random shift of a few pixels so the network cannot latch on
exact pixels. No flip: a mirrored LEFT knee is a RIGHT one. The classifier trained on a cache
is stored beside it as `condition_classifier_<key>.pt`, keyed like the FID reference features
(reference.py) on the cache's content and CLASSIFIER_VERSION.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kneegen.data.cache import PreparedData
from kneegen.data.conditions import condition_table
from kneegen.errors import KneegenError
from kneegen.evaluation.reference import reference_key

CLASSIFIER_VERSION = 1  # bump when the network, its input or its training changes: old files are retrained
CLASSIFIER_PREFIX = "condition_classifier"
CLASSIFIER_SIZE = 64  # every slice is resized to this square, so any cache size works
CHANNELS = (16, 32, 64, 96)  # one stride-2 conv per entry: 64² → 4²
GROUPS = 8
TRAIN_STEPS = 1500  # ~40 s on 2 cores; 600 left the phantom's position at MAE 0.18, 1,500 reach 0.08
BATCH_SIZE = 64
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 1e-4
CHUNK = 256  # slices converted or classified at a time, so a large cache is never converted at once
SHIFT_PX = 4  # the largest random shift, in pixels of the 64² input
SIDE_THRESHOLD = 0.5


class ConditionClassifier(nn.Module):
    """(B, 1, H, W) float slices in [0, 1], any H and W → (side logit (B,), position in [0, 1] (B,))."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in zip((1, *CHANNELS[:-1]), CHANNELS):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(GROUPS, c_out), nn.SiLU()]
        self.features = nn.Sequential(*layers)
        self.side = nn.Linear(CHANNELS[-1], 1)
        self.position = nn.Linear(CHANNELS[-1], 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.features(to_classifier_size(x) - 0.5).mean(dim=(2, 3))  # (B, C)
        return self.side(h).squeeze(1), torch.sigmoid(self.position(h)).squeeze(1)


def to_classifier_size(x: Tensor) -> Tensor:
    """(B, 1, H, W) → (B, 1, 64, 64); antialiased, so downsizing a large cache does not alias."""
    if x.shape[-2:] == (CLASSIFIER_SIZE, CLASSIFIER_SIZE):
        return x
    return F.interpolate(x, size=(CLASSIFIER_SIZE, CLASSIFIER_SIZE), mode="bilinear", antialias=True)


def train_condition_classifier(
    images: np.ndarray, conditions: np.ndarray, seed: int = 0, on_step: Callable[[int], None] | None = None
) -> ConditionClassifier:
    """A classifier trained for TRAIN_STEPS on (N, H, W) uint8 slices and their (N, 2) [side, position].

    The same images, conditions and seed give the same weights; on_step(1) follows each step.
    """
    side, position = torch.from_numpy(np.asarray(conditions, np.float32)).unbind(1)  # (N,) each, NaN unknown
    side_known, position_known = ~side.isnan(), ~position.isnan()
    if not (side_known.any() or position_known.any()):
        raise KneegenError(
            f"none of the {len(images)} training images has a known knee side or slice position, so the "
            "condition classifier has nothing to learn: prepare AKOA-named slices or NIfTI/DICOM volumes"
        )
    x = torch.cat([to_classifier_size(as_input(images[i : i + CHUNK])) for i in range(0, len(images), CHUNK)])
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the initial weights, without touching the caller's global RNG
        classifier = ConditionClassifier()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    steps = TRAIN_STEPS
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)  # linear decay to 0
    classifier.train()
    for _ in range(steps):
        # 1. A batch of shifted slices.
        rows = torch.randint(len(x), (BATCH_SIZE,), generator=generator)
        batch = random_shift(x[rows], generator)  # (B, 1, 64, 64)
        # 2. BCE on rows with a known side, L1 on rows with a known position.
        side_logit, position_pred = classifier(batch)
        side_loss = masked_mean(
            F.binary_cross_entropy_with_logits(side_logit, side[rows].nan_to_num(), reduction="none"),
            side_known[rows],
        )
        position_loss = masked_mean((position_pred - position[rows].nan_to_num()).abs(), position_known[rows])
        # 3. One AdamW step on their sum.
        optimizer.zero_grad(set_to_none=True)
        (side_loss + position_loss).backward()
        optimizer.step()
        schedule.step()
        if on_step is not None:
            on_step(1)
    return classifier.eval()


def random_shift(x: Tensor, generator: torch.Generator) -> Tensor:
    """Each image of (B, 1, H, W) moved by up to SHIFT_PX pixels each way, edges repeated."""
    b, _, h, w = x.shape
    padded = F.pad(x, (SHIFT_PX,) * 4, mode="replicate")
    dy, dx = torch.randint(2 * SHIFT_PX + 1, (2, b, 1), generator=generator)  # (B, 1) each
    rows = (dy + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (dx + torch.arange(w))[:, None, :]  # (B, 1, W)
    return padded[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` where `mask` holds; 0 where it holds nowhere (a batch without that label)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def as_input(images: np.ndarray) -> Tensor:
    """(N, H, W) uint8 → (N, 1, H, W) float32 in [0, 1], the classifier's input."""
    return torch.from_numpy(np.array(images)).float().div(255.0).unsqueeze(1)


def predict_conditions(
    classifier: ConditionClassifier, images: np.ndarray, batch_size: int = CHUNK
) -> tuple[np.ndarray, np.ndarray]:
    """(probability the knee is a RIGHT one (N,), slice position in [0, 1] (N,)) of (N, H, W) uint8."""
    side_probs, positions = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            side_logit, position = classifier(as_input(images[start : start + batch_size]))
            side_probs.append(torch.sigmoid(side_logit))
            positions.append(position)
    return torch.cat(side_probs).numpy(), torch.cat(positions).numpy()


def condition_scores(side_prob: np.ndarray, position: np.ndarray, wanted: np.ndarray) -> dict[str, float | int | None]:
    """Side accuracy and position MAE against (N, 2) wanted [side, position], each over its known rows.

    A score with no known row is None; the counts say how many rows each score rests on.
    """
    side_rows = ~np.isnan(wanted[:, 0])
    position_rows = ~np.isnan(wanted[:, 1])
    right = side_prob[side_rows] > SIDE_THRESHOLD
    return {
        "side_accuracy": float(np.mean(right == (wanted[side_rows, 0] == 1))) if side_rows.any() else None,
        "side_count": int(side_rows.sum()),
        "position_mae": float(np.mean(np.abs(position[position_rows] - wanted[position_rows, 1])))
        if position_rows.any()
        else None,
        "position_count": int(position_rows.sum()),
    }


def cached_condition_classifier(
    cache: PreparedData, on_step: Callable[[int], None] | None = None
) -> ConditionClassifier:
    """The classifier of a cache's training split: from its file beside the cache, else trained and stored.

    A file that cannot be loaded (cut short by a crash, written by another version of torch) is
    trained again and replaced; the files of older caches or versions are removed.
    """
    # reference.py's key of the cache content, with the classifier's version in place of weights
    key = reference_key(cache, "train", f"{CLASSIFIER_PREFIX}-v{CLASSIFIER_VERSION}")
    path = cache.root / f"{CLASSIFIER_PREFIX}_{key}.pt"
    stored = stored_classifier(path)
    if stored is not None:
        return stored
    start, stop = cache.manifest["split_ranges"]["train"]
    try:
        classifier = train_condition_classifier(
            cache.split_8bit("train"), condition_table(cache.manifest)[start:stop], on_step=on_step
        )
    except KneegenError as error:
        raise KneegenError(f"{cache.root}: {error}") from None
    for stale in cache.root.glob(f"{CLASSIFIER_PREFIX}_*"):
        stale.unlink()
    partial = path.with_suffix(".partial")
    torch.save({"state_dict": classifier.state_dict(), "version": CLASSIFIER_VERSION}, partial)
    os.replace(partial, path)  # atomic: a file with the final name is complete
    return classifier


def stored_classifier(path: Path) -> ConditionClassifier | None:
    """The classifier saved at `path`, or None when there is none or it cannot be read."""
    if not path.is_file():
        return None
    classifier = ConditionClassifier()
    try:
        classifier.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
    except Exception:  # weights_only unpickling of damaged bytes fails in many ways; so does a foreign dict
        return None
    return classifier.eval()
