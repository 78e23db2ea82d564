"""Bad input that used to slip past the one-line rule: `kneegen ema` over an existing ema-σ.pt, a
bad `--set` type blamed on the config file, Typer's five-line usage box, latent and resume
checkpoints without their keys, and `prepare --inspect` with inputs it would ignore."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kneegen.config import load_config
from kneegen.engine.autoencoder import Autoencoder
from kneegen.engine.checkpoint import save_checkpoint
from kneegen.engine.network import network_settings
from kneegen.errors import KneegenError

from helpers import install_plugin, invoke, one_line_error, tiny_run_dict

VAE = {"factor": 4, "latent_channels": 4, "channels": 8, "crop": 16}


# --- kneegen ema never replaces an ema-σ.pt ---------------------------------------------------------


def test_ema_refuses_an_existing_checkpoint_before_reading_a_snapshot(tmp_path):
    run = tmp_path / "run"
    (run / "ema_snapshots").mkdir(parents=True)
    (run / "ema_snapshots" / "step-00000010.pt").write_bytes(b"unreadable: reading it would be another error")
    mine = run / "ema-0.050.pt"
    mine.write_bytes(b"the checkpoint the user validated")
    line = one_line_error(
        invoke("ema", run, "--lengths", "0.1,0.05", "--samples", 16, "--device", "cpu"), str(mine), "move it away"
    )
    assert "--lengths" in line
    assert mine.read_bytes() == b"the checkpoint the user validated"
    assert sorted(path.name for path in run.glob("ema-*")) == ["ema-0.050.pt"]


# --- a bad --set type is the command line's, not the file's ------------------------------------------


@pytest.mark.parametrize(
    ("dotted", "value"),
    [
        ("train.epochs", "abc"),
        ("train.augment", 3),
        ("model.conditions", 3),
        ("train.optimizer", "sgd"),
        ("train.lr_shedule", "cosine"),
    ],
)
def test_a_bad_type_given_with_set_is_blamed_on_the_command_line(tmp_path, dotted, value):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_run_dict("data")))
    with pytest.raises(KneegenError) as info:
        load_config(path, {dotted: value})
    message = str(info.value)
    assert message.startswith("the command line: ") and dotted in message and "tiny.yaml" not in message, message


def test_set_with_a_bad_type_over_a_recipe_names_the_command_line_and_a_bad_file_still_the_file(tmp_path):
    line = one_line_error(
        invoke("train", "--config", "cpu-fp32", "--set", "train.epochs=abc", "--data", tmp_path), "train.epochs"
    )
    assert "the command line: train.epochs must be int" in line and "cpu-fp32" not in line
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: abc\n")
    with pytest.raises(KneegenError, match=r"bad\.yaml: train\.epochs must be int"):
        load_config(bad, {"train.lr": 1e-3})


# --- usage errors are one line ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("sample", "generate", "-3"), "kneegen sample generate: N must be a positive integer"),
        (("train", "--epochs", "x"), "kneegen train: invalid value for '--epochs'"),
        (("train", "--epoch", "3"), "kneegen train: no such option: --epoch"),
        (("prepare", "--size"), "kneegen prepare: option '--size' requires an argument"),
        (("sample", "generate", "--steps"), "kneegen sample generate: option '--steps' requires an argument"),
        (("validate", "a.pt", "b.pt"), "kneegen validate: got unexpected extra argument"),
        (("sample", "nosuch"), "kneegen sample: no such command 'nosuch'"),
        (("--nosuch",), "kneegen: no such option: --nosuch"),
    ],
)
def test_a_usage_error_is_one_line_naming_the_command_and_its_help(args, named):
    result = invoke(*args)
    line = one_line_error(result, named)
    command = named.split(":")[0]
    assert result.exit_code == 2 and line.startswith("error: ") and line.endswith(f"(see '{command} --help')")


def test_kneegen_alone_still_prints_its_help():
    result = invoke()
    assert result.exit_code == 2 and "Usage: kneegen" in result.output and "prepare" in result.output


def test_a_plugin_commands_usage_errors_and_exits_are_its_own_not_a_bug(tmp_path, monkeypatch):
    install_plugin(
        tmp_path,
        monkeypatch,
        "kneegen.commands",
        "strict = strictplugin_mod:strict",
        "strictplugin_mod",
        '''
        import typer

        def strict(level: int = typer.Option(1, help="1 to 3.")) -> None:
            """A plugin command that checks its own option and may stop early."""
            if level > 3:
                raise typer.BadParameter("at most 3", param_hint="'--level'")
            raise typer.Exit(level)
    ''',
        dist="strictplugin",
    )
    one_line_error(invoke("strict", "--levl", 2), "kneegen strict: no such option: --levl")
    line = one_line_error(invoke("strict", "--level", 5), "kneegen strict: invalid value for '--level': at most 3")
    assert "a bug" not in line
    stopped = invoke("strict", "--level", 3)
    assert stopped.exit_code == 3 and stopped.output == ""


@pytest.mark.slow
def test_the_console_script_prints_a_usage_error_as_one_line_on_stderr(tmp_path):
    script = Path(sys.executable).parent / "kneegen"
    result = subprocess.run(
        [str(script), "sample", "generate", "-3"],
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "80"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert result.stderr.splitlines() == [
        "error: kneegen sample generate: N must be a positive integer; -3 reads as an option "
        "(see 'kneegen sample generate --help')"
    ]


# --- latent and resume checkpoints without their keys ------------------------------------------------


def edited_checkpoint(source: Path, target: Path, edit) -> Path:
    payload = torch.load(source, map_location="cpu", weights_only=True)
    edit(payload)
    torch.save(payload, target)
    return target


def an_autoencoder(trained_run: Path, path: Path) -> Path:
    """An untrained autoencoder saved as a training checkpoint: enough for it to load."""
    payload = torch.load(trained_run / "best.pt", map_location="cpu", weights_only=True)
    config = {**payload["config"], "model": {"arch": "vae", "vae": VAE}}
    _, settings = network_settings(load_config(None, {"model.arch": "vae", "model.vae": VAE}).model)
    weights = Autoencoder(settings).state_dict()
    save_checkpoint(
        {"config": config, "model": weights, "ema": None, "image_shape": [32, 32], "epoch": 1}, path, then="retry"
    )
    return path


def test_a_latent_checkpoint_without_its_latent_record_is_one_line(trained_run, tmp_path):
    autoencoder = an_autoencoder(trained_run, tmp_path / "autoencoder.pt")

    def latent_without_record(payload: dict) -> None:
        payload["config"]["model"]["autoencoder"] = str(autoencoder)
        payload.pop("latent", None)

    checkpoint = edited_checkpoint(trained_run / "best.pt", tmp_path / "latent.pt", latent_without_record)
    line = one_line_error(
        invoke("sample", "single", "--checkpoint", checkpoint, "--device", "cpu", "--out", tmp_path / "s"),
        "latent.pt is not a complete kneegen latent diffusion checkpoint (no latent",
    )
    assert "a bug" not in line and not (tmp_path / "s").exists()


def test_a_resume_checkpoint_without_its_optimizer_is_one_line_and_writes_nothing(trained_run, tmp_path):
    def weights_only(payload: dict) -> None:
        del payload["optimizer"], payload["scaler"]

    checkpoint = edited_checkpoint(trained_run / "last.pt", tmp_path / "slim.pt", weights_only)
    resumed = tmp_path / "resumed"
    line = one_line_error(
        invoke("train", "--resume-from", checkpoint, "--run-dir", resumed, "--epochs", 3),
        "slim.pt is not a complete kneegen checkpoint to resume (no optimizer, scaler)",
    )
    assert "a bug" not in line and not resumed.exists()


# --- prepare --inspect reads a cache and takes nothing else ---------------------------------------


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (("SRC",), "SRC"),
        (("--phantom", 5, "--phantom-dir", "PHANTOM"), "--phantom"),
        (("--size", 64, "--out", "OUT"), "--out, --size"),
    ],
)
def test_inspect_with_a_source_phantom_or_prepare_option_is_refused(prepared, small_src, tmp_path, extra, named):
    places = {"SRC": small_src, "PHANTOM": tmp_path / "phantom", "OUT": tmp_path / "out"}
    args = [places.get(arg, arg) if isinstance(arg, str) else arg for arg in extra]
    line = one_line_error(invoke("prepare", "--inspect", prepared, *args), "--inspect", named, "would be ignored")
    assert "drop --inspect to prepare" in line
    assert not (tmp_path / "phantom").exists() and not (tmp_path / "out").exists()
