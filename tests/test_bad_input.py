"""Bad input, through the whole CLI: each case ends in one line on stderr naming what to fix,
a non-zero exit status, no traceback, and every file that was there before byte-identical."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import tiny_run_dict
from kneegen.cli import build_app

PHANTOM = 40  # 2 patients: 20 train + 20 val images


def invoke(*args: object):
    return CliRunner().invoke(build_app(), [str(a) for a in args])


def snapshot(root: Path) -> dict[str, str]:
    return {str(path.relative_to(root)): hashlib.sha1(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a prepared phantom (data/prepared), a tiny run and a config file."""
    root = tmp_path_factory.mktemp("bad-input")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        assert invoke("prepare", "--phantom", PHANTOM, "--size", 32, "--val-fraction", 0.5, "--test-fraction", 0).exit_code == 0
        (root / "tiny.yaml").write_text(yaml.safe_dump(tiny_run_dict("data/prepared", train={"epochs": 1})))
        trained = invoke("train", "--config", "tiny.yaml")
        assert trained.exit_code == 0, trained.output
        (root / "a-file").write_text("not a folder")
    return root


TRAIN = ("train", "--config", "tiny.yaml")
CASES: dict[str, tuple[tuple[object, ...], str]] = {  # name: (arguments, text the line must hold)
    "negative lr": ((*TRAIN, "--set", "train.lr=-1e-3"), "train.lr"),
    "zero lr": ((*TRAIN, "--set", "train.lr=0"), "train.lr"),
    "ema decay above 1": ((*TRAIN, "--set", "train.ema_decay=1.5"), "train.ema_decay"),
    "ema decay of 1": ((*TRAIN, "--set", "train.ema_decay=1"), "train.ema_decay"),
    "no channels": ((*TRAIN, "--set", "model.channels=0"), "model.channels"),
    "empty channel_mults": ((*TRAIN, "--set", "model.channel_mults=[]"), "model.channel_mults"),
    "zero channel mult": ((*TRAIN, "--set", "model.channel_mults=[1,0]"), "model.channel_mults"),
    "one timestep": ((*TRAIN, "--set", "diffusion.timesteps=1"), "diffusion.timesteps"),
    "zero timesteps": ((*TRAIN, "--set", "diffusion.timesteps=0"), "diffusion.timesteps"),
    "unclosed list": ((*TRAIN, "--set", "model.channel_mults=[1,2"), "--set"),
    "dropout of 1": ((*TRAIN, "--set", "model.dropout=1"), "model.dropout"),
    "negative minutes": ((*TRAIN, "--minutes", -1), "train.minutes"),
    "seed beyond 64 bits": ((*TRAIN, "--set", f"train.seed={2**64}"), "train.seed"),
    "negative batch": ((*TRAIN, "--set", "train.batch_size=-4"), "train.batch_size"),
    "eta above 1 in config": ((*TRAIN, "--set", "sample.eta=2"), "sample.eta"),
    "zero sample steps in config": ((*TRAIN, "--set", "sample.steps=0"), "sample.steps"),
    "unknown key": ((*TRAIN, "--set", "train.lr_shedule=cosine"), "train.lr_schedule"),
    "missing config": (("train", "--config", "nope.yaml"), "nope.yaml"),
    "zero steps": (("sample", "generate", 2, "--steps", 0), "--steps"),
    "negative eta": (("sample", "generate", 2, "--sampler", "ddim", "--eta", -1), "--eta"),
    "eta of 5": (("sample", "generate", 2, "--sampler", "ddim", "--eta", 5), "--eta"),
    "huge seed range": (("sample", "generate", "--seeds", "0-99999999999"), "--seeds"),
    "seed beyond 64 bits on the command line": (("sample", "single", "--seed", 2**64), "--seed"),
    "negative seed": (("sample", "generate", "--seeds", "-5"), "--seeds"),
    "zero images": (("sample", "generate", 0), "N = 0"),
    "out is a file": (("sample", "generate", 2, "--out", "a-file"), "a-file"),
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


def test_version_prints_the_installed_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.strip().startswith("kneegen 0.")


def test_an_unexpected_error_is_one_line_with_a_log_of_its_traceback(workspace, monkeypatch):
    monkeypatch.chdir(workspace)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr("kneegen.commands.train.run_training", broken)
    result = invoke(*TRAIN)
    assert result.exit_code == 1
    (line,) = [line for line in result.output.splitlines() if line.strip()]
    assert "unexpected RuntimeError: boom" in line and "--debug" in line
    log = Path(line.split("traceback in ")[1].split(",")[0])
    assert "Traceback" in log.read_text() and "boom" in log.read_text()
    log.unlink()


def test_debug_shows_the_traceback_of_an_unexpected_error(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    monkeypatch.setattr("kneegen.commands.train.run_training", lambda *a, **k: 1 / 0)
    result = invoke("--debug", *TRAIN)
    assert isinstance(result.exception, ZeroDivisionError)
    monkeypatch.setenv("KNEEGEN_DEBUG", "1")
    assert isinstance(invoke(*TRAIN).exception, ZeroDivisionError)
    assert os.environ["KNEEGEN_DEBUG"] == "1"
