"""AKOA names and `prepare_folder`: the patient-level split, the cache, and unreadable files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kneegen.data.akoa import SliceName, parse_akoa_name
from kneegen.data.cache import open_cache
from kneegen.data.prepare import load_slice, prepare_folder
from kneegen.errors import KneegenError

from conftest import IMAGE_SIZE, PHANTOM_IMAGES

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


def test_patient_never_in_both_splits(prepared):
    records = manifest(prepared)["slices"]
    assert len(records) == PHANTOM_IMAGES
    splits_of: dict[str, set[str]] = {}
    for record in records:
        parsed = parse_akoa_name(Path(record["path"]).name)
        assert parsed is not None and parsed.patient == record["patient"]
        splits_of.setdefault(record["patient"], set()).add(record["split"])
    assert all(len(splits) == 1 for splits in splits_of.values()), splits_of
    assert {next(iter(s)) for s in splits_of.values()} == {"train", "val"}
    assert len(splits_of) == 6
    assert manifest(prepared)["patients"] == {p: next(iter(s)) for p, s in splits_of.items()}


def test_split_views_have_the_right_counts_shape_and_dtype(prepared):
    data = open_cache(prepared)
    records = manifest(prepared)["slices"]
    counts = {name: sum(r["split"] == name for r in records) for name in ("train", "val")}
    assert counts == {"train": 50, "val": 10}  # 6 patients of 10 slices, round(0.2 · 6) = 1 held out
    assert data.images.shape == (PHANTOM_IMAGES, IMAGE_SIZE, IMAGE_SIZE)
    assert data.image_shape == (IMAGE_SIZE, IMAGE_SIZE)
    for name, count in counts.items():
        view = data.split(name)
        assert view.shape == (count, IMAGE_SIZE, IMAGE_SIZE)
        assert view.dtype == np.uint8
        assert np.shares_memory(view, data.images)  # a view, not a copy
    # Train first, then val; the manifest records are in cache order.
    assert [r["split"] for r in records] == ["train"] * 50 + ["val"] * 10


def test_cache_image_i_is_the_file_of_record_i(prepared, phantom_src):
    data = open_cache(prepared)
    records = manifest(prepared)["slices"]
    for i in [0, 17, 49, 50, 59]:
        expected = load_slice(phantom_src / records[i]["path"], (IMAGE_SIZE, IMAGE_SIZE))
        np.testing.assert_array_equal(data.images[i], expected)
    assert data.images.std() > 10  # resized anatomy, not a blank image


def test_split_is_deterministic_for_a_seed_and_changes_with_it(phantom_src, tmp_path):
    a = prepare_folder(phantom_src, tmp_path / "a", (16, 16), 0.5, seed=4, overwrite=False)
    b = prepare_folder(phantom_src, tmp_path / "b", (16, 16), 0.5, seed=4, overwrite=False)
    assert manifest(tmp_path / "a")["patients"] == manifest(tmp_path / "b")["patients"]
    assert a.split_patients == {"train": 3, "val": 3}
    assignments = {json.dumps(manifest(tmp_path / "a")["patients"], sort_keys=True)}
    for seed in range(5, 9):
        prepare_folder(phantom_src, tmp_path / f"s{seed}", (16, 16), 0.5, seed=seed, overwrite=False)
        assignments.add(json.dumps(manifest(tmp_path / f"s{seed}")["patients"], sort_keys=True))
    assert len(assignments) > 1
    assert b.images == PHANTOM_IMAGES


def test_non_square_size_is_height_by_width(phantom_src, tmp_path):
    summary = prepare_folder(phantom_src, tmp_path / "c", (16, 24), 0.2, seed=0, overwrite=False)
    assert summary.image_shape == (16, 24)
    assert open_cache(tmp_path / "c").images.shape == (PHANTOM_IMAGES, 16, 24)


@pytest.fixture()
def small_src(phantom_src: Path, tmp_path: Path) -> Path:
    """20 phantom slices (2 patients) copied into a folder the test may add files to."""
    src = tmp_path / "src"
    src.mkdir()
    for path in sorted(phantom_src.glob("*.png"))[:20]:
        shutil.copy(path, src / path.name)
    return src


def test_unreadable_files_are_skipped_and_reported(small_src, tmp_path):
    (small_src / "empty.png").write_bytes(b"")
    (small_src / "notes.png").write_text("these are my notes, not an image\n")
    (small_src / "readme.txt").write_text("ignored: not an image suffix\n")
    out = tmp_path / "out"
    summary = prepare_folder(small_src, out, (16, 16), 0.5, seed=0, overwrite=False)
    assert summary.images == 20
    skipped = {Path(path).name: reason for path, reason in summary.skipped}
    assert set(skipped) == {"empty.png", "notes.png"}
    assert all("unreadable" in reason for reason in skipped.values())
    recorded = {Path(item["path"]).name for item in manifest(out)["skipped"]}
    assert recorded == {"empty.png", "notes.png"}
    assert open_cache(out).images.shape == (20, 16, 16)


def test_folder_of_only_unreadable_images_is_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(b"")
    (src / "b.png").write_text("text")
    with pytest.raises(KneegenError, match="could be read"):
        prepare_folder(src, tmp_path / "out", (16, 16), 0.5, seed=0, overwrite=False)


def test_empty_folder_is_refused(tmp_path):
    src = tmp_path / "empty"
    src.mkdir()
    with pytest.raises(KneegenError) as info:
        prepare_folder(src, tmp_path / "out", (16, 16), 0.2, seed=0, overwrite=False)
    assert "no PNG/JPG images" in str(info.value) and str(src) in str(info.value)
    assert not (tmp_path / "out").exists()


def test_missing_source_folder_is_refused(tmp_path):
    with pytest.raises(KneegenError, match="not found"):
        prepare_folder(tmp_path / "nope", tmp_path / "out", (16, 16), 0.2, seed=0, overwrite=False)


def test_preparing_into_an_existing_cache_needs_overwrite(small_src, tmp_path):
    out = tmp_path / "out"
    prepare_folder(small_src, out, (16, 16), 0.5, seed=0, overwrite=False)
    before = (out / "images.npy").read_bytes()
    with pytest.raises(KneegenError, match="--overwrite"):
        prepare_folder(small_src, out, (24, 24), 0.5, seed=0, overwrite=False)
    assert (out / "images.npy").read_bytes() == before
    prepare_folder(small_src, out, (24, 24), 0.5, seed=0, overwrite=True)
    assert open_cache(out).images.shape == (20, 24, 24)


def test_non_empty_foreign_folder_is_not_clobbered(small_src, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(KneegenError, match="not empty"):
        prepare_folder(small_src, out, (16, 16), 0.5, seed=0, overwrite=False)
    assert (out / "thesis.tex").read_text() == "precious"


def test_files_without_akoa_names_are_one_group_each(tmp_path):
    src = tmp_path / "plain"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"slice_{i:02d}.png" for i in range(8)] + ["sub/slice_00.png", "sub/other.jpg"]
    for name in names:
        Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8)).save(src / name)
    summary = prepare_folder(src, tmp_path / "out", (16, 16), 0.2, seed=0, overwrite=False)
    assert summary.images == 10
    assert summary.patients == 10  # sub/slice_00.png is not slice_00.png
    assert summary.split_images == {"train": 8, "val": 2}
    records = manifest(tmp_path / "out")["slices"]
    assert {r["patient"] for r in records} == {f"file:{name}" for name in names}
    assert all(r["side"] is None and r["slice"] is None for r in records)
    assert summary.sides == {"unknown": 10}


def test_both_knees_of_a_patient_stay_in_one_split(tmp_path):
    src = tmp_path / "knees"
    src.mkdir()
    pixels = np.zeros((8, 8), dtype=np.uint8)
    for patient in ("9000001", "9000002", "9000003", "9000004"):
        for side in ("LEFT", "RIGHT"):
            for index in (1, 2):
                name = f"OAI{patient}_BaseLine_3_de3d1_SAG_3D_DESS_WE_{side}.nii.gz_{index}.png"
                Image.fromarray(pixels).save(src / name)
    summary = prepare_folder(src, tmp_path / "out", (8, 8), 0.5, seed=0, overwrite=False)
    assert summary.patients == 4 and summary.split_images == {"train": 8, "val": 8}
    assert summary.sides == {"LEFT": 8, "RIGHT": 8}
    by_patient: dict[str, set[str]] = {}
    for record in manifest(tmp_path / "out")["slices"]:
        by_patient.setdefault(record["patient"], set()).add(record["split"])
    assert all(len(s) == 1 for s in by_patient.values())


def test_a_single_patient_cannot_be_split(tmp_path, phantom_src):
    src = tmp_path / "one"
    src.mkdir()
    for path in sorted(phantom_src.glob("*.png"))[:10]:
        shutil.copy(path, src / path.name)
    assert len({parse_akoa_name(p.name).patient for p in src.iterdir()}) == 1
    with pytest.raises(KneegenError, match="at least 2"):
        prepare_folder(src, tmp_path / "out", (16, 16), 0.2, seed=0, overwrite=False)


def test_open_cache_explains_a_missing_or_foreign_folder(tmp_path):
    with pytest.raises(KneegenError, match="kneegen prepare"):
        open_cache(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(KneegenError, match="manifest.json"):
        open_cache(tmp_path / "plain")
