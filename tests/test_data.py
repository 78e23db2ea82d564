"""AKOA names and `prepare_folder`: the patient-level split, the cache, and bad inputs."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kneegen.data.akoa import SliceName, parse_akoa_name
from kneegen.data.cache import open_cache
from kneegen.data.decode import read_pages
from kneegen.data.geometry import fit_to_size
from kneegen.data.prepare import prepare_folder
from kneegen.data.splits import SplitFractions
from kneegen.errors import KneegenError

from helpers import IMAGE_SIZE, PHANTOM_IMAGES, prepare_options

REAL_NAME = "OAI9014797_BaseLine_3_de3d1_SAG_3D_DESS_WE_LEFT.nii.gz_12.png"


# --- AKOA names -------------------------------------------------------------------------------


def test_real_akoa_name_is_parsed():
    parsed = parse_akoa_name(REAL_NAME)
    assert parsed == SliceName(patient="9014797", visit="3", side="LEFT", slice_index=12)
    assert parsed.volume == "9014797_3_LEFT"


@pytest.mark.parametrize(
    "name, side, slice_index",
    [
        ("OAI9014797_BaseLine_3_de3d1_SAG_3D_DESS_WE_Left.nii.gz_12.png", "LEFT", 12),
        ("OAI9014797_BaseLine_3_de3d1_SAG_3D_DESS_WE_L_E_F_T.nii.gz_1.png", "LEFT", 1),
        ("OAI9014797_BaseLine_3_de3d1_SAG_3D_DESS_WE_R_I_G_H_T.nii.gz_40.png", "RIGHT", 40),
        ("OAI9014797_BaseLine_3_de3d1_SAG_3D_DESS_WE_right.nii_7.jpg", "RIGHT", 7),
        ("OAI9014797_BaseLine_3de3d1_SAG_3D_DESS_WE_LEFT.nii.gz_12.png", "LEFT", 12),
        ("OAI9014797_BaseLine_3_de3d1_SAG_3D_DESS_WE_LEFT.nii.gz_12.PNG", "LEFT", 12),
    ],
)
def test_akoa_name_variants_are_parsed(name, side, slice_index):
    parsed = parse_akoa_name(name)
    assert parsed is not None
    assert (parsed.patient, parsed.visit, parsed.side, parsed.slice_index) == ("9014797", "3", side, slice_index)


@pytest.mark.parametrize(
    "name",
    [
        "knee_001.png",
        "scan.png",
        "OAI9014797.png",
        "OAI9014797_BaseLine_3_de3d1_SAG_3D_DESS_WE_BOTH.nii.gz_12.png",  # no such side
        "OAI9014797_BaseLine_3_de3d1_SAG_3D_DESS_WE_LEFT.nii.gz_12",  # no image suffix
        "OAIabc_BaseLine_3_de3d1_SAG_3D_DESS_WE_LEFT.nii.gz_12.png",
    ],
)
def test_unrelated_names_give_none(name):
    assert parse_akoa_name(name) is None


# --- prepare_folder on the phantom --------------------------------------------------------------


def manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def splits_by(records: list[dict], key: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for record in records:
        found.setdefault(record[key], set()).add(record["split"])
    return found


def assert_no_leak(root: Path) -> None:
    """No patient and no volume has slices in two splits, and the manifest agrees."""
    records = manifest(root)["slices"]
    for key in ("patient", "volume"):
        leaks = {k: v for k, v in splits_by(records, key).items() if len(v) > 1}
        assert not leaks, f"{key}s in two splits: {leaks}"
    assert manifest(root)["patients"] == {p: next(iter(s)) for p, s in splits_by(records, "patient").items()}


def test_patient_never_in_both_splits(prepared):
    records = manifest(prepared)["slices"]
    assert len(records) == PHANTOM_IMAGES
    for record in records:
        parsed = parse_akoa_name(Path(record["path"]).name)
        assert parsed is not None and parsed.patient == record["patient"] and parsed.volume == record["volume"]
    assert_no_leak(prepared)
    assert {next(iter(s)) for s in splits_by(records, "patient").values()} == {"train", "val"}
    assert len(splits_by(records, "patient")) == 6


def test_split_views_have_the_right_counts_shape_and_dtype(prepared):
    data = open_cache(prepared)
    records = manifest(prepared)["slices"]
    counts = {name: sum(r["split"] == name for r in records) for name in ("train", "val", "test")}
    assert counts == {"train": 50, "val": 10, "test": 0}  # 6 patients of 10 slices at 0.8/0.2/0
    assert data.images.shape == (PHANTOM_IMAGES, IMAGE_SIZE, IMAGE_SIZE)
    assert data.image_shape == (IMAGE_SIZE, IMAGE_SIZE)
    for name, count in counts.items():
        view = data.split(name)
        assert view.shape == (count, IMAGE_SIZE, IMAGE_SIZE)
        assert view.dtype == np.uint8
        assert np.shares_memory(view, data.images) or count == 0  # a view, not a copy
    # Train first, then val; the manifest records are in cache order.
    assert [r["split"] for r in records] == ["train"] * 50 + ["val"] * 10


def test_cache_image_i_is_the_file_of_record_i(prepared, phantom_src):
    data = open_cache(prepared)
    records = manifest(prepared)["slices"]
    for i in [0, 17, 49, 50, 59]:
        expected = fit_to_size(read_pages(phantom_src / records[i]["path"])[0], (IMAGE_SIZE, IMAGE_SIZE), "pad")
        np.testing.assert_array_equal(data.images[i], expected)
    assert data.images.std() > 10  # resized anatomy, not a blank image


def test_three_way_split_is_deterministic_for_a_seed_and_changes_with_it(phantom_src, tmp_path):
    thirds = SplitFractions(0.5, 0.25, 0.25)
    a = prepare_folder(phantom_src, tmp_path / "a", prepare_options((16, 16), fractions=thirds, seed=4))
    prepare_folder(phantom_src, tmp_path / "b", prepare_options((16, 16), fractions=thirds, seed=4))
    assert manifest(tmp_path / "a")["patients"] == manifest(tmp_path / "b")["patients"]
    assert a.split_patients == {"train": 3, "val": 2, "test": 1}  # 6 × (0.5, 0.25, 0.25): the tie goes to val
    assert_no_leak(tmp_path / "a")
    assignments = {json.dumps(manifest(tmp_path / "a")["patients"], sort_keys=True)}
    for seed in range(5, 9):
        prepare_folder(phantom_src, tmp_path / f"s{seed}", prepare_options((16, 16), fractions=thirds, seed=seed))
        assignments.add(json.dumps(manifest(tmp_path / f"s{seed}")["patients"], sort_keys=True))
    assert len(assignments) > 1
    assert a.images == PHANTOM_IMAGES


def test_both_worker_processes_give_the_same_cache(phantom_src, tmp_path):
    prepare_folder(phantom_src, tmp_path / "one", prepare_options((16, 16)))
    prepare_folder(phantom_src, tmp_path / "two", prepare_options((16, 16), workers=2))
    np.testing.assert_array_equal(open_cache(tmp_path / "one").images, open_cache(tmp_path / "two").images)
    assert manifest(tmp_path / "one")["slices"] == manifest(tmp_path / "two")["slices"]


@pytest.mark.parametrize("fit", ["pad", "crop", "stretch"])
def test_non_square_size_is_height_by_width(phantom_src, tmp_path, fit):
    summary = prepare_folder(phantom_src, tmp_path / "c", prepare_options((16, 24), fit=fit))
    assert summary.image_shape == (16, 24) and summary.fit == fit
    assert summary.source_sizes == {"228x260": PHANTOM_IMAGES}
    assert open_cache(tmp_path / "c").images.shape == (PHANTOM_IMAGES, 16, 24)


def half_split(**changes) -> dict:
    return {"fractions": SplitFractions(0.5, 0.5, 0.0), **changes}


def test_bad_files_are_skipped_with_their_reasons(small_src, tmp_path):
    (small_src / "empty.png").write_bytes(b"")
    (small_src / "notes.png").write_text("these are my notes, not an image\n")
    whole = (small_src / sorted(p.name for p in small_src.glob("OAI*"))[0]).read_bytes()
    (small_src / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (small_src / "readme.txt").write_text("not an image\n")
    out = tmp_path / "out"
    summary = prepare_folder(small_src, out, prepare_options((16, 16), **half_split()))
    assert summary.images == 20
    skipped = {Path(path).name: reason for path, reason in summary.skipped}
    assert skipped.keys() == {"empty.png", "notes.png", "truncated.png", "readme.txt"}
    assert skipped["empty.png"] == "empty file (0 bytes)"
    assert skipped["notes.png"] == "not an image Pillow can read"
    assert skipped["truncated.png"].startswith("corrupt or truncated image")
    assert skipped["readme.txt"] == "not an image or volume (.txt)"
    assert {Path(item["path"]).name for item in manifest(out)["skipped"]} == set(skipped)
    assert open_cache(out).images.shape == (20, 16, 16)


def test_strict_stops_at_the_first_bad_file_and_writes_nothing(small_src, tmp_path):
    (small_src / "zz_broken.png").write_text("not a png")
    with pytest.raises(KneegenError, match=r"zz_broken\.png: not an image .* --strict"):
        prepare_folder(small_src, tmp_path / "out", prepare_options((16, 16), **half_split(strict=True)))
    assert not (tmp_path / "out").exists()


def test_mixed_sizes_and_modes_become_one_grayscale_cache(tmp_path):
    src = tmp_path / "mixed"
    src.mkdir()
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (30, 40), dtype=np.uint8)
    Image.fromarray(gray).save(src / "a_gray.png")
    Image.fromarray(np.stack([gray] * 3, axis=-1)).save(src / "b_rgb.png")  # as AKOA stores slices
    Image.fromarray(np.dstack([gray] * 3 + [np.full_like(gray, 255)])).save(src / "c_rgba.png")
    Image.fromarray(gray).convert("P").save(src / "d_palette.png")
    Image.fromarray(rng.integers(0, 256, (50, 20), dtype=np.uint8)).save(src / "e_tall.png")
    summary = prepare_folder(src, tmp_path / "out", prepare_options((20, 20), fractions=SplitFractions(0.6, 0.4, 0.0)))
    assert summary.images == 5 and summary.dtype == "uint8"
    assert summary.source_sizes == {"30x40": 4, "50x20": 1}
    images = open_cache(tmp_path / "out").images
    by_name = {Path(r["path"]).name: images[i] for i, r in enumerate(manifest(tmp_path / "out")["slices"])}
    for name in ("b_rgb.png", "c_rgba.png", "d_palette.png"):  # equal channels → exactly the gray values
        np.testing.assert_array_equal(by_name[name], by_name["a_gray.png"])


def test_sixteen_bit_sources_keep_their_precision(tmp_path):
    src = tmp_path / "deep"
    src.mkdir()
    ramp = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 251 + 7).astype(np.uint16)  # odd values
    for i in range(4):
        Image.fromarray(ramp + i).save(src / f"OAI900000{i}_BaseLine_3_de3d1_SAG_3D_DESS_WE_LEFT.nii.gz_1.png")
    Image.fromarray((ramp >> 8).astype(np.uint8)).save(
        src / "OAI9000009_BaseLine_3_de3d1_SAG_3D_DESS_WE_RIGHT.nii.gz_1.png"
    )
    summary = prepare_folder(src, tmp_path / "out", prepare_options((16, 16), fractions=SplitFractions(0.6, 0.4, 0.0)))
    data = open_cache(tmp_path / "out")
    assert summary.dtype == "uint16" and data.images.dtype == np.uint16
    records = manifest(tmp_path / "out")["slices"]
    for i, record in enumerate(records):
        if record["patient"] == "9000009":  # the 8-bit file, widened so 255 ↦ 65535
            np.testing.assert_array_equal(data.images[i], (ramp >> 8).astype(np.uint16) * 257)
        else:
            np.testing.assert_array_equal(data.images[i], ramp + int(record["patient"][-1]))


def test_eight_bit_sources_stay_eight_bit(prepared):
    assert open_cache(prepared).images.dtype == np.uint8


def test_nested_akoa_folders_and_sub_folder_patients(tmp_path, phantom_src):
    src = tmp_path / "nested"
    for i, path in enumerate(sorted(phantom_src.glob("*.png"))[:30]):
        folder = src / f"batch{i % 3}" / "deeper"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / path.name)
    rng = np.random.default_rng(1)
    for subject in ("subject_a", "subject_b"):
        for knee in ("left", "right"):  # a patient's folders below its own stay that patient's
            (src / subject / knee).mkdir(parents=True)
            for k in range(3):
                pixels = rng.integers(0, 255, (20, 30), dtype=np.uint8)
                Image.fromarray(pixels).save(src / subject / knee / f"slice_{k}.png")
    summary = prepare_folder(src, tmp_path / "out", prepare_options((16, 16), fractions=SplitFractions(0.6, 0.4, 0.0)))
    assert summary.images == 42
    assert summary.patients == 3 + 2  # AKOA patients wherever they sit; a plain top folder is one patient
    akoa_volumes = {parse_akoa_name(path.name).volume for path in src.rglob("OAI*.png")}
    assert summary.volumes == len(akoa_volumes) + 4  # each knee folder its own volume
    assert_no_leak(tmp_path / "out")
    groups = {r["patient"] for r in manifest(tmp_path / "out")["slices"] if r["side"] is None}
    assert groups == {"file:subject_a", "file:subject_b"}


def test_a_multi_page_tiff_is_a_stack_of_slices(tmp_path):
    src = tmp_path / "stacks"
    src.mkdir()
    rng = np.random.default_rng(0)
    for patient in ("p1", "p2", "p3"):
        pages = [Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8)) for _ in range(3)]
        pages[0].save(src / f"{patient}.tif", save_all=True, append_images=pages[1:])
    summary = prepare_folder(src, tmp_path / "out", prepare_options((16, 16)))
    assert summary.images == 9 and summary.patients == 3 and summary.volumes == 3
    records = manifest(tmp_path / "out")["slices"]
    assert sorted(r["slice"] for r in records if r["path"] == "p2.tif") == [0, 1, 2]


def test_only_a_tiff_is_a_stack_and_its_pages_share_one_size(tmp_path):
    src = tmp_path / "odd"
    src.mkdir()
    frames = [Image.fromarray(np.full((20, 30), value, np.uint8)) for value in (60, 120, 180)]
    for patient in ("p1", "p2"):  # an animated PNG: one slice, its first frame
        frames[0].save(src / f"{patient}.png", save_all=True, append_images=frames[1:])
    frames[0].save(src / "p3.tif", save_all=True, append_images=[frames[1].resize((10, 10))])  # a preview page
    summary = prepare_folder(src, tmp_path / "out", prepare_options((16, 16), fractions=SplitFractions(0.5, 0.5, 0.0)))
    assert summary.images == 2
    assert "a stack's pages share one size" in dict(summary.skipped)["p3.tif"]


def test_inputs_all_in_one_top_folder_point_to_it(tmp_path):
    src = tmp_path / "plain"
    rng = np.random.default_rng(0)
    for subject in ("a", "b", "c"):
        (src / "all" / subject).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8)).save(src / "all" / subject / f"s{i}.png")
    with pytest.raises(KneegenError) as info:
        prepare_folder(src, tmp_path / "out", prepare_options((16, 16)))
    assert f"run kneegen prepare {src / 'all'}" in str(info.value)
    assert prepare_folder(src / "all", tmp_path / "out", prepare_options((16, 16))).patients == 3


def test_one_patients_folder_of_slices_is_not_advised_into_a_slice_level_split(tmp_path):
    src = tmp_path / "one"
    (src / "patient1").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8)).save(src / "patient1" / f"s{i}.png")
    with pytest.raises(KneegenError, match="add other patients' folders beside it") as info:
        prepare_folder(src, tmp_path / "out", prepare_options((16, 16)))
    assert "run kneegen prepare" not in str(info.value)


def test_loose_files_without_akoa_names_are_one_group_each(tmp_path):
    src = tmp_path / "plain"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8)).save(src / f"slice_{i:02d}.png")
    summary = prepare_folder(src, tmp_path / "out", prepare_options((16, 16)))
    assert summary.images == 10 and summary.patients == 10
    assert summary.split_images == {"train": 8, "val": 2, "test": 0}
    assert summary.sides == {"unknown": 10}


def test_sides_are_stratified_across_splits(tmp_path):
    """20 left-knee and 20 right-knee patients at 0.5/0.25/0.25: every split gets both sides equally."""
    src = tmp_path / "knees"
    src.mkdir()
    pixels = np.zeros((8, 8), dtype=np.uint8)
    for n in range(40):
        side = "LEFT" if n < 20 else "RIGHT"
        Image.fromarray(pixels).save(src / f"OAI{9000000 + n}_BaseLine_3_de3d1_SAG_3D_DESS_WE_{side}.nii.gz_1.png")
    for seed in range(3):
        out = tmp_path / f"out{seed}"
        summary = prepare_folder(
            src, out, prepare_options((8, 8), fractions=SplitFractions(0.5, 0.25, 0.25), seed=seed)
        )
        assert {name: c.sides for name, c in summary.splits.items()} == {
            "train": {"LEFT": 10, "RIGHT": 10},
            "val": {"LEFT": 5, "RIGHT": 5},
            "test": {"LEFT": 5, "RIGHT": 5},
        }
        assert_no_leak(out)


def test_both_knees_of_a_patient_stay_in_one_split(tmp_path):
    src = tmp_path / "knees"
    src.mkdir()
    pixels = np.zeros((8, 8), dtype=np.uint8)
    for patient in ("9000001", "9000002", "9000003", "9000004"):
        for side in ("LEFT", "RIGHT"):
            for index in (1, 2):
                name = f"OAI{patient}_BaseLine_3_de3d1_SAG_3D_DESS_WE_{side}.nii.gz_{index}.png"
                Image.fromarray(pixels).save(src / name)
    summary = prepare_folder(src, tmp_path / "out", prepare_options((8, 8), **half_split()))
    assert summary.patients == 4 and summary.volumes == 8
    assert summary.split_images == {"train": 8, "val": 8, "test": 0}
    assert summary.sides == {"LEFT": 8, "RIGHT": 8}
    assert_no_leak(tmp_path / "out")


def test_a_split_that_would_be_empty_is_refused(tmp_path, small_src):
    with pytest.raises(KneegenError, match="2 patients cannot fill the test split"):
        prepare_folder(small_src, tmp_path / "out", prepare_options((16, 16), fractions=SplitFractions(0.8, 0.1, 0.1)))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "fractions, message",
    [
        ((0.7, 0.2, 0.2), "must add up to 1"),
        ((1.0, 0.0, 0.0), "both train and val"),
        ((0.9, 0.2, -0.1), "--test-fraction -0.1: must be between 0 and 1"),
    ],
)
def test_bad_fractions_are_refused(small_src, tmp_path, fractions, message):
    with pytest.raises(KneegenError, match=message):
        prepare_folder(small_src, tmp_path / "out", prepare_options((16, 16), fractions=SplitFractions(*fractions)))


def test_folder_of_only_unreadable_images_is_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(b"")
    (src / "b.png").write_text("text")
    with pytest.raises(KneegenError, match="could be read"):
        prepare_folder(src, tmp_path / "out", prepare_options((16, 16)))


def test_empty_folder_is_refused(tmp_path):
    src = tmp_path / "empty"
    src.mkdir()
    (src / "notes.txt").write_text("no images here")
    with pytest.raises(KneegenError) as info:
        prepare_folder(src, tmp_path / "out", prepare_options((16, 16)))
    assert "no images (PNG/JPG/TIFF) or volumes" in str(info.value) and str(src) in str(info.value)
    assert not (tmp_path / "out").exists()


def test_missing_source_folder_is_refused(tmp_path):
    with pytest.raises(KneegenError, match="not found"):
        prepare_folder(tmp_path / "nope", tmp_path / "out", prepare_options((16, 16)))


def test_preparing_into_an_existing_cache_needs_overwrite(small_src, tmp_path):
    out = tmp_path / "out"
    prepare_folder(small_src, out, prepare_options((16, 16), **half_split()))
    before = (out / "images.npy").read_bytes()
    with pytest.raises(KneegenError, match="--overwrite"):
        prepare_folder(small_src, out, prepare_options((24, 24), **half_split()))
    assert (out / "images.npy").read_bytes() == before
    prepare_folder(small_src, out, prepare_options((24, 24), **half_split()), overwrite=True)
    assert open_cache(out).images.shape == (20, 24, 24)


def test_non_empty_foreign_folder_is_not_clobbered(small_src, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    (out / "images.npy").write_text("named as a cache's array is, yet the user's")
    for overwrite in (False, True):  # --overwrite replaces prepared data only
        with pytest.raises(KneegenError, match="holds no prepared data") as info:
            prepare_folder(small_src, out, prepare_options((16, 16), **half_split()), overwrite=overwrite)
        assert "pass --overwrite" not in str(info.value)
    assert (out / "thesis.tex").read_text() == "precious"
    assert (out / "images.npy").read_text() == "named as a cache's array is, yet the user's"
    assert sorted(p.name for p in out.iterdir()) == ["images.npy", "thesis.tex"]


def test_a_staging_folder_a_killed_prepare_left_is_no_obstacle_and_is_cleared(small_src, tmp_path):
    out = tmp_path / "out"
    (out / ".kneegen.x1y2.partial").mkdir(parents=True)
    (out / ".kneegen.x1y2.partial" / "images.npy").write_bytes(b"half")
    prepare_folder(small_src, out, prepare_options((16, 16), **half_split()))  # no --overwrite needed
    assert sorted(p.name for p in out.iterdir()) == ["images.npy", "manifest.json"]


def test_a_replacement_cut_short_between_its_moves_is_still_replaced_with_overwrite(small_src, tmp_path, monkeypatch):
    out = tmp_path / "out"
    prepare_folder(small_src, out, prepare_options((16, 16), **half_split()))
    rename, moves = os.replace, []

    def cut_after_the_manifest_steps_aside(src, dst):
        moves.append(Path(dst).name)
        if len(moves) == 2:  # the new images.npy: killed here
            raise KeyboardInterrupt
        rename(src, dst)

    monkeypatch.setattr("kneegen.data.cache.os.replace", cut_after_the_manifest_steps_aside)
    with pytest.raises(KeyboardInterrupt):
        prepare_folder(small_src, out, prepare_options((24, 24), **half_split()), overwrite=True)
    monkeypatch.undo()
    assert not (out / "manifest.json").exists()
    with pytest.raises(KneegenError, match="already holds prepared data"):
        prepare_folder(small_src, out, prepare_options((24, 24), **half_split()))
    prepare_folder(small_src, out, prepare_options((24, 24), **half_split()), overwrite=True)
    assert open_cache(out).image_shape == (24, 24)
    assert sorted(p.name for p in out.iterdir()) == ["images.npy", "manifest.json"]


def test_a_cache_behind_a_link_to_another_disk_is_replaced_whole(small_src, tmp_path, monkeypatch):
    """Renames across file systems fail (EXDEV); here every rename that leaves the cache's own
    folder does, as it would were the cache a mount point or a link to another disk."""
    disk = tmp_path / "disk" / "cache"
    prepare_folder(small_src, disk, prepare_options((16, 16), **half_split()))
    link = tmp_path / "link"
    link.symlink_to(disk)
    rename = os.replace

    def within_one_disk(src, dst):
        if Path(dst).resolve().parent != disk.resolve() or disk.resolve() not in Path(src).resolve().parents:
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))
        rename(src, dst)

    monkeypatch.setattr("kneegen.data.cache.os.replace", within_one_disk)
    prepare_folder(small_src, link, prepare_options((24, 24), **half_split()), overwrite=True)
    assert open_cache(link).image_shape == (24, 24)
    assert sorted(p.name for p in disk.iterdir()) == ["images.npy", "manifest.json"]


def test_a_single_patient_cannot_be_split(tmp_path, phantom_src):
    src = tmp_path / "one"
    src.mkdir()
    for path in sorted(phantom_src.glob("*.png"))[:10]:
        shutil.copy(path, src / path.name)
    assert len({parse_akoa_name(p.name).patient for p in src.iterdir()}) == 1
    with pytest.raises(KneegenError, match="1 patients cannot fill the val split"):
        prepare_folder(src, tmp_path / "out", prepare_options((16, 16)))


@pytest.mark.parametrize(
    "failure",
    [KeyboardInterrupt, lambda: OSError(errno.ENOSPC, "No space left on device")],
    ids=["ctrl-c", "disk-full"],
)
def test_a_failure_while_replacing_a_cache_leaves_the_old_cache_whole(small_src, tmp_path, monkeypatch, failure):
    out = tmp_path / "out"
    prepare_folder(small_src, out, prepare_options((16, 16), **half_split()))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(*args, **kwargs):
        raise failure()  # halfway through writing the new images.npy

    monkeypatch.setattr("kneegen.data.cache.np.save", crash)
    with pytest.raises((KeyboardInterrupt, OSError)):
        prepare_folder(small_src, out, prepare_options((24, 24), **half_split()), overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert open_cache(out).image_shape == (16, 16)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no half-written folder inside it


SLOW_PREPARE = """
import sys, time
import kneegen.data.prepare as prepare
from kneegen.cli import main

read = prepare.read_input

def read_slowly(task):  # forked workers find it in __main__ too
    open(MARKER, "a").close()  # reading has begun
    time.sleep(SECONDS)
    return read(task)

MARKER, SECONDS = sys.argv.pop(1), float(sys.argv.pop(1))
prepare.read_input = read_slowly
sys.argv[0] = "kneegen"
main()
"""

POSIX_PROCESS_GROUPS = pytest.mark.skipif(
    not Path("/proc/self/task").is_dir(), reason="needs process groups and /proc (Linux)"
)


def start_slow_prepare(phantom_src: Path, tmp_path: Path, seconds_per_input: float) -> tuple[subprocess.Popen, Path]:
    """The real CLI preparing with two worker processes, in a session of its own (so a signal can
    reach the whole process group, as a terminal's Ctrl-C does); returns once reading has begun."""
    marker, out = tmp_path / "reading", tmp_path / "out"
    command = [sys.executable, "-c", SLOW_PREPARE, marker, seconds_per_input, "prepare", phantom_src, "--out", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    process = subprocess.Popen(
        [str(part) for part in [*command, "--workers", 2]],
        env=env,
        start_new_session=True,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return process, out


def worker_pids(process: subprocess.Popen) -> list[int]:
    return [int(pid) for pid in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()]


def finish(process: subprocess.Popen) -> str:
    """Its stderr once it ends; killed (and the test failed) if it hangs."""
    try:
        return process.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise


@pytest.mark.slow
@POSIX_PROCESS_GROUPS
@pytest.mark.parametrize("presses", [1, 3])
def test_ctrl_c_while_worker_processes_read_stops_at_once(phantom_src, tmp_path, presses):
    """Ctrl-C (once, or again while it stops) amid half-second reads of 30 inputs per worker:
    status 130 within seconds, one line, no traceback, no cache, and no worker left running."""
    process, out = start_slow_prepare(phantom_src, tmp_path, seconds_per_input=0.5)
    workers = worker_pids(process)
    pressed = time.monotonic()
    for _ in range(presses):
        os.killpg(process.pid, signal.SIGINT)
        time.sleep(0.05)
    stderr = finish(process)
    assert process.returncode in (130, -signal.SIGINT), stderr  # a shell shows either as 130
    assert time.monotonic() - pressed < 5  # reading on would take 15 s
    assert "Traceback" not in stderr and "interrupted" in stderr
    assert not (out / "manifest.json").exists()
    time.sleep(1.5)  # a worker's input (0.5 s) is read by now: an orphan would still be running
    assert workers and not [pid for pid in workers if Path(f"/proc/{pid}").exists()]


@pytest.mark.slow
@POSIX_PROCESS_GROUPS
def test_a_worker_leaves_ctrl_c_to_the_main_process(phantom_src, tmp_path):
    """A worker killed mid-chunk by SIGINT breaks the pool, and racing its shutdown can hang it:
    workers ignore the signal, so one that reaches the workers alone changes nothing."""
    process, out = start_slow_prepare(phantom_src, tmp_path, seconds_per_input=0.05)
    workers = worker_pids(process)
    assert workers
    for pid in workers:
        os.kill(pid, signal.SIGINT)
    stderr = finish(process)
    assert process.returncode == 0, stderr
    assert open_cache(out).images.shape[0] == PHANTOM_IMAGES
