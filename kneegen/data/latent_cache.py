"""The latent cache: a prepared cache's train and val slices encoded once by an autoencoder.

Latent diffusion would otherwise run the encoder over every image of every epoch. The latents sit
beside the images in `<data>/latents-<digest>/`, memory-mapped like images.npy and in the same
split order, with the scale that makes the train split's latents unit-variance. The folder is
named by the autoencoder's content hash, so another autoencoder gets (and makes) its own; and it
records the content key of the images it encoded, so data prepared again (`prepare --overwrite`)
is encoded again rather than paired with old latents. It is written into a hidden folder first
and moved into place whole; nothing else in the data dir is touched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kneegen.data.cache import PreparedData, content_key
from kneegen.data.disk import check_room_for
from kneegen.engine.device import Compute
from kneegen.engine.latent import LatentSpace
from kneegen.engine.pixels import to_model_range
from kneegen.errors import KneegenError
from kneegen.progress import progress_bar

LATENTS_FILE = "latents.npy"
LATENTS_INFO = "latents.json"
ENCODE_BATCH = 32
SPLITS = ("train", "val")  # what training reads; the test split stays for `validate --split test`
CPU = torch.device("cpu")


def latent_folder(data: PreparedData, space: LatentSpace) -> Path:
    return data.root / f"latents-{space.digest}"


def open_latents(data: PreparedData, space: LatentSpace, compute: Compute) -> dict[str, np.ndarray]:
    """{split: (N, C, h, w) float16 scaled latents} for the train and val splits, encoding them
    first when this autoencoder has no cache of these images here yet; sets `space.scale`."""
    folder = latent_folder(data, space)
    info = read_info(folder)
    if info is None or info.get("data") != content_key(data):
        write_latents(data, space, compute, folder)
        info = read_info(folder)
    try:
        latents = np.load(folder / LATENTS_FILE, mmap_mode="r")
        space.scale = float(info["scale"])  # type: ignore[index]
        return {name: latents[start:stop] for name, (start, stop) in info["split_ranges"].items()}  # type: ignore[index]
    except (OSError, ValueError, TypeError, KeyError):
        raise KneegenError(f"{folder} is damaged: delete that folder, and the latents will be encoded again") from None


def read_info(folder: Path) -> dict[str, Any] | None:
    """The cache's description, or None when there is no complete cache (or it cannot be read)."""
    try:
        info = json.loads((folder / LATENTS_INFO).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def write_latents(data: PreparedData, space: LatentSpace, compute: Compute, folder: Path) -> None:
    """Encode the train and val slices (posterior means), scale them to unit variance over the
    train split, and store them as float16 with their scale, split ranges and the images' key."""
    ranges = {name: data.manifest["split_ranges"].get(name, (0, 0)) for name in SPLITS}
    images = data.images[: max(stop for _, stop in ranges.values())]  # train, then val: the cache's order
    shape = (len(images), *space.shape_of(data.image_shape))
    check_room_for(
        folder, 6 * int(np.prod(shape)), "--data", "the latent cache", "a smaller --size at prepare"
    )  # float32 while encoding, then float16
    unscaled = dataclasses.replace(space, scale=1.0)
    train_start, train_stop = ranges["train"]
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=data.root))
    try:
        means = np.lib.format.open_memmap(staging / "means.npy", mode="w+", dtype=np.float32, shape=shape)
        with progress_bar() as progress:
            task = progress.add_task("encoding latents", total=len(images), status=f"autoencoder {space.digest}")
            encode_into(means, images, unscaled, compute, lambda n: progress.advance(task, n))
        scale = 1.0 / train_std(means[train_start:train_stop])
        scaled = np.lib.format.open_memmap(staging / LATENTS_FILE, mode="w+", dtype=np.float16, shape=shape)
        for start in range(0, len(means), ENCODE_BATCH):
            scaled[start : start + ENCODE_BATCH] = means[start : start + ENCODE_BATCH] * scale
        scaled.flush()
        del means, scaled
        (staging / "means.npy").unlink()
        info = {"autoencoder": str(space.path), "digest": space.digest, "data": content_key(data), "scale": scale}
        (staging / LATENTS_INFO).write_text(json.dumps({**info, "split_ranges": ranges}, indent=1))
        shutil.rmtree(folder, ignore_errors=True)  # an incomplete or outdated cache of this autoencoder
        os.replace(staging, folder)
    except OSError as error:
        raise KneegenError(
            f"could not write the latent cache {folder} ({error.strerror or error}): free disk space or make "
            f"{data.root} writable, then start again"
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def train_std(latents: np.ndarray) -> float:
    """The standard deviation of every value of (N, C, h, w) latents, summed batch by batch in
    float64 so that no full-size temporary is made."""
    total = squares = 0.0
    for start in range(0, len(latents), ENCODE_BATCH):
        batch = np.asarray(latents[start : start + ENCODE_BATCH], dtype=np.float64)
        total, squares = total + batch.sum(), squares + np.square(batch).sum()
    count = latents.size
    return float(np.sqrt(max(squares / count - (total / count) ** 2, 1e-12)))


def encode_into(
    out: np.ndarray, images: np.ndarray, space: LatentSpace, compute: Compute, on_batch: Callable[[int], None]
) -> np.ndarray:
    """Encode `images` ((N, H, W) pixels) batch by batch into `out` ((N, C, h, w)), scaled by
    `space.scale`; returns `out`."""
    for start in range(0, len(images), ENCODE_BATCH):
        batch = to_model_range(images[start : start + ENCODE_BATCH], CPU)
        out[start : start + len(batch)] = space.encode(batch, compute).cpu().numpy()
        on_batch(len(batch))
    return out


def encode_images(images: np.ndarray, space: LatentSpace, compute: Compute) -> np.ndarray:
    """(N, C, h, w) float32 scaled latents of a few images (a validation split), in memory."""
    out = np.empty((len(images), *space.shape_of(images.shape[1:])), dtype=np.float32)
    return encode_into(out, images, space, compute, lambda n: None)
