"""Reliability of long runs: a training process killed with SIGKILL mid-epoch, or a run whose
newest checkpoints were damaged, resumes to exactly the losses of an uninterrupted run; and two
data-parallel processes (torchrun, gloo) make exactly the updates of one process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from kneegen.cli import build_app
from kneegen.config import RunConfig
from kneegen.engine.checkpoint import load_checkpoint
from kneegen.errors import KneegenError
from kneegen.metrics_log import read_metrics
from kneegen.run_checkpoints import resume_point
from kneegen.runs import step_checkpoint, step_checkpoints, training_into
from kneegen.training_run import run_training

from helpers import TINY_MODEL, invoke, one_line_error, tiny_config, tiny_run_dict

# Batch 4 on the 50 training images: 13 steps an epoch, so a kill after a few steps is mid-epoch.
LONG_RUN = {"batch_size": 4, "epochs": 2, "checkpoint_every_steps": 3, "keep_checkpoints": 3, "log_every_steps": 5}
KILL_AFTER_STEP = 3
# Measurements of the machine, not of the run; the peak memory is the process's, which in one
# test process is the peak of every run before.
MACHINE_KEYS = ("seconds", "images_per_s", "peak_memory_mb")


def losses(run_dir: Path) -> list[dict]:
    """Every metrics record without its machine measurements: the per-step losses, step windows,
    validation."""
    return [{k: v for k, v in r.items() if k not in MACHINE_KEYS} for r in read_metrics(run_dir / "metrics.jsonl")]


def keep_checkpoints_up_to(run_dir: Path, step: int) -> None:
    """Delete last.pt, best.pt and every step checkpoint after `step`: the run as a kill just after it left it."""
    for path in [run_dir / "last.pt", run_dir / "best.pt"]:
        path.unlink()
    for path in step_checkpoints(run_dir):
        if load_checkpoint(path)["step"] > step:
            path.unlink()


def distillation_cut_and_resumed(cfg: RunConfig, work: Path, after_step: int) -> tuple[Path, Path]:
    """`cfg`'s distillation run straight into work/straight, and into work/cut with every checkpoint
    after `after_step` deleted (last.pt and best.pt too) and then `kneegen distill --resume-from`
    it; the two run dirs, whose metrics must be the same."""
    run_training(cfg, work / "straight")
    run_dir = work / "cut"
    run_training(cfg, run_dir)
    keep_checkpoints_up_to(run_dir, after_step)
    resumed = CliRunner().invoke(build_app(), ["distill", "--resume-from", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output
    return work / "straight", run_dir


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200"}


@pytest.fixture(scope="module")
def straight_run(prepared, tmp_path_factory) -> Path:
    """LONG_RUN trained without interruption: the reference."""
    work = tmp_path_factory.mktemp("straight")
    run_training(tiny_config(prepared, work, train=LONG_RUN), work / "run")
    return work / "run"


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_the_losses_of_a_straight_run(prepared, straight_run, tmp_path):
    config = tmp_path / "long.yaml"
    config.write_text(yaml.safe_dump(tiny_run_dict(prepared, train=LONG_RUN)))
    run_dir, log = tmp_path / "run", tmp_path / "stderr.txt"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "kneegen", "train", "--config", config, "--run-dir", run_dir],
            env=subprocess_env(),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        marker = step_checkpoint(run_dir, KILL_AFTER_STEP)
        deadline = time.monotonic() + 120
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, log.read_text()[-2000:]

    path, payload, _ = resume_point(run_dir, None, tiny_config(prepared, tmp_path, train=LONG_RUN))
    assert payload["epoch"] == 0 and 0 < payload["batch_in_epoch"] < 13, f"not killed mid-epoch: {path}"
    resumed = CliRunner().invoke(build_app(), ["train", "--resume-from", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output
    assert losses(run_dir) == losses(straight_run)
    assert not list(run_dir.rglob(".*.tmp"))  # a write the kill interrupted was cleared
    straight, again = load_checkpoint(straight_run / "last.pt"), load_checkpoint(run_dir / "last.pt")
    assert all(torch.equal(straight["model"][k], again["model"][k]) for k in straight["model"])


@pytest.mark.slow
def test_resume_skips_damaged_checkpoints_and_continues_exactly(prepared, straight_run, tmp_path):
    run_dir = tmp_path / "run"
    cfg = tiny_config(prepared, tmp_path, train=LONG_RUN)
    run_training(cfg, run_dir)
    kept = step_checkpoints(run_dir)
    assert [p.name for p in kept] == ["step-00000021.pt", "step-00000024.pt", "step-00000026.pt"]
    # A crash mid-write: the newest files cut short (as by a full disk), a temporary file left.
    for damaged in (run_dir / "last.pt", kept[-1]):
        damaged.write_bytes(damaged.read_bytes()[:1000])
    (run_dir / ".last.pt.x1y2.tmp").write_bytes(b"partial")

    path, payload, _ = resume_point(run_dir, None, cfg)
    assert path == kept[1] and payload["step"] == 24 and payload["batch_in_epoch"] == 11  # mid-epoch 2
    with pytest.raises(KneegenError, match="train.batch_size differ"):  # the saved position means batches of 4
        run_training(tiny_config(prepared, tmp_path, train={**LONG_RUN, "batch_size": 5}), run_dir, resume=True)
    run_training(cfg, run_dir, resume=True)
    assert losses(run_dir) == losses(straight_run)
    assert not (run_dir / ".last.pt.x1y2.tmp").exists()


@pytest.mark.slow
def test_ctrl_c_saves_the_current_step_and_names_the_resume_command(prepared, straight_run, tmp_path):
    """The real console script: SIGINT mid-epoch ends with status 130 after a checkpoint at the
    step reached, and the printed command continues to the straight run's losses."""
    config = tmp_path / "long.yaml"
    config.write_text(yaml.safe_dump(tiny_run_dict(prepared, train=LONG_RUN)))
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "kneegen", "train", "--config", config, "--run-dir", run_dir],
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    marker, deadline = step_checkpoint(run_dir, KILL_AFTER_STEP), time.monotonic() + 120
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr[-2000:]
    command = f"kneegen train --resume --run-dir {run_dir}"
    assert command in " ".join(stderr.split()) and "Traceback" not in stderr
    saved = load_checkpoint(run_dir / "last.pt")
    assert saved["step"] >= KILL_AFTER_STEP and saved["step"] not in (13, 26)  # a mid-epoch step, not an epoch end

    resumed = CliRunner().invoke(build_app(), ["train", "--resume", "--run-dir", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output
    assert f"resumingfrom{run_dir / 'last.pt'}" in "".join(resumed.output.split())  # wrapped anywhere in a long path
    assert losses(run_dir) == losses(straight_run)


@pytest.mark.slow
def test_resume_of_a_run_stopped_before_its_first_checkpoint_starts_it_over(
    prepared, straight_run, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "long.yaml"
    config.write_text(yaml.safe_dump(tiny_run_dict(prepared, train=LONG_RUN)))
    run_dir = tmp_path / "runs/20260101-000000"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(config.read_text())  # what a run writes before its first step
    (run_dir / "metrics.jsonl").write_text(json.dumps({"kind": "steps", "step": 1, "train_loss": 0.5}) + "\n")
    result = CliRunner().invoke(build_app(), ["train", "--resume"])  # the latest run: this one, without last.pt
    assert result.exit_code == 0, result.output
    assert "has no checkpoint yet: starting it from the beginning" in " ".join(result.output.split())
    assert losses(run_dir) == losses(straight_run)


@pytest.mark.slow
def test_resume_falls_back_to_best_when_every_newer_checkpoint_is_damaged(prepared, tmp_path):
    run_dir = tmp_path / "run"
    cfg = tiny_config(prepared, tmp_path, train={**LONG_RUN, "keep_checkpoints": 1})
    run_training(cfg, run_dir)
    for damaged in (run_dir / "last.pt", *step_checkpoints(run_dir)):
        damaged.write_bytes(b"cut short")
    path, payload, _ = resume_point(run_dir, None, cfg)
    assert path == run_dir / "best.pt" and payload["step"] > 0
    (run_dir / "best.pt").write_bytes(b"cut short")
    with pytest.raises(KneegenError, match="every checkpoint in .* is damaged"):
        resume_point(run_dir, None, cfg)


@pytest.mark.slow
def test_resume_from_a_checkpoint_copied_out_of_its_run_uses_its_own_config(trained_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    copied = tmp_path / "downloads/model.pt"
    copied.parent.mkdir()
    copied.write_bytes((trained_run / "last.pt").read_bytes())
    epochs = load_checkpoint(copied)["epoch"] + 1
    result = CliRunner().invoke(build_app(), ["train", "--resume-from", str(copied), "--epochs", str(epochs)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in copied.parent.iterdir()) == ["model.pt"]  # nothing written beside the copy
    (new_run,) = (tmp_path / "runs").iterdir()
    assert load_checkpoint(new_run / "last.pt")["epoch"] == epochs
    assert "train.epochs" in " ".join(result.output.split())  # the changed key is named


def test_resume_refuses_a_folder_that_is_no_run(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = CliRunner().invoke(build_app(), ["train", "--resume", "--run-dir", str(tmp_path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "no kneegen run" in " ".join(result.output.split())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_resume_refuses_a_checkpoint_of_the_first_format(trained_run, prepared, tmp_path):
    payload = torch.load(trained_run / "last.pt", weights_only=True)
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    torch.save({**payload, "format_version": 1}, run_dir / "last.pt")
    with pytest.raises(KneegenError, match="format 1, which cannot be resumed"):
        run_training(tiny_config(prepared, tmp_path, train={"epochs": 3}), run_dir, resume=True)


def test_resume_from_a_missing_path_is_one_clean_line(tmp_path):
    result = CliRunner().invoke(build_app(), ["train", "--resume-from", str(tmp_path / "gone")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "--resume-from" in result.output and "gone" in result.output


def train_with_torchrun(run: dict, config: Path, run_dir: Path) -> subprocess.CompletedProcess:
    """`kneegen train` of the run config `run` (written to `config`) in 2 gloo processes; it must succeed."""
    config.write_text(yaml.safe_dump(run))
    launched = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "kneegen",
            "train",
            "--config",
            config,
            "--run-dir",
            run_dir,
        ],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    return launched


@pytest.mark.slow
@pytest.mark.parametrize("conditions", [[], ["side", "position"]], ids=["unconditional", "conditional"])
def test_two_processes_make_the_updates_of_one(prepared, tmp_path, conditions):
    """torchrun, 2 CPU processes (gloo), each with half of every batch of 16, against one process
    with the same batches in 2 micro-batches (the same halves): bit-identical weights and losses,
    with the conditions and their dropout too."""
    two_epochs, model = {"epochs": 2}, {**TINY_MODEL, "conditions": conditions}
    ddp_dir = tmp_path / "ddp"
    run = tiny_run_dict(prepared, train=two_epochs, model=model)
    launched = train_with_torchrun(run, tmp_path / "tiny.yaml", ddp_dir)
    one_dir = tmp_path / "one"
    run_training(tiny_config(prepared, tmp_path, train={**two_epochs, "grad_accumulation": 2}, model=model), one_dir)

    ddp, one = load_checkpoint(ddp_dir / "last.pt"), load_checkpoint(one_dir / "last.pt")
    assert len(ddp["rng"]) == 2 and ddp["step"] == one["step"] == 8
    for key in ("model", "ema"):
        assert all(torch.equal(ddp[key][k], one[key][k]) for k in one[key]), key
    assert [r["train_losses"] for r in read_metrics(ddp_dir / "metrics.jsonl")] == [
        r["train_losses"] for r in read_metrics(one_dir / "metrics.jsonl")
    ]  # rank 0 alone wrote metrics: one record per epoch
    assert launched.stderr.count("epoch 2:") == 1  # and spoke


def test_resume_refuses_images_of_another_size_and_names_other_or_reprepared_data_of_the_same(
    trained_run, prepared, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    made = invoke("prepare", "--phantom", 40, "--size", 48, "--out", "d48", "--val-fraction", 0.5, "--test-fraction", 0)
    assert made.exit_code == 0, made.output
    files = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    larger = invoke("train", "--resume", "--run-dir", run, "--epochs", 3, "--data", "d48")
    one_line_error(larger, "--resume: d48 holds 48×48 images and", "trained on 32×32", f"--data {prepared}")
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == files
    shutil.copytree(prepared, tmp_path / "copy")
    same_size = invoke("train", "--resume", "--run-dir", run, "--epochs", 3, "--data", tmp_path / "copy")
    assert same_size.exit_code == 0, same_size.output
    assert f"data {prepared} → {tmp_path / 'copy'}" in " ".join(same_size.output.split())
    manifest = tmp_path / "copy" / "manifest.json"
    manifest.write_text(manifest.read_text() + "\n")  # prepared again, as far as the cache's key goes
    again = invoke("train", "--resume", "--run-dir", run, "--epochs", 4, "--data", tmp_path / "copy")
    assert again.exit_code == 0, again.output
    assert f"with train.epochs 3 → 4, {tmp_path / 'copy'} prepared again since last.pt was saved" in " ".join(
        again.output.split()
    )


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="run dirs are held with flock")
def test_every_process_of_a_torchrun_is_refused_a_run_dir_being_trained(straight_run, tmp_path):
    """Rank 0 finds the run dir held; the refusal reaches rank 1 too, which would otherwise wait on
    a collective until gloo's timeout (half an hour)."""
    run_dir = tmp_path / "held"
    shutil.copytree(straight_run, run_dir)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "kneegen", "train", "--resume", "--run-dir", str(run_dir), "--epochs", "9"]
    with training_into(run_dir):
        launched = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert launched.returncode != 0
    assert launched.stderr.count("being trained by another process") == 2, launched.stderr[-3000:]
