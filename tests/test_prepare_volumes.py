"""`prepare` on volumes: NIfTI files, DICOM series, a real MRI and PNG slices in one folder.

Every input kind goes through the same split, so the leak check covers them all together.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from kneegen.data.cache import open_cache
from kneegen.data.prepare import prepare_folder
from kneegen.data.splits import SplitFractions
from kneegen.errors import KneegenError

from helpers import prepare_options
from test_volumes import NIBABEL_DATA, nib, save_nifti, synthetic_knee, write_series

SIZE = (16, 16)
FIFTHS = SplitFractions(0.6, 0.2, 0.2)


@pytest.fixture()
def mixed_src(tmp_path: Path, phantom_src: Path) -> Path:
    """3 AKOA-named NIfTI knees, a DICOM series, nibabel's real brain MRI and 2 PNG patients."""
    src = tmp_path / "mixed"
    (src / "nifti").mkdir(parents=True)
    for n, side in enumerate(("LEFT", "RIGHT", "LEFT")):
        name = f"OAI900000{n}_BaseLine_3_de3d1_SAG_3D_DESS_WE_{side}.nii.gz"
        save_nifti(src / "nifti" / name, synthetic_knee() * (1 + n), stored_as="LAS")
    write_series(src / "dicom_P001", "sagittal")
    shutil.copy(NIBABEL_DATA / "anatomical.nii", src / "anatomical.nii")
    (src / "png").mkdir()
    for path in sorted(phantom_src.glob("*.png"))[:20]:  # 2 patients of 10 slices
        shutil.copy(path, src / "png" / path.name)
    return src


def test_every_input_kind_lands_in_the_cache_without_leaks(mixed_src, tmp_path):
    out = tmp_path / "out"
    summary = prepare_folder(mixed_src, out, prepare_options(SIZE, fractions=FIFTHS))
    manifest = json.loads((out / "manifest.json").read_text())
    records = manifest["slices"]

    # 3 NIfTI patients + DICOM P001 + "anatomical" + 2 phantom patients; volumes: 5 + 2 knees.
    assert summary.patients == 7 and summary.volumes == 7
    assert summary.split_patients == {"train": 4, "val": 2, "test": 1}  # 4.2, 1.4, 1.4 by largest remainder
    for key in ("patient", "volume"):
        owners: dict[str, set[str]] = {}
        for record in records:
            owners.setdefault(record[key], set()).add(record["split"])
        assert all(len(splits) == 1 for splits in owners.values()), owners

    # 16-bit volumes make the whole cache 16-bit; the 8-bit PNGs are widened, not the reverse.
    data = open_cache(out)
    assert summary.dtype == "uint16" and data.images.dtype == np.uint16 and data.images.shape[1:] == SIZE
    assert {Path(v["path"]).name for v in manifest["volumes"]} == {
        "OAI9000000_BaseLine_3_de3d1_SAG_3D_DESS_WE_LEFT.nii.gz",
        "OAI9000001_BaseLine_3_de3d1_SAG_3D_DESS_WE_RIGHT.nii.gz",
        "OAI9000002_BaseLine_3_de3d1_SAG_3D_DESS_WE_LEFT.nii.gz",
        "dicom_P001",
        "anatomical.nii",
    }
    real = next(v for v in manifest["volumes"] if v["path"] == "anatomical.nii")
    canonical = nib.as_closest_canonical(nib.load(NIBABEL_DATA / "anatomical.nii")).get_fdata()
    assert real["window"] == pytest.approx(list(np.percentile(canonical, (0.5, 99.5))), rel=1e-6)
    assert real["slices"] == sum(r["path"] == "anatomical.nii" for r in records) > 10
    assert manifest["options"]["percentiles"] == [0.5, 99.5] and manifest["options"]["axis"] == "sagittal"
    assert {r["side"] for r in records if r["patient"] == "9000001"} == {"RIGHT"}


def test_bad_volumes_are_skipped_with_reasons_or_stop_the_run_with_strict(mixed_src, tmp_path):
    broken = synthetic_knee()
    broken[0, 0, :3] = np.nan
    save_nifti(mixed_src / "with_nans.nii.gz", broken)
    shutil.copy(NIBABEL_DATA / "example4d.nii.gz", mixed_src / "fmri.nii.gz")
    summary = prepare_folder(mixed_src, tmp_path / "out", prepare_options(SIZE, fractions=FIFTHS))
    reasons = dict(summary.skipped)
    assert "3 NaN" in reasons["with_nans.nii.gz"] and "4-D" in reasons["fmri.nii.gz"]
    assert summary.patients == 7  # the good inputs are all still there

    with pytest.raises(KneegenError, match=r"fmri\.nii\.gz.*4-D.*--strict"):
        prepare_folder(mixed_src, tmp_path / "strict", prepare_options(SIZE, fractions=FIFTHS, strict=True))
    assert not (tmp_path / "strict").exists()


def patched_nifti(path: Path, *patches: tuple[int, str, tuple[float, ...]]) -> Path:
    """A small good .nii whose header bytes are then overwritten, as damage would: (offset, layout, values)."""
    nib.save(nib.Nifti1Image(synthetic_knee(), np.eye(4)), path)
    header = bytearray(path.read_bytes())
    for offset, layout, values in patches:
        struct.pack_into(layout, header, offset, *values)
    path.write_bytes(bytes(header))
    return path


def test_headers_a_library_chokes_on_are_skipped_not_fatal(mixed_src, tmp_path):
    """Whatever a damaged file makes nibabel or numpy raise costs that file only."""
    # qform_code 0 and sform_code 1 at byte 252, the sform's first row (srow_x) at 280: NaN.
    patched_nifti(mixed_src / "nan_affine.nii", (252, "<hh", (0, 1)), (280, "<4f", (float("nan"), 0, 0, 0)))
    patched_nifti(mixed_src / "huge.nii", (40, "<4h", (3, 30000, 30000, 30000)))  # dim: 27e12 voxels claimed
    summary = prepare_folder(mixed_src, tmp_path / "out", prepare_options(SIZE, fractions=FIFTHS))
    reasons = dict(summary.skipped)
    assert "LinAlgError" in reasons["nan_affine.nii"] and "\n" not in reasons["nan_affine.nii"]
    assert "its header describes 98.2 TiB of voxels" in reasons["huge.nii"]  # 27e12 float32 voxels
    assert summary.patients == 7
    with pytest.raises(KneegenError, match=r"huge\.nii: its header describes.*--strict"):
        prepare_folder(mixed_src, tmp_path / "strict", prepare_options(SIZE, fractions=FIFTHS, strict=True))


def test_coronal_axis_and_window_reach_the_reader(mixed_src, tmp_path):
    sagittal = prepare_folder(mixed_src, tmp_path / "s", prepare_options(SIZE, fractions=FIFTHS))
    coronal = prepare_folder(
        mixed_src, tmp_path / "c", prepare_options(SIZE, fractions=FIFTHS, axis="coronal", percentiles=(5.0, 95.0))
    )
    assert sagittal.images != coronal.images  # other slice counts along another axis
    real = next(
        v for v in json.loads((tmp_path / "c/manifest.json").read_text())["volumes"] if v["path"] == "anatomical.nii"
    )
    canonical = nib.as_closest_canonical(nib.load(NIBABEL_DATA / "anatomical.nii")).get_fdata()
    assert real["window"] == pytest.approx(list(np.percentile(canonical, (5.0, 95.0))), rel=1e-6)


def test_missing_volume_readers_stop_the_run_with_the_extra_to_install(mixed_src, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.raises(KneegenError, match=r"pip install 'kneegen\[volumes\]'"):
        prepare_folder(mixed_src, tmp_path / "out", prepare_options(SIZE, fractions=FIFTHS))
    assert not (tmp_path / "out").exists()


def test_volumes_named_by_neither_file_nor_header_take_the_patient_folder_at_the_top(tmp_path):
    """BIDS-like `sub-XX/ses-Y/anat/…`: two sessions of one subject are one patient, in one split."""
    src = tmp_path / "bids"
    for subject in ("sub-01", "sub-02", "sub-03"):
        for session in ("ses-1", "ses-2"):
            (src / subject / session / "anat").mkdir(parents=True)
            save_nifti(src / subject / session / "anat" / f"{subject}_{session}_T2w.nii.gz", synthetic_knee())
    summary = prepare_folder(src, tmp_path / "out", prepare_options(SIZE, fractions=FIFTHS))
    assert summary.patients == 3 and summary.volumes == 6
    splits: dict[str, set[str]] = {}
    for record in json.loads((tmp_path / "out" / "manifest.json").read_text())["slices"]:
        splits.setdefault(record["patient"], set()).add(record["split"])
    assert sorted(splits) == ["file:sub-01", "file:sub-02", "file:sub-03"]
    assert all(len(where) == 1 for where in splits.values())


def test_a_source_that_is_itself_one_dicom_series_is_one_input(tmp_path):
    write_series(tmp_path / "series", "sagittal")
    with pytest.raises(KneegenError, match="1 patients cannot fill"):  # one series: one patient, no split
        prepare_folder(tmp_path / "series", tmp_path / "out", prepare_options(SIZE, fractions=FIFTHS))
