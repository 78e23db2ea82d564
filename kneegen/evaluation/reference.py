"""The real images samples are judged against, and their Inception features, cached once.

The held-out split is the cache's "test" split when it has one, else "val" (the split the
validation loss, and so best.pt, were chosen on). Features of a split are computed once and
stored beside the cache as `fid_reference_<split>_<key>.npz` (the (N, 2048) float32 features;
mean and covariance follow from them). The key hashes what the features depend on: the cache
(images.npy size and mtime, the manifest's text), the split, the weights' content fingerprint and
the preprocessing version; a cache prepared again gets a new key and the stale file is removed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kneegen.data.cache import PreparedData, content_key, is_cache, open_cache
from kneegen.errors import KneegenError
from kneegen.evaluation.features import InceptionFeatures, extract_features

FEATURES_VERSION = 1  # bump when preprocessing changes, so old caches are not reused
REFERENCE_PREFIX = "fid_reference"


def held_out_split(manifest: dict[str, Any]) -> str:
    """ "test" when the manifest has a non-empty test split, else "val"."""
    start, stop = manifest.get("split_ranges", {}).get("test", (0, 0))
    return "test" if stop > start else "val"


def held_out_images(cache: PreparedData) -> tuple[str, np.ndarray]:
    """(split name, images) of the held-out split; refuses a cache without one."""
    split = held_out_split(cache.manifest)
    images = cache.split_8bit(split)
    if len(images) == 0:
        raise KneegenError(
            f"{cache.root} has no held-out images (its val and test splits are empty): "
            f"prepare it again with --val-fraction > 0"
        )
    return split, images


def patients_trained_on(training_data: Path, cache: PreparedData, split: str) -> list[str]:
    """The patients of `cache`'s held-out `split` that the training split of `training_data` (the
    cache a model trained on) holds too: none when they are the same cache, whose splits are
    disjoint by patient, or when that cache is gone. Another cache of the same slices, split
    otherwise, may hold a model's own training patients among its held-out ones."""
    if not is_cache(training_data) or training_data.resolve() == cache.root.resolve():
        return []
    trained = {
        patient for patient, part in open_cache(training_data).manifest.get("patients", {}).items() if part == "train"
    }
    return sorted(
        patient for patient, part in cache.manifest.get("patients", {}).items() if part == split and patient in trained
    )


def reference_features(
    cache: PreparedData,
    split: str,
    extractor: InceptionFeatures,
    batch_size: int,
    device: torch.device,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """(N, 2048) features of a split's images, from the cache file or computed and stored."""
    path = cache.root / f"{REFERENCE_PREFIX}_{split}_{reference_key(cache, split, extractor.identity)}.npz"
    if path.is_file():
        with np.load(path) as stored:
            return stored["features"]
    features = extract_features(extractor, cache.split_8bit(split), batch_size, device, on_batch)
    for stale in cache.root.glob(f"{REFERENCE_PREFIX}_{split}_*.npz"):
        stale.unlink()
    partial = path.with_suffix(".partial.npz")
    np.savez(partial, features=features)
    os.replace(partial, path)  # atomic: a file with the final name is complete
    return features


def reference_key(cache: PreparedData, split: str, weights_identity: str) -> str:
    """12 hex digits naming the cache content, the split and the weights."""
    digest = hashlib.sha1()
    for part in (FEATURES_VERSION, split, content_key(cache), weights_identity):
        digest.update(f"{part}\n".encode())
    return digest.hexdigest()[:12]
