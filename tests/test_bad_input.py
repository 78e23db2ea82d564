"""Bad input, through the whole CLI: each case ends in one line on stderr naming what to fix,
a non-zero exit status, no traceback, and every file that was there before byte-identical."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from kneegen.runs import training_into

from helpers import invoke, one_line_error, tiny_run_dict

PHANTOM = 40  # 2 patients: 20 train + 20 val images


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha1(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a prepared phantom (data/prepared), a tiny run and a config file."""
    root = tmp_path_factory.mktemp("bad-input")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        assert (
            invoke("prepare", "--phantom", PHANTOM, "--size", 32, "--val-fraction", 0.5, "--test-fraction", 0).exit_code
            == 0
        )
        (root / "tiny.yaml").write_text(yaml.safe_dump(tiny_run_dict("data/prepared", train={"epochs": 1})))
        trained = invoke("train", "--config", "tiny.yaml")
        assert trained.exit_code == 0, trained.output
        (root / "a-file").write_text("not a folder")
        shutil.copytree(next((root / "runs").iterdir()), root / "the-run")
        (root / "broken.pt").write_bytes(b"not a checkpoint at all")
        (root / "cut.pt").write_bytes((root / "runs").glob("*/last.pt").__next__().read_bytes()[:4000])
        (root / "empty-folder").mkdir()
        (root / "notes").mkdir()
        (root / "notes/readme.txt").write_text("no images here")
        (root / "config-list.yaml").write_text("- model\n- train\n")
        (root / "config-bad.yaml").write_text("model: [1, 2\n")
        broken_cache = root / "data/broken-cache"
        broken_cache.mkdir(parents=True)
        (broken_cache / "images.npy").write_bytes((root / "data/prepared/images.npy").read_bytes()[:300])
        (broken_cache / "manifest.json").write_text((root / "data/prepared/manifest.json").read_text()[:100])
    return root


TRAIN = ("train", "--config", "tiny.yaml")
CASES: dict[str, tuple[tuple[object, ...], str]] = {  # name: (arguments, text the line must hold)
    "negative lr": ((*TRAIN, "--set", "train.lr=-1e-3"), "train.lr"),
    "zero lr": ((*TRAIN, "--set", "train.lr=0"), "train.lr"),
    "ema decay above 1": ((*TRAIN, "--set", "train.ema_decay=1.5"), "train.ema_decay"),
    "ema decay of 1": ((*TRAIN, "--set", "train.ema_decay=1"), "train.ema_decay"),
    "no channels": ((*TRAIN, "--set", "model.unet.channels=0"), "model.unet.channels"),
    "empty channel_mults": ((*TRAIN, "--set", "model.unet.channel_mults=[]"), "model.unet.channel_mults"),
    "zero channel mult": ((*TRAIN, "--set", "model.unet.channel_mults=[1,0]"), "model.unet.channel_mults"),
    "one timestep": ((*TRAIN, "--set", "diffusion.timesteps=1"), "diffusion.timesteps"),
    "zero timesteps": ((*TRAIN, "--set", "diffusion.timesteps=0"), "diffusion.timesteps"),
    "unclosed list": ((*TRAIN, "--set", "model.unet.channel_mults=[1,2"), "--set"),
    "dropout of 1": ((*TRAIN, "--set", "model.unet.dropout=1"), "model.unet.dropout"),
    "negative minutes": ((*TRAIN, "--minutes", -1), "train.minutes"),
    "seed beyond 64 bits": ((*TRAIN, "--set", f"train.seed={2**64}"), "train.seed"),
    "negative batch": ((*TRAIN, "--set", "train.batch_size=-4"), "train.batch_size"),
    "eta above 1 in config": ((*TRAIN, "--set", "sample.eta=2"), "sample.eta"),
    "zero sample steps in config": ((*TRAIN, "--set", "sample.steps=0"), "sample.steps"),
    "unknown key": ((*TRAIN, "--set", "train.lr_shedule=cosine"), "train.lr_schedule"),
    "missing config": (("train", "--config", "nope.yaml"), "nope.yaml"),
    "unknown recipe": (
        ("train", "--config", "gpu-fast"),
        "--config gpu-fast: no such file, nor a recipe: give a YAML file (see examples/) or a recipe, cpu-bf16 or",
    ),
    "config is a folder": (("train", "--config", "notes"), "config file notes is a folder: give a YAML file"),
    "zero steps": (("sample", "generate", 2, "--steps", 0), "--steps"),
    "negative eta": (("sample", "generate", 2, "--sampler", "ddim", "--eta", -1), "--eta"),
    "eta of 5": (("sample", "generate", 2, "--sampler", "ddim", "--eta", 5), "--eta"),
    "huge seed range": (("sample", "generate", "--seeds", "0-99999999999"), "--seeds"),
    "seed beyond 64 bits on the command line": (("sample", "single", "--seed", 2**64), "--seed"),
    "negative seed": (("sample", "generate", "--seeds", "-5"), "--seeds"),
    "zero images": (("sample", "generate", 0), "N = 0"),
    "out is a file": (("sample", "generate", 2, "--out", "a-file"), "a-file"),
    # prepare
    "prepare without a source": (("prepare",), "--phantom"),
    "prepare a missing folder": (("prepare", "no-such-src", "--out", "data/new"), "no-such-src"),
    "prepare a folder without images": (("prepare", "notes", "--out", "data/new"), "notes"),
    "prepare an empty folder": (("prepare", "empty-folder", "--out", "data/new"), "empty-folder"),
    "size 0": (("prepare", "--phantom", 10, "--size", 0, "--out", "data/new"), "--size"),
    "size not a number": (("prepare", "--phantom", 10, "--size", "big", "--out", "data/new"), "--size"),
    "size too large": (("prepare", "--phantom", 10, "--size", 100000, "--out", "data/new"), "--size"),
    "unknown fit": (("prepare", "--phantom", 10, "--fit", "squash", "--out", "data/new"), "--fit"),
    "unknown axis": (("prepare", "notes", "--axis", "oblique", "--out", "data/new"), "--axis"),
    "window reversed": (("prepare", "notes", "--window", "99,1", "--out", "data/new"), "--window"),
    "val fraction above 1": (("prepare", "--phantom", 10, "--val-fraction", 1.5, "--out", "data/new"), "fraction"),
    "fractions above 1 together": (
        ("prepare", "--phantom", 10, "--val-fraction", 0.6, "--test-fraction", 0.6, "--out", "data/new"),
        "fraction",
    ),
    "negative workers": (("prepare", "notes", "--workers", -1, "--out", "data/new"), "--workers"),
    "min foreground above 1": (("prepare", "notes", "--min-foreground", 2, "--out", "data/new"), "--min-foreground"),
    "prepare out is a file": (("prepare", "--phantom", 10, "--out", "a-file", "--phantom-dir", "ph-new"), "a-file"),
    "prepare over a cache": (("prepare", "--phantom", 10, "--phantom-dir", "ph-new"), "--overwrite"),
    "phantom dir is a file": (("prepare", "--phantom", 10, "--phantom-dir", "a-file", "--out", "data/new"), "a-file"),
    "phantom into a user's folder": (
        ("prepare", "--phantom", 10, "--phantom-dir", "notes", "--out", "data/new", "--overwrite"),
        "did not write",
    ),
    "negative phantom": (("prepare", "--phantom", -5, "--out", "data/new"), "--phantom"),
    "inspect a damaged cache": (("prepare", "--inspect", "data/broken-cache"), "manifest"),
    "inspect a missing cache": (("prepare", "--inspect", "data/nothing"), "data/nothing"),
    # train
    "train on missing data": ((*TRAIN, "--data", "data/nothing"), "data/nothing"),
    "train on a damaged cache": ((*TRAIN, "--data", "data/broken-cache"), "broken-cache"),
    "config is a list": (("train", "--config", "config-list.yaml"), "config-list.yaml"),
    "config is not YAML": (("train", "--config", "config-bad.yaml"), "config-bad.yaml"),
    "unknown device": ((*TRAIN, "--device", "tpu"), "tpu"),
    "unknown precision": ((*TRAIN, "--precision", "fp8"), "fp8"),
    "batch size not a number": ((*TRAIN, "--set", "train.batch_size=abc"), "train.batch_size"),
    "unknown arch": ((*TRAIN, "--set", "model.arch=transformer"), "model.arch"),
    "a network's section given a value": ((*TRAIN, "--set", "model.unet=3"), "e.g. model.unet.channels"),
    "keys at odds, one from the command line": ((*TRAIN, "--set", "train.best_by=fid"), "with the command line"),
    "empty data dir": ((*TRAIN, "--set", "data="), "data is empty"),
    "unknown sampler in config": ((*TRAIN, "--set", "sample.sampler=nope"), "nope"),
    "attention below the levels": ((*TRAIN, "--set", "model.unet.attention_levels=[5]"), "model.unet.attention_levels"),
    "no gradient accumulation": ((*TRAIN, "--set", "train.grad_accumulation=0"), "train.grad_accumulation"),
    "zero epochs": ((*TRAIN, "--epochs", 0), "train.epochs"),
    "negative patch size": ((*TRAIN, "--set", "model.unet.patch_size=-1"), "model.unet.patch_size"),
    "unfold head without a patch fold": (
        (*TRAIN, "--set", "model.unet.patch_size=1", "--set", "model.unet.unfold_head=4"),
        "model.unet.unfold_head",
    ),
    "run dir is a file": ((*TRAIN, "--run-dir", "a-file"), "a-file"),
    "run dir of an existing run": ((*TRAIN, "--run-dir", "the-run"), "--resume"),
    "resume from a non-checkpoint": (("train", "--resume-from", "broken.pt"), "broken.pt"),
    "resume from a truncated checkpoint": (("train", "--resume-from", "cut.pt"), "cut.pt"),
    "resume a folder that is no run": (("train", "--resume", "--run-dir", "notes"), "notes"),
    "resume with a wider network": (
        ("train", "--resume", "--run-dir", "the-run", "--set", "model.unet.channels=24"),
        "model.unet.channels: 16 there, 24 now",
    ),
    "image size the network cannot halve": ((*TRAIN, "--set", "model.unet.channel_mults=[1,1,1,1,1,1]"), "--size"),
    # validate
    "validate a non-checkpoint": (("validate", "broken.pt"), "broken.pt"),
    "validate a truncated checkpoint": (("validate", "cut.pt"), "cut.pt"),
    "validate a missing checkpoint": (("validate", "gone/nope.pt"), "nope.pt"),
    "validate zero samples": (("validate", "--samples", 0), "--samples"),
    "validate unknown precision": (("validate", "--precision", "fp8"), "fp8"),
    "validate on missing data": (("validate", "--data", "data/nothing"), "data/nothing"),
    "validate with an unknown sampler": (("validate", "--sampler", "nope"), "nope"),
    # sample
    "sample a non-checkpoint": (("sample", "generate", 2, "--checkpoint", "broken.pt"), "broken.pt"),
    "sample unknown sampler": (("sample", "generate", 2, "--sampler", "nope"), "nope"),
    "sample unknown spacing": (("sample", "generate", 2, "--spacing", "bogus"), "--spacing"),
    "sample more steps than timesteps": (("sample", "single", "--steps", 100000), "--steps"),
    "sample unknown device": (("sample", "generate", 2, "--device", "tpu"), "tpu"),
    "illustrate zero images": (("sample", "illustrate", 0), "N = 0"),
    "seeds repeated": (("sample", "generate", "--seeds", "1,1"), "--seeds"),
    "seeds reversed range": (("sample", "generate", "--seeds", "9-1"), "--seeds"),
}


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_line_and_changes_nothing(workspace, monkeypatch, name):
    monkeypatch.chdir(workspace)
    arguments, named = CASES[name]
    before = snapshot(workspace)
    result = invoke(*arguments)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert named in lines[0], f"{named!r} not in {lines[0]!r}"
    after = snapshot(workspace)
    assert {path: digest for path, digest in after.items() if path in before} == before


def test_validate_from_another_folder_names_the_relative_data_dir_instead_of_asking_to_prepare(workspace, monkeypatch):
    monkeypatch.chdir(workspace / "notes")  # the run trained on data/prepared, relative to the workspace
    before = snapshot(workspace)
    result = invoke("validate", "../the-run", "--samples", 8)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "data/prepared" in lines[0] and "--data DIR" in lines[0] and "kneegen prepare" not in lines[0]
    assert snapshot(workspace) == before


def test_resume_from_another_folder_names_the_relative_data_dir_instead_of_asking_to_prepare(workspace, monkeypatch):
    monkeypatch.chdir(workspace / "notes")
    before = snapshot(workspace)
    result = invoke("train", "--resume", "--run-dir", "../the-run", "--epochs", 3)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "data/prepared" in lines[0] and "--data DIR" in lines[0] and "kneegen prepare" not in lines[0]
    assert snapshot(workspace) == before


@pytest.mark.skipif(sys.platform == "win32", reason="run dirs are held with flock")
def test_a_run_being_trained_is_refused_to_a_second_training(workspace, monkeypatch):
    """`--resume` typed twice: the second would write the same checkpoints and metrics."""
    monkeypatch.chdir(workspace)
    before = snapshot(workspace)
    with training_into(workspace / "the-run"):  # as the first training holds it
        result = invoke("train", "--resume", "--run-dir", "the-run", "--epochs", 3)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "being trained by another process" in lines[0] and f"pid {os.getpid()}" in lines[0]
    assert snapshot(workspace) == before


def test_version_prints_the_installed_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.strip().startswith("kneegen 0.")


def test_an_unexpected_error_is_one_line_with_a_log_of_its_traceback(workspace, monkeypatch):
    monkeypatch.chdir(workspace)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr("kneegen.train_request.run_training", broken)
    result = invoke(*TRAIN)
    assert result.exit_code == 1
    (line,) = [line for line in result.output.splitlines() if line.strip()]
    assert "unexpected RuntimeError: boom" in line and "--debug" in line
    log = Path(line.split("traceback in ")[1].split(",")[0])
    assert "Traceback" in log.read_text() and "boom" in log.read_text()
    log.unlink()


def test_debug_shows_the_traceback_of_an_unexpected_error(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    monkeypatch.setattr("kneegen.train_request.run_training", lambda *a, **k: 1 / 0)
    result = invoke("--debug", *TRAIN)
    assert isinstance(result.exception, ZeroDivisionError)
    monkeypatch.setenv("KNEEGEN_DEBUG", "1")
    assert isinstance(invoke(*TRAIN).exception, ZeroDivisionError)
    assert os.environ["KNEEGEN_DEBUG"] == "1"


@pytest.mark.parametrize(("flag", "key"), [(("--epochs", 0), "train.epochs"), (("--set", "train.lr=-1"), "train.lr")])
def test_a_bad_value_from_the_command_line_is_blamed_on_it_not_on_the_config_file(workspace, monkeypatch, flag, key):
    monkeypatch.chdir(workspace)
    line = one_line_error(invoke(*TRAIN, *flag), "the command line", key)
    assert "tiny.yaml" not in line
