"""One training run's shared state: what every job of a run (stepping, validating, logging,
checkpointing, previewing) reads, built once by `training_run.run_training`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kneegen.config import RunConfig
from kneegen.engine.device import Compute
from kneegen.engine.distributed import Distributed
from kneegen.engine.latent import LatentSpace
from kneegen.engine.schedule import Schedule
from kneegen.engine.trained import TrainedModel
from kneegen.engine.training import TrainState
from kneegen.evaluation.during_training import TrainingFid


@dataclass
class Run:
    cfg: RunConfig  # resolved: network defaults filled in, batch fitted to memory
    run_dir: Path
    image_shape: tuple[int, int]  # (H, W) of the cache's images
    train_images: np.ndarray  # (N, H, W) of the cache's train split; a latent model's: (N, C, h, w) latents
    val_images: np.ndarray  # (V, H, W), the first `train.val_images` of the val split; or their latents
    train_conditions: np.ndarray | None  # (N, K) with model.conditions (NaN where unknown), else None
    val_conditions: np.ndarray | None  # (V, K) likewise
    schedule: Schedule
    compute: Compute
    dist: Distributed
    fid: TrainingFid | None  # FID during training (`train.fid_every`), on rank 0 only
    latent: LatentSpace | None = None  # a latent model's autoencoder (model.autoencoder)
    data_key: str = ""  # the cache's content key (data/cache.py): a resumed run names data prepared again

    def trained_model(self, state: TrainState, source: Path) -> TrainedModel:
        """The weights being trained as sampling sees them (the EMA; a student with its steps; the guide once kept)."""
        steps = state.distillation.student_steps if state.distillation is not None else None
        return TrainedModel(
            state.eval_network,
            self.schedule,
            self.cfg,
            self.image_shape,
            state.epoch,
            source,
            self.latent,
            steps,
            state.guide,
            state.distillation.method if state.distillation is not None else None,
        )
