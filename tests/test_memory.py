"""Memory planning: the saved-tensor count, and micro-batches when a batch would not fit."""

from __future__ import annotations

import pytest
import torch

from kneegen.config import ModelConfig
from kneegen.engine.device import Compute
from kneegen.engine.memory import HEADROOM, MemoryPlan, fit_batch_in_memory, saved_bytes_per_image
from kneegen.engine.network import build_network
from kneegen.errors import KneegenError
from kneegen.metrics_log import read_metrics
from kneegen.training_run import run_training

from helpers import tiny_config

CPU = Compute(torch.device("cpu"), None)
TINY_UNET = dict(channels=16, channel_mults=[1, 2], blocks_per_level=1, attention_levels=[1], patch_size=1)
TINY = ModelConfig("unet", {"unet": TINY_UNET})


def test_saved_bytes_grow_with_the_image_and_leave_the_rng_and_weights_alone():
    torch.manual_seed(0)
    network = build_network(ModelConfig("unet", {"unet": {**TINY_UNET, "attention_levels": []}}), (16, 16)).train()
    before = [p.detach().clone() for p in network.parameters()]
    state = torch.random.get_rng_state()
    small = saved_bytes_per_image(network, (16, 16), CPU)
    large = saved_bytes_per_image(network, (32, 32), CPU)
    assert torch.equal(torch.random.get_rng_state(), state) and network.training
    assert all(torch.equal(a, b) for a, b in zip(before, network.parameters()))
    # Convolutions keep memory in proportion to the pixels (×4); the middle block's attention
    # keeps an (HW)² matrix, which makes it a little more.
    assert 3.9 < large / small < 4.5
    # At least the first conv's output in fp32 is kept: 16 channels × 16 × 16 pixels × 4 bytes.
    assert small > 16 * 16 * 16 * 4
    # Attention on a finer level too: more of the memory grows with (HW)².
    attending = build_network(TINY, (16, 16))
    assert (
        saved_bytes_per_image(attending, (32, 32), CPU) / saved_bytes_per_image(attending, (16, 16), CPU)
        > large / small
    )


def plan(per_image: int, available: int) -> MemoryPlan:
    return MemoryPlan(per_image=per_image, fixed=0, available=available)


def test_a_batch_that_fits_is_left_as_it_is(tmp_path):
    cfg = tiny_config("data", tmp_path, train={"batch_size": 8})
    assert fit_batch_in_memory(cfg, plan(100, 10_000)) == (cfg, "")


def test_a_batch_too_large_is_split_into_the_fewest_micro_batches_that_fit(tmp_path):
    cfg = tiny_config("data", tmp_path, train={"batch_size": 8})
    room = int(3 * HEADROOM * 100 / 0.85) + 1  # three images fit, four do not
    fitted, note = fit_batch_in_memory(cfg, plan(100, room))
    assert fitted.train.grad_accumulation == 3 and fitted.train.batch_size == 8  # micro-batches of 3, 3, 2
    assert "3 micro-batches" in note and "train.grad_accumulation 3" in note


def test_a_single_image_that_does_not_fit_is_refused(tmp_path):
    cfg = tiny_config("data", tmp_path, train={"batch_size": 8})
    with pytest.raises(KneegenError, match="one training image needs"):
        fit_batch_in_memory(cfg, plan(10_000, 1_000))


@pytest.mark.slow
def test_training_with_little_memory_makes_the_updates_of_the_full_batch(prepared, tmp_path, monkeypatch):
    """Planned micro-batches are grad_accumulation, which is tested to give the same updates: the
    losses equal those of the same run given that accumulation by hand."""
    by_hand = run_training(tiny_config(prepared, tmp_path, train={"grad_accumulation": 2}), tmp_path / "by-hand")
    saved = saved_bytes_per_image(by_hand.network, (32, 32), CPU)
    batch = tiny_config(prepared, tmp_path).train.batch_size
    little = int(((batch + 1) // 2) * HEADROOM * saved / 0.85) + 1  # half a batch fits, no more
    monkeypatch.setattr("kneegen.engine.memory.free_memory", lambda device, processes: little)
    monkeypatch.setattr("kneegen.engine.memory.BYTES_PER_PARAMETER", 0)
    run_training(tiny_config(prepared, tmp_path), tmp_path / "planned")
    losses = [
        [r["train_losses"] for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "epoch"]
        for run in (tmp_path / "by-hand", tmp_path / "planned")
    ]
    assert losses[0] == losses[1]
