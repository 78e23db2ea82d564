"""Bad input found by probing the CLI as an adversarial user: each case is one line on stderr
naming the file, key or option, never a traceback, and nothing the user has is changed."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from kneegen.cli import describe
from kneegen.commands.ema import parse_lengths

from helpers import invoke, one_line_error, tiny_run_dict

# --- --set values for a network's section are the command line's -----------------------------------


def test_a_bad_type_for_a_network_key_given_with_set_is_blamed_on_the_command_line(prepared, tmp_path):
    run_dir = tmp_path / "run"
    result = invoke("train", "--data", prepared, "--run-dir", run_dir, "--set", "model.unet.channel_mults=3")
    line = one_line_error(result, "the command line", "model.unet.channel_mults must be a list")
    assert "config:" not in line
    assert not run_dir.exists()


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("model.unet.bogus.deep=1", "unknown config key 'model.unet.bogus'"),
        ("model.arch=transformer", "model.arch = 'transformer'"),
        ("sample.sampler=magic", "unknown sampler 'magic'"),
    ],
)
def test_a_bad_network_or_sampler_given_with_set_is_blamed_on_the_command_line(prepared, tmp_path, setting, named):
    result = invoke("train", "--data", prepared, "--run-dir", tmp_path / "run", "--set", setting)
    one_line_error(result, "the command line", named)


def test_a_list_key_of_choices_shows_an_example_of_its_own_choices(prepared, tmp_path):
    result = invoke("train", "--data", prepared, "--run-dir", tmp_path / "run", "--set", "train.augment=shift")
    line = one_line_error(result, "train.augment must be a list", "[shift, intensity]")
    assert "[1, 2, 2]" not in line


def test_set_with_an_empty_part_in_its_key_asks_for_key_equals_value(prepared, tmp_path):
    result = invoke("train", "--data", prepared, "--run-dir", tmp_path / "run", "--set", "train..lr=1")
    one_line_error(result, "--set 'train..lr=1'", "KEY=VALUE")


def test_set_into_a_section_the_config_file_leaves_null_names_the_file(prepared, tmp_path):
    config = tmp_path / "null-train.yaml"
    config.write_text("train: null\n")
    result = invoke(
        "train", "--config", config, "--data", prepared, "--run-dir", tmp_path / "run", "--set", "train.lr=1e-3"
    )
    one_line_error(result, str(config), "train", "not a section")


# --- kneegen ema ------------------------------------------------------------------------------------


def test_ema_lengths_given_twice_are_mixed_once():
    assert parse_lengths("0.05,0.050,0.1,0.05") == [0.05, 0.1]


# --- checkpoints with a damaged field ---------------------------------------------------------------


def damaged_copy(trained_run: Path, tmp_path: Path, **changes: object) -> Path:
    """trained_run's last.pt with `changes` (None deletes the key), saved outside any run."""
    payload = torch.load(trained_run / "last.pt", weights_only=True)
    for key, value in changes.items():
        if value is None:
            del payload[key]
        else:
            payload[key] = value
    path = tmp_path / "damaged.pt"
    torch.save(payload, path)
    return path


def test_resuming_a_checkpoint_without_a_format_version_is_one_line(trained_run, tmp_path):
    checkpoint = damaged_copy(trained_run, tmp_path, format_version=None)
    result = invoke("train", "--resume-from", checkpoint, "--run-dir", tmp_path / "fork", "--epochs", 3)
    one_line_error(result, str(checkpoint), "no checkpoint format version")


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"format_version": "two"}, "format_version"),
        ({"image_shape": "abc"}, "image_shape"),
        ({"ema": "weights"}, "EMA weights"),
        ({"ema": None, "model": "weights"}, "model weights"),
    ],
)
def test_a_checkpoint_with_a_field_of_the_wrong_kind_is_refused_in_one_line(trained_run, tmp_path, change, named):
    checkpoint = damaged_copy(trained_run, tmp_path)
    payload = torch.load(checkpoint, weights_only=True)
    payload.update(change)
    torch.save(payload, checkpoint)
    result = invoke("sample", "single", "--checkpoint", checkpoint, "--out", tmp_path / "out", "--device", "cpu")
    one_line_error(result, str(checkpoint), named)
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_named_that_is_nowhere_is_not_found_even_without_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("sample", "single", "--checkpoint", "nope.pt")
    line = one_line_error(result, "nope.pt not found")
    assert "train one first" not in line


# --- prepared caches that do not match their manifest ------------------------------------------------


def broken_cache(prepared: Path, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    return data


def edit_manifest(data: Path, edit) -> None:  # noqa: ANN001 - a small test helper
    manifest = json.loads((data / "manifest.json").read_text())
    edit(manifest)
    (data / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        ("smaller images", "does not match manifest.json"),
        ("float images", "does not match manifest.json"),
        ("no split ranges", "does not match manifest.json"),
        ("ranges past the end", "does not match manifest.json"),
        ("records of fewer slices", "does not match manifest.json"),
        ("newer version", "newer than this kneegen understands"),
    ],
)
def test_a_cache_whose_images_and_manifest_disagree_is_refused(prepared, tmp_path, damage, named):
    data = broken_cache(prepared, tmp_path)
    count = len(np.load(data / "images.npy", mmap_mode="r"))
    if damage == "smaller images":
        np.save(data / "images.npy", np.zeros((count, 16, 16), np.uint8))
    elif damage == "float images":
        np.save(data / "images.npy", np.zeros((count, 32, 32), np.float64))
    elif damage == "no split ranges":
        edit_manifest(data, lambda manifest: manifest.pop("split_ranges"))
    elif damage == "ranges past the end":
        edit_manifest(data, lambda manifest: manifest["split_ranges"].update(train=[0, count * 10]))
    elif damage == "records of fewer slices":
        edit_manifest(data, lambda manifest: manifest.update(slices=manifest["slices"][:2]))
    else:
        edit_manifest(data, lambda manifest: manifest.update(version=99))
    before = {path.name: path.read_bytes() for path in data.iterdir()}
    result = invoke("train", "--data", data, "--run-dir", tmp_path / "run", "--device", "cpu")
    one_line_error(result, str(data), named)
    assert {path.name: path.read_bytes() for path in data.iterdir()} == before


# --- out of memory ----------------------------------------------------------------------------------


def test_torch_failing_to_allocate_on_the_cpu_is_out_of_memory_not_a_bug():
    error = RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")
    assert describe(error).startswith("out of memory:")


def test_a_network_too_large_for_memory_is_one_line(prepared, tmp_path, monkeypatch):
    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 160000000000 bytes")

    monkeypatch.setattr("kneegen.training_run.create_state", refuse)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_run_dict(prepared)))
    result = invoke("train", "--config", config, "--run-dir", tmp_path / "run")
    one_line_error(result, "out of memory", "model.*")


# --- a full disk while writing samples or a report -----------------------------------------------


def test_a_full_disk_while_sampling_names_the_file_it_was_writing(trained_run, tmp_path, monkeypatch):
    def full_disk(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")  # as a failed write(): no file named

    monkeypatch.setattr("PIL.Image.Image.save", full_disk)
    out = tmp_path / "samples"
    result = invoke("sample", "generate", "2", "--checkpoint", trained_run / "best.pt", "--out", out, "--steps", "2")
    assert result.exit_code == 1 and "Traceback" not in result.output
    (error,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert f"no space left on the disk writing {out / '000000.png'}: free some space" in error
