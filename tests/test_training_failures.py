"""Failures a long run meets: a full disk while saving, and running out of GPU memory; and the
peak memory it reports."""

from __future__ import annotations

import errno
import json
import subprocess
import sys

import pytest
import torch

from kneegen.distill_request import distillation_config
from kneegen.engine import checkpoint
from kneegen.engine.checkpoint import load_checkpoint, save_checkpoint
from kneegen.errors import KneegenError
from kneegen.interruption import Interrupted
from kneegen.metrics_log import peak_resident_mib
from kneegen.training_run import run_training

from helpers import tiny_config


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1}, path, then="retry")
    before = path.read_bytes()

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", no_space)
    with pytest.raises(KneegenError) as info:
        save_checkpoint({"step": 2}, path, then="kneegen train --resume --run-dir R")
    message = str(info.value)
    assert "No space left on device" in message and "previous last.pt is intact" in message
    assert message.endswith("then kneegen train --resume --run-dir R")
    assert path.read_bytes() == before and load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left behind
    with pytest.raises(KneegenError, match="best.pt .*: no best.pt was written; free disk space"):
        save_checkpoint({"step": 2}, tmp_path / "best.pt", then="retry")  # there was none before


def test_a_distillation_that_cannot_save_names_its_own_run_and_the_distill_command(trained_run, tmp_path, monkeypatch):
    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", no_space)
    cfg, _ = distillation_config(trained_run / "best.pt", {"train.epochs": 1, "train.batch_size": 4})
    run_dir = tmp_path / "elsewhere" / "student"
    with pytest.raises(KneegenError, match=f"then kneegen distill --resume --run-dir {run_dir}$"):
        run_training(cfg, run_dir)


def test_out_of_memory_names_the_batch_size_and_accumulation(prepared, tmp_path, monkeypatch):
    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        yield  # a generator, like the real epoch_steps

    monkeypatch.setattr("kneegen.training_run.epoch_steps", exhausted)
    with pytest.raises(
        KneegenError, match="memory at step 0 with train.batch_size 16: lower it, or raise train.grad_accumulation"
    ):
        run_training(tiny_config(prepared, tmp_path), tmp_path / "run", resume=False)


@pytest.mark.slow
def test_epoch_record_reports_peak_memory(prepared, tmp_path):
    run_training(tiny_config(prepared, tmp_path, train={"epochs": 1}), tmp_path / "run", resume=False)
    record = json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[-1])
    assert 10 < record["peak_memory_mb"] < 24 * 1024  # a Python process with torch: tens of MiB at least


@pytest.mark.slow  # it holds 1 GiB for a moment
def test_a_process_spawned_by_a_larger_one_reports_its_own_peak_memory_not_the_parents():
    """ru_maxrss survives exec with the parent's peak; the probe of benchmarks/latent.py read 5.6
    GiB that were the benchmark's own. A child spawned while this process holds 1 GiB more reports less."""
    held = bytearray(2**30)
    held[:: 2**12] = b"\x01" * (len(held) // 2**12)  # every page touched, so resident
    probe = "from kneegen.metrics_log import peak_resident_mib; print(peak_resident_mib())"
    child = float(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)
    assert 10 < child < peak_resident_mib() - 900
    del held


def test_a_second_ctrl_c_stops_at_once_and_names_the_runs_own_resume_command(prepared, tmp_path, monkeypatch):
    def stopped_at_once(state, run):
        raise KeyboardInterrupt  # what StopRequest raises on a second signal

    monkeypatch.setattr("kneegen.training_run.train_epochs", stopped_at_once)
    run_dir = tmp_path / "somewhere" / "run"
    expected = f"stopped at once .* continue with: kneegen train --resume --run-dir {run_dir}$"
    with pytest.raises(Interrupted, match=expected):
        run_training(tiny_config(prepared, tmp_path), run_dir)
