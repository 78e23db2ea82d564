"""Shared tiny setup: a small phantom, its 32×32 cache, a tiny model config and one trained run.

Everything expensive is session-scoped so it happens once. Torch is kept to one thread: the
tests are small, and on a shared machine a second thread mostly adds contention.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import copy  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

torch.set_num_threads(1)

from kneegen.config import RunConfig, load_config  # noqa: E402
from kneegen.data.phantom import write_phantom  # noqa: E402
from kneegen.data.prepare import PrepareOptions, prepare_folder  # noqa: E402
from kneegen.data.splits import SplitFractions  # noqa: E402
from kneegen.training_run import run_training  # noqa: E402

IMAGE_SIZE = 32
PHANTOM_IMAGES = 60
PHANTOM_SLICES_PER_VOLUME = 10  # 6 patients

# A model that trains in about a second per epoch on 50 images of 32×32 on one CPU thread.
TINY_MODEL: dict[str, Any] = {
    "arch": "unet",
    "channels": 16,
    "channel_mults": [1, 2],
    "blocks_per_level": 1,
    "attention_levels": [1],
    "patch_size": 2,
}

TINY_RUN: dict[str, Any] = {
    "device": "cpu",
    "precision": "fp32",
    "model": TINY_MODEL,
    "diffusion": {"timesteps": 1000, "schedule": "cosine", "prediction": "v", "loss": "l2"},
    "train": {
        "epochs": 2,
        "batch_size": 16,
        "lr": 2e-3,
        "warmup_steps": 0,
        "ema_decay": 0.9,
        "seed": 0,
        "val_every": 1,
        "val_images": 16,
        "val_timesteps": 4,
    },
    "sample": {"sampler": "ddim", "steps": 4, "eta": 0.0, "batch_size": 8},
}


def tiny_run_dict(data: Path | str, **sections: dict[str, Any]) -> dict[str, Any]:
    """The tiny run config as a plain dict (YAML-ready), with `data` and section overrides."""
    raw = copy.deepcopy(TINY_RUN)
    raw["data"] = str(data)
    for section, values in sections.items():
        raw[section].update(values)
    return raw


def tiny_config(data: Path | str, tmp_dir: Path, **sections: dict[str, Any]) -> RunConfig:
    """The tiny config through the real loader (YAML file → validated RunConfig)."""
    path = tmp_dir / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_run_dict(data, **sections)))
    return load_config(path)


@pytest.fixture(scope="session")
def phantom_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 AKOA-named phantom slices (260×228), 10 per knee: 6 patients."""
    src = tmp_path_factory.mktemp("phantom") / "slices"
    write_phantom(src, PHANTOM_IMAGES, seed=0, slices_per_volume=PHANTOM_SLICES_PER_VOLUME)
    return src


def prepare_options(size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE), **changes: Any) -> PrepareOptions:
    """The tests' prepare settings: 6 phantom patients → 5 train, 1 val, no test; one process."""
    settings: dict[str, Any] = {"size": size, "fractions": SplitFractions(0.8, 0.2, 0.0), "seed": 0, "workers": 1}
    return PrepareOptions(**{**settings, **changes})


@pytest.fixture(scope="session")
def prepared(phantom_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The phantom prepared into a 32×32 cache (read-only for tests: prepare elsewhere to modify)."""
    out = tmp_path_factory.mktemp("prepared") / "cache"
    prepare_folder(phantom_src, out, prepare_options())
    return out


@pytest.fixture(scope="session")
def trained_run(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run dir with last.pt / best.pt of the tiny model after 2 epochs."""
    work = tmp_path_factory.mktemp("trained")
    run_dir = work / "run"
    run_training(tiny_config(prepared, work), run_dir, resume=False)
    return run_dir
