"""FID during training: scored on val every `fid_every` epochs, and best.pt chosen by it on request."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from kneegen.errors import KneegenError
from kneegen.training_run import run_training

from helpers import tiny_config


@pytest.fixture()
def own_cache(prepared, tmp_path):
    """A copy of the session cache: the FID reference features are written into the data dir."""
    return shutil.copytree(prepared, tmp_path / "cache")


@pytest.mark.slow
def test_fid_every_epoch_is_recorded_and_chooses_best_pt(own_cache, tmp_path):
    train = {"epochs": 2, "fid_every": 1, "fid_samples": 8, "best_by": "fid"}
    run_training(tiny_config(own_cache, tmp_path, train=train), tmp_path / "run", resume=False)
    epochs = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    fids = [record["fid"] for record in epochs]
    assert len(fids) == 2 and all(math.isfinite(f) and f > 0 for f in fids)
    assert all(math.isfinite(record["kid"]) for record in epochs)
    best = torch.load(tmp_path / "run/best.pt", weights_only=True)
    assert best["epoch"] == 1 + fids.index(min(fids))
    assert best["best_fid"] == min(fids)
    assert list(own_cache.glob("fid_reference_val_*.npz")), "the val features are cached in the data dir"


def test_fid_best_without_fid_every_is_refused(own_cache, tmp_path):
    with pytest.raises(KneegenError, match="train.best_by = fid needs train.fid_every"):
        run_training(tiny_config(own_cache, tmp_path, train={"best_by": "fid"}), tmp_path / "run", resume=False)
