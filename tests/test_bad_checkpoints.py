"""Config and checkpoint files that are not what they should be: a config that is not UTF-8 text
or gives a key twice, a checkpoint without its config, with weights its config cannot build, or
that is no torch file at all. Each ends in one line naming the file and what to do."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from kneegen.config import load_config, read_yaml_mapping
from kneegen.engine.checkpoint import load_checkpoint
from kneegen.errors import KneegenError
from kneegen.recipes import recipe_names, recipe_path

from helpers import invoke

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def one_error_line(result) -> str:
    """The single `error:` line a refused command prints (and its exit status 1, no traceback)."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "a bug" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def edited_checkpoint(source: Path, target: Path, edit) -> Path:
    """A copy of the checkpoint `source` with `edit(payload)` applied, saved as plain torch does."""
    payload = torch.load(source, map_location="cpu", weights_only=True)
    edit(payload)
    torch.save(payload, target)
    return target


# --- config files -----------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"# caf\xe9\ntrain:\n  lr: 0.001\n", b"train:\n  lr: 0.1\n  x: \x01\n"])
def test_a_config_that_is_not_utf8_text_is_refused_naming_the_file(tmp_path, content):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(content)
    with pytest.raises(KneegenError, match=r"latin1\.yaml: not a UTF-8 text YAML file"):
        read_yaml_mapping(path)
    path.write_bytes(b"\xef\xbb\xbftrain:\n  lr: 0.001\n")  # a byte-order mark is still UTF-8 text
    assert load_config(path).train.lr == 0.001


def test_a_checkpoint_given_as_config_is_one_line_naming_it(trained_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_error_line(invoke("train", "--config", trained_run / "best.pt", "--run-dir", tmp_path / "run"))
    assert "best.pt: not a UTF-8 text YAML file" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("text", "key", "where"),
    [
        ("train:\n  lr: 0.1\n  lr: 0.2\n", "train.lr", "lines 2 and 3"),
        ("train: {lr: 0.1}\ndiffusion: {timesteps: 10, timesteps: 20}\n", "diffusion.timesteps", "line 2"),
        ("model:\n  unet:\n    channels: 8\n    channels: 16\n", "model.unet.channels", "lines 3 and 4"),
        ("train:\n  lr: 0.1\ntrain:\n  epochs: 3\n", "train", "lines 1 and 3"),
    ],
)
def test_a_config_key_given_twice_is_refused_naming_it(tmp_path, text, key, where):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(KneegenError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: config key '{key}' is given twice ({where})"), message


def test_only_repeats_are_refused_not_merges_recipes_examples_or_a_runs_own_config(trained_run, tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(KneegenError, match="given twice"):
        read_yaml_mapping(twice)
    merged = tmp_path / "merged.yaml"  # keys a merge brings in may be overridden, as YAML intends
    merged.write_text("x: &base {lr: 0.1, epochs: 3}\ntrain:\n  <<: *base\n  lr: 0.2\n")
    assert read_yaml_mapping(merged)["train"] == {"lr": 0.2, "epochs": 3}
    for path in [recipe_path(name) for name in recipe_names()] + sorted(EXAMPLES.glob("*.yaml")):
        assert isinstance(read_yaml_mapping(path), dict), path
    assert load_config(trained_run / "config.yaml").model.sections["unet"]["channels"] == 16


# --- checkpoints that are not whole ---------------------------------------------------------------


@pytest.fixture()
def no_config(trained_run: Path, tmp_path: Path) -> Path:
    return edited_checkpoint(trained_run / "best.pt", tmp_path / "noconfig.pt", lambda payload: payload.pop("config"))


@pytest.fixture()
def mismatched(trained_run: Path, tmp_path: Path) -> Path:
    def wider(payload: dict) -> None:
        payload["config"]["model"]["unet"]["channels"] = 32

    return edited_checkpoint(trained_run / "best.pt", tmp_path / "mismatch.pt", wider)


def commands_reading(checkpoint: Path, tmp_path: Path) -> dict[str, tuple[object, ...]]:
    """Every command that reads a checkpoint, each aimed at `checkpoint`."""
    return {
        "sample": ("sample", "single", "--checkpoint", checkpoint, "--device", "cpu", "--out", tmp_path / "s"),
        "validate": ("validate", checkpoint, "--samples", 4, "--no-feature-copies", "--device", "cpu"),
        "distill": ("distill", checkpoint, "--run-dir", tmp_path / "student", "--device", "cpu"),
        "resume": ("train", "--resume-from", checkpoint, "--run-dir", tmp_path / "resumed"),
    }


@pytest.mark.parametrize("command", ["sample", "validate", "distill", "resume"])
def test_a_checkpoint_without_its_config_is_named_by_every_command(no_config, tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    line = one_error_line(invoke(*commands_reading(no_config, tmp_path)[command]))
    assert "noconfig.pt is not a kneegen checkpoint (no config)" in line
    assert "last.pt or best.pt" in line


def test_a_snapshot_without_weights_is_no_model_to_sample(trained_run, tmp_path, monkeypatch):
    stripped = edited_checkpoint(
        trained_run / "best.pt", tmp_path / "bare.pt", lambda p: [p.pop(k) for k in ("model", "ema", "config")]
    )
    monkeypatch.chdir(tmp_path)
    line = one_error_line(invoke(*commands_reading(stripped, tmp_path)["sample"]))
    assert "bare.pt is not a kneegen checkpoint (no config, model, ema)" in line


@pytest.mark.parametrize("command", ["sample", "validate", "distill", "resume"])
def test_weights_that_do_not_fit_the_checkpoints_config_are_one_line(mismatched, tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    line = one_error_line(invoke(*commands_reading(mismatched, tmp_path)[command]))
    assert "mismatch.pt" in line and "the weights do not fit the config's model.* settings" in line
    assert "size mismatch" not in line


# --- files that are no checkpoint at all ------------------------------------------------------------


def torch_zip_of_a_module(path: Path) -> None:
    torch.save(torch.nn.Linear(2, 2), path)  # a pickled module: weights_only refuses it


def zip_of_text(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "not a checkpoint")


UNREADABLE = {  # name: (how to write it, what the message must say)
    "empty": (lambda path: path.write_bytes(b""), "is empty (0 bytes)"),
    "truncated": (lambda path: path.write_bytes(b"PK\x03\x04" + bytes(3000)), "is truncated"),
    "text": (lambda path: path.write_text("hello\n"), "is not a torch checkpoint file"),
    "plain pickle": (lambda path: path.write_bytes(pickle.dumps({"x": 1})), "is not a torch checkpoint file"),
    "zip of text": (zip_of_text, "is damaged, or a zip archive that is no torch checkpoint"),
    "pickled module": (torch_zip_of_a_module, "holds Python objects besides tensors"),
}


# What torch's own reasons for these files start with: library internals, cut mid-word before.
RAW_REASONS = ("PytorchStreamReader", "EOFError", "Weights only", "invalid load key", "central directory", "(1")


@pytest.mark.parametrize("name", UNREADABLE)
def test_an_unreadable_checkpoint_says_plainly_what_it_is_and_what_to_do(tmp_path, recwarn, name):
    write, says = UNREADABLE[name]
    path = tmp_path / "model.pt"
    write(path)
    recwarn.clear()
    with pytest.raises(KneegenError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path} {says}"), message
    assert "another checkpoint of the run" in message or "last.pt or best.pt" in message
    assert not [raw for raw in RAW_REASONS if raw in message]
    assert not [w for w in recwarn.list if "pickle" in str(w.message)]  # torch's warning does not leak


def test_a_truncated_checkpoint_of_a_run_is_called_truncated(trained_run, tmp_path, monkeypatch):
    cut = tmp_path / "cut.pt"
    cut.write_bytes((trained_run / "best.pt").read_bytes()[:3000])
    monkeypatch.chdir(tmp_path)
    line = one_error_line(invoke("sample", "single", "--checkpoint", cut, "--device", "cpu", "--out", tmp_path / "s"))
    assert "cut.pt is truncated" in line and "PytorchStreamReader" not in line and "last.pt" in line


def test_a_plain_pickle_as_checkpoint_prints_no_warning(tmp_path, monkeypatch, recwarn):
    path = tmp_path / "pickle.pt"
    path.write_bytes(pickle.dumps({"x": 1}))
    monkeypatch.chdir(tmp_path)
    line = one_error_line(invoke("train", "--resume-from", path, "--run-dir", tmp_path / "run"))
    assert "pickle.pt is not a torch checkpoint file" in line
    assert [str(w.message) for w in recwarn.list if "pickle protocol" in str(w.message)] == []
