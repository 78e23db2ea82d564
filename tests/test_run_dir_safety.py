"""What the user already has is never overwritten: a resume never continues into another run, a
distillation resume never trains a plain run further, and `distill` / `ema` refuse bad flags in
one line naming the flag, before they write a run dir or a checkpoint."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from kneegen.engine.checkpoint import load_checkpoint
from kneegen.training_run import run_training

from helpers import invoke, one_line_error, tiny_config


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` by its content hash: equal snapshots, nothing written or deleted."""
    return {
        str(path.relative_to(root)): hashlib.sha1(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def copy_run(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir, to)
    return to


@pytest.fixture(scope="module")
def snapshot_run(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of the tiny model trained with train.ema_snapshots, which `kneegen ema` mixes."""
    work = tmp_path_factory.mktemp("safety-snapshots")
    run_training(tiny_config(prepared, work, train={"ema_snapshots": True}), work / "run")
    return work / "run"


# --- train --resume-from ---------------------------------------------------------------------------


def test_resume_from_a_checkpoint_continues_in_its_own_run_or_a_new_dir_never_in_another_run(trained_run, tmp_path):
    origin = copy_run(trained_run, tmp_path / "origin")
    other = copy_run(trained_run, tmp_path / "other")
    (other / "ema_snapshots").mkdir()
    (other / "ema_snapshots" / "step-99999999.pt").write_bytes(b"the other run's, kept")
    before = snapshot(other)
    epochs = load_checkpoint(origin / "best.pt")["epoch"] + 1

    refused = invoke("train", "--resume-from", origin / "best.pt", "--run-dir", other, "--epochs", epochs)
    one_line_error(refused, f"--run-dir {other}", "another run", f"--run-dir {origin}")
    assert snapshot(other) == before

    (tmp_path / "empty").mkdir()
    branched = invoke("train", "--resume-from", origin / "best.pt", "--run-dir", tmp_path / "empty", "--epochs", epochs)
    assert branched.exit_code == 0, branched.output
    assert load_checkpoint(tmp_path / "empty" / "last.pt")["epoch"] == epochs
    own = invoke("train", "--resume-from", origin / "best.pt", "--run-dir", f"{origin}/.", "--epochs", epochs)
    assert own.exit_code == 0, own.output
    assert load_checkpoint(origin / "last.pt")["epoch"] == epochs


def test_resume_from_a_run_dir_is_not_silently_swapped_for_another_run_dir(trained_run, tmp_path):
    origin = copy_run(trained_run, tmp_path / "origin")
    other = copy_run(trained_run, tmp_path / "other")
    before = snapshot(other)
    epochs = load_checkpoint(origin / "last.pt")["epoch"] + 1
    refused = invoke("train", "--resume-from", origin, "--run-dir", other, "--epochs", epochs)
    one_line_error(refused, f"--resume-from {origin}", f"--run-dir {other}", str(origin / "last.pt"))
    assert snapshot(other) == before


# --- distill --resume ---------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["--resume", "--resume-from"])
def test_distill_resume_refuses_a_training_run_and_leaves_it_untouched(trained_run, tmp_path, how):
    plain = copy_run(trained_run, tmp_path / "plain")
    before = snapshot(plain)
    target = ["--resume", "--run-dir", plain] if how == "--resume" else ["--resume-from", plain / "best.pt"]
    epochs = load_checkpoint(plain / "last.pt")["epoch"] + 1
    result = invoke("distill", *target, "--epochs", epochs, "--steps", 2, "--device", "cpu")
    one_line_error(result, how, str(plain), "not a distillation", "kneegen train", "kneegen distill")
    assert snapshot(plain) == before


def test_distill_with_a_teacher_and_resume_is_refused_not_half_ignored(trained_run, tmp_path):
    plain = copy_run(trained_run, tmp_path / "plain")
    before = snapshot(plain)
    epochs = load_checkpoint(plain / "last.pt")["epoch"] + 1
    result = invoke("distill", trained_run / "best.pt", "--resume", "--run-dir", plain, "--epochs", epochs)
    one_line_error(result, "CHECKPOINT", "--resume")
    assert snapshot(plain) == before


# --- distill: its step counts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--steps", 4, "--teacher-steps", 4096], "--teacher-steps 4096"),
        (["--steps", 1024], "--steps 1024"),
    ],
    ids=["teacher-steps", "steps"],
)
def test_teacher_steps_beyond_the_models_timesteps_name_the_flag_and_write_no_run_dir(
    trained_run, tmp_path, flags, named
):
    student = tmp_path / "student"
    result = invoke("distill", trained_run / "best.pt", *flags, "--epochs", 1, "--run-dir", student)
    one_line_error(result, named, "1000 timesteps")
    assert not student.exists()  # a corrected rerun with the same --run-dir starts afresh


# --- kneegen ema -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--samples", 0], "--samples 0"),
        (["--samples", -5], "--samples -5"),
        (["--lengths", "5"], "--lengths"),
        (["--lengths=-0.1,0.2"], "--lengths"),
    ],
    ids=["no-samples", "negative-samples", "length-too-long", "negative-length"],
)
def test_ema_refuses_bad_flags_by_name_before_writing_anything(snapshot_run, flags, named):
    before = snapshot(snapshot_run)
    one_line_error(invoke("ema", snapshot_run, *flags, "--device", "cpu"), named)
    assert snapshot(snapshot_run) == before


def test_ema_says_what_is_wrong_with_its_run_dir(trained_run, tmp_path, monkeypatch):
    one_line_error(invoke("ema", tmp_path / "nothere"), "nothere", "not found", "RUN_DIR")
    one_line_error(invoke("ema", trained_run / "best.pt"), "is a file", str(trained_run))
    one_line_error(invoke("ema", trained_run), "has no ema_snapshots", "train.ema_snapshots=true")
    monkeypatch.chdir(tmp_path)  # no runs/ here
    line = one_line_error(invoke("ema"), "kneegen ema", "no run found", "RUN_DIR")
    assert "--resume" not in line
