"""NIfTI and DICOM volumes → slices: orientation, windowing, near-empty slices and bad input."""

from __future__ import annotations

import os
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from kneegen.data.prepare import find_inputs
from kneegen.data.volumes import AXES, find_volumes, read_volume_slices
from kneegen.errors import KneegenError

nib = pytest.importorskip("nibabel")
pydicom = pytest.importorskip("pydicom")

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
X, Y, Z = 12, 14, 16  # RAS shape of the synthetic knee: every axis a different length
MARKER = (4, Y - 2, Z - 2)  # x, y, z: left of centre, anterior, superior; outside the ellipsoid


def synthetic_knee() -> np.ndarray:
    """(X, Y, Z) float32 in RAS: a graded ellipsoid on zero, and one bright marker voxel."""
    x, y, z = np.meshgrid(np.arange(X), np.arange(Y), np.arange(Z), indexing="ij")
    inside = ((x - 6) / 4.5) ** 2 + ((y - 6.5) / 5) ** 2 + ((z - 7.5) / 6) ** 2 <= 1
    volume = np.where(inside, 100.0 + 3 * y + 5 * z, 0.0).astype(np.float32)
    volume[MARKER] = 5000.0
    return volume


def save_nifti(path: Path, ras: np.ndarray, stored_as: str = "RAS") -> Path:
    """Save a RAS array as a file whose voxel axes are stored in another orientation.

    LAS: x flipped; SLA: axes (z, flipped x, y). The affine says where each voxel really is.
    """
    if stored_as == "RAS":
        stored, affine = ras, np.eye(4)
    elif stored_as == "LAS":
        stored = np.flip(ras, 0)  # stored[i, j, k] = ras[X-1-i, j, k]
        affine = np.array([[-1, 0, 0, X - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
    else:  # SLA
        stored = np.flip(ras, 0).transpose(2, 0, 1)  # stored[i, j, k] = ras[X-1-j, k, i]
        affine = np.array([[0, -1, 0, X - 1], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
    image = nib.Nifti1Image(np.ascontiguousarray(stored), affine)
    assert "".join(nib.aff2axcodes(image.affine)) == stored_as
    nib.save(image, path)
    return path


def upright(plane: np.ndarray) -> np.ndarray:
    """The display convention: rows from high to low second axis, columns from high to low first."""
    return plane.T[::-1, ::-1]


def windowed(volume: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    low, high = np.percentile(volume, percentiles)
    return np.rint(np.clip((volume - low) / (high - low), 0, 1) * 65535)


def assert_one_line_naming(excinfo: pytest.ExceptionInfo, path: Path) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    assert str(path) in message
    return message


# --- Orientation ------------------------------------------------------------------------------


@pytest.mark.parametrize("stored_as", ["RAS", "LAS", "SLA"])
@pytest.mark.parametrize(
    "axis, index, row_col, image_shape",
    [
        # Sagittal: superior at the top, anterior on the left.
        ("sagittal", MARKER[0], (Z - 1 - MARKER[2], Y - 1 - MARKER[1]), (Z, Y)),
        # Coronal: superior at the top, the patient's right on the left.
        ("coronal", MARKER[1], (Z - 1 - MARKER[2], X - 1 - MARKER[0]), (Z, X)),
        # Axial: anterior at the top, the patient's right on the left.
        ("axial", MARKER[2], (Y - 1 - MARKER[1], X - 1 - MARKER[0]), (Y, X)),
    ],
)
def test_slices_follow_ras_axes_whatever_the_stored_orientation(tmp_path, stored_as, axis, index, row_col, image_shape):
    path = save_nifti(tmp_path / "knee.nii.gz", synthetic_knee(), stored_as)
    result = read_volume_slices(path, axis=axis, min_foreground=0.0)

    assert result.shape == (X, Y, Z)
    images = dict(result.slices)
    assert all(image.shape == image_shape and image.dtype == np.uint16 for image in images.values())
    assert images[index][row_col] == 65535  # the marker, where the convention puts it
    assert all(images[i][row_col] == 0 for i in images if i != index)


def test_whole_slices_match_the_canonical_volume(tmp_path):
    ras = synthetic_knee()
    result = read_volume_slices(save_nifti(tmp_path / "knee.nii", ras, "SLA"), axis="sagittal", min_foreground=0.0)

    expected = windowed(ras)
    assert [i for i, _ in result.slices] == list(range(X))
    for index, image in result.slices:
        assert np.abs(image.astype(int) - upright(expected[index])).max() <= 1


def test_unknown_axis_lists_the_known_ones(tmp_path):
    path = save_nifti(tmp_path / "knee.nii.gz", synthetic_knee())
    with pytest.raises(KneegenError) as excinfo:
        read_volume_slices(path, axis="transverse")
    message = assert_one_line_naming(excinfo, path)
    assert all(name in message for name in AXES)


# --- Windowing and near-empty slices ----------------------------------------------------------


def test_window_maps_percentiles_to_the_uint16_range(tmp_path):
    ras = np.random.default_rng(0).normal(300.0, 50.0, size=(X, Y, Z)).astype(np.float32)
    result = read_volume_slices(save_nifti(tmp_path / "noise.nii.gz", ras), percentiles=(2.0, 98.0), min_foreground=0.0)

    low, high = np.percentile(ras, (2.0, 98.0))
    assert result.window == pytest.approx((low, high), rel=1e-6)
    volume = np.stack([image[::-1, ::-1].T for _, image in result.slices])  # back to (X, Y, Z)
    assert np.all(volume[ras <= low] == 0)
    assert np.all(volume[ras >= high] == 65535)
    assert np.abs(volume.astype(int) - windowed(ras, (2.0, 98.0))).max() <= 1


def test_empty_border_slices_are_skipped_and_counted(tmp_path):
    ras = np.zeros((X, Y, Z), dtype=np.float32)
    ras[3:9] = np.linspace(500, 1500, Y * Z, dtype=np.float32).reshape(Y, Z)  # a slab filling x = 3..8
    path = save_nifti(tmp_path / "slab.nii.gz", ras, "LAS")

    sagittal = read_volume_slices(path, axis="sagittal")
    assert [i for i, _ in sagittal.slices] == [3, 4, 5, 6, 7, 8]
    assert sagittal.skipped_empty == X - 6
    axial = read_volume_slices(path, axis="axial")  # every axial slice crosses the slab
    assert (len(axial.slices), axial.skipped_empty) == (Z, 0)


def test_slice_needs_enough_pixels_above_five_percent_of_the_window(tmp_path):
    ras = np.zeros((4, 10, 10), dtype=np.float32)  # sagittal slices of 100 pixels
    ras[0].flat[:4] = 1000.0  # 4 % bright ...
    ras[0].flat[4:14] = 40.0  # ... and 10 % at 4 % of the window: too dim to count
    ras[1].flat[:6] = 60.0  # 6 % at 6 % of the window: enough
    ras[2] = 1000.0
    result = read_volume_slices(save_nifti(tmp_path / "edge.nii", ras), min_foreground=0.05)

    assert result.window == (0.0, 1000.0)
    assert [i for i, _ in result.slices] == [1, 2]
    assert result.skipped_empty == 2


def test_constant_volume_is_refused(tmp_path):
    path = save_nifti(tmp_path / "flat.nii.gz", np.full((X, Y, Z), 7.0, dtype=np.float32))
    with pytest.raises(KneegenError, match="constant") as excinfo:
        read_volume_slices(path)
    assert_one_line_naming(excinfo, path)


# --- Names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, patient, side",
    [
        ("OAI9014797_BaseLine_3_de3d1_SAG_3D_DESS_WE_LEFT.nii.gz", "9014797", "LEFT"),
        ("OAI9014797_BaseLine_3_de3d1_SAG_3D_DESS_WE_R_I_G_H_T.nii", "9014797", "RIGHT"),
        ("knee01.nii.gz", None, None),  # prepare takes its folder as the patient
    ],
)
def test_patient_and_side_come_from_akoa_names(tmp_path, name, patient, side):
    result = read_volume_slices(save_nifti(tmp_path / name, synthetic_knee()))
    assert (result.patient, result.side) == (patient, side)


def test_find_volumes_lists_nifti_files_and_one_entry_per_dicom_folder(tmp_path):
    for relative in ["a.nii", "sub/b.NII.GZ", "series/1.dcm", "series/2.dcm", "sub/deeper/3.dcm", "notes.txt", "c.png"]:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"")
    found = find_volumes(tmp_path)
    assert found == [tmp_path / "a.nii", tmp_path / "series", tmp_path / "sub/b.NII.GZ", tmp_path / "sub/deeper"]


# --- DICOM ------------------------------------------------------------------------------------

ROWS, COLUMNS, N_SLICES = 10, 12, 6
SLOPE, INTERCEPT = 2.0, -100.0
PLANES = {  # ImageOrientationPatient (row direction, column direction) of the standard planes, LPS
    "axial": [1, 0, 0, 0, 1, 0],
    "coronal": [1, 0, 0, 0, 0, -1],
    "sagittal": [0, 1, 0, 0, 0, -1],
}


def write_dicom(path: Path, pixels: np.ndarray, instance: int, series: str, **attributes) -> None:
    """One uncompressed 16-bit MR slice with the geometry and rescale attributes given."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.PatientID = "P001"
    ds.Laterality = "R"
    ds.SeriesInstanceUID = series
    ds.InstanceNumber = instance
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 2.0
    ds.RescaleSlope = SLOPE
    ds.RescaleIntercept = INTERCEPT
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    for name, value in attributes.items():
        setattr(ds, name, value)
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_series(folder: Path, plane: str, with_positions: bool = True) -> tuple[list[np.ndarray], np.ndarray]:
    """Slices k = 0..N-1 at 2.5 mm·k along the plane's normal, written in a shuffled order.

    File names and InstanceNumbers are shuffled independently, so only the positions tell the
    true order (unless `with_positions` is False: then InstanceNumber follows k).
    Returns the stored images and each slice's position (LPS, mm).
    """
    folder.mkdir()
    rng = np.random.default_rng(1)
    orientation = PLANES[plane]
    normal = np.cross(orientation[:3], orientation[3:])
    images = [rng.integers(100, 1000, size=(ROWS, COLUMNS)).astype(np.uint16) for _ in range(N_SLICES)]
    positions = np.array([[10.0, -20.0, 30.0] + 2.5 * k * normal for k in range(N_SLICES)])
    names, instances = rng.permutation(N_SLICES), rng.permutation(N_SLICES) + 1
    for k in range(N_SLICES):
        geometry = {"ImageOrientationPatient": orientation}
        if with_positions:
            geometry["ImagePositionPatient"] = list(positions[k])
        instance = int(instances[k]) if with_positions else k + 1
        write_dicom(folder / f"IM{names[k]:03d}.dcm", images[k], instance, "1.2.3.4", **geometry)
    return images, positions


@pytest.mark.parametrize("plane", list(PLANES))
def test_dicom_series_comes_back_as_acquired_in_position_order(tmp_path, plane):
    images, positions = write_series(tmp_path / "series", plane)
    result = read_volume_slices(tmp_path / "series", axis=plane, min_foreground=0.0)

    # Order: by the RAS coordinate along the plane's axis (DICOM's x and y point the other way).
    ras_coordinate = (positions * [-1, -1, 1])[:, AXES.index(plane)]
    order = np.argsort(ras_coordinate)
    physical = np.stack([images[k].astype(np.float64) * SLOPE + INTERCEPT for k in order])
    expected = windowed(physical)
    assert [i for i, _ in result.slices] == list(range(N_SLICES))
    assert result.window == pytest.approx(tuple(np.percentile(physical, (0.5, 99.5))))
    for (_, image), want in zip(result.slices, expected):
        assert image.shape == (ROWS, COLUMNS)
        assert np.abs(image.astype(int) - want).max() <= 1
    assert (result.patient, result.side) == ("P001", "RIGHT")


def test_dicom_without_positions_is_ordered_by_instance_number(tmp_path):
    images, _ = write_series(tmp_path / "series", "axial", with_positions=False)
    result = read_volume_slices(tmp_path / "series", axis="axial", min_foreground=0.0)

    expected = windowed(np.stack([image * SLOPE + INTERCEPT for image in images]))
    assert all(np.abs(image.astype(int) - want).max() <= 1 for (_, image), want in zip(result.slices, expected))


def test_folder_with_two_series_is_refused(tmp_path):
    images, _ = write_series(tmp_path / "series", "axial")
    write_dicom(tmp_path / "series" / "other.dcm", images[0], 1, "9.9.9", ImageOrientationPatient=PLANES["axial"])
    with pytest.raises(KneegenError, match="2 series") as excinfo:
        read_volume_slices(tmp_path / "series")
    assert_one_line_naming(excinfo, tmp_path / "series")


def test_dicom_files_without_a_suffix_are_a_series_by_their_marker(tmp_path):
    """Many exports (OAI's among them) name DICOM files 001, 002, …: the DICM marker finds them."""
    write_series(tmp_path / "named", "sagittal")
    shutil.copytree(tmp_path / "named", tmp_path / "bare" / "series")
    for path in (tmp_path / "bare" / "series").glob("*.dcm"):
        path.rename(path.with_suffix(""))
    (tmp_path / "bare" / "series" / "README").write_text("not a slice")
    items, _ = find_inputs(tmp_path / "bare")
    assert [(item.name, item.reader.name) for item in items] == [("series", "dicom")]
    bare = read_volume_slices(tmp_path / "bare" / "series", min_foreground=0.0)
    named = read_volume_slices(tmp_path / "named", min_foreground=0.0)
    assert len(bare.slices) == len(named.slices) == N_SLICES
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(bare.slices, named.slices))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_named_pipe_is_not_opened_to_look_for_a_marker(tmp_path):
    (tmp_path / "src").mkdir()
    write_series(tmp_path / "src" / "series", "axial")
    os.mkfifo(tmp_path / "pipe")  # opened for reading, it would wait for a writer
    (tmp_path / "src" / "series" / "feed").symlink_to(tmp_path / "pipe")  # a link is listed, a FIFO is not
    found: list = []
    looking = threading.Thread(target=lambda: found.append(find_inputs(tmp_path / "src")), daemon=True)
    looking.start()
    looking.join(timeout=20)
    assert found and [item.name for item in found[0][0]] == ["series"]


def test_a_non_dicom_file_in_a_series_is_named_without_pydicoms_force_advice(tmp_path):
    write_series(tmp_path / "series", "axial")
    (tmp_path / "series" / "notes.dcm").write_text("not a DICOM file")
    with pytest.raises(KneegenError, match="not a DICOM file") as excinfo:
        read_volume_slices(tmp_path / "series")
    assert_one_line_naming(excinfo, tmp_path / "series" / "notes.dcm")
    assert "force" not in str(excinfo.value)


def test_a_dicom_without_pixel_data_is_named_as_such(tmp_path):
    images, _ = write_series(tmp_path / "series", "axial")
    path = next((tmp_path / "series").glob("*.dcm"))
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    with pytest.raises(KneegenError, match="holds no pixel data") as excinfo:
        read_volume_slices(tmp_path / "series")
    assert "decoders" not in str(excinfo.value)


@pytest.mark.parametrize("orientation", [[0.0, 1.0, 0.0], [0.0] * 6], ids=["three numbers", "zero vectors"])
def test_an_image_orientation_that_is_no_pair_of_unit_vectors_is_named(tmp_path, orientation):
    folder = tmp_path / "series"
    folder.mkdir()
    image = np.full((ROWS, COLUMNS), 500, np.uint16)
    for k in range(3):
        position = [0.0, 0.0, 2.5 * k]
        write_dicom(
            folder / f"{k}.dcm",
            image,
            k + 1,
            "1.2.3",
            ImageOrientationPatient=orientation,
            ImagePositionPatient=position,
        )
    with pytest.raises(KneegenError, match="ImageOrientationPatient must be two unit vectors") as excinfo:
        read_volume_slices(folder)
    assert_one_line_naming(excinfo, folder)


def restamp(folder: Path, **attributes: object) -> None:
    """Set header attributes in every file of a written series."""
    for path in folder.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        for name, value in attributes.items():
            setattr(ds, name, value)
        ds.save_as(path)


def test_a_colour_series_is_refused_rather_than_windowed_as_grey(tmp_path):
    write_series(tmp_path / "series", "axial")
    restamp(tmp_path / "series", PhotometricInterpretation="PALETTE COLOR")
    with pytest.raises(KneegenError, match="PALETTE COLOR images are colour") as excinfo:
        read_volume_slices(tmp_path / "series")
    assert_one_line_naming(excinfo, tmp_path / "series")


def test_monochrome1_is_shown_inverted_like_monochrome2(tmp_path):
    write_series(tmp_path / "series", "axial")
    grey = read_volume_slices(tmp_path / "series", axis="axial", min_foreground=0.0)
    restamp(tmp_path / "series", PhotometricInterpretation="MONOCHROME1")
    inverted = read_volume_slices(tmp_path / "series", axis="axial", min_foreground=0.0)
    for (_, a), (_, b) in zip(grey.slices, inverted.slices):
        assert np.abs(a.astype(int) + b.astype(int) - 65535).max() <= 1


def test_uncompressed_pixel_data_cut_short_is_damaged_not_missing_a_decoder(tmp_path):
    write_series(tmp_path / "series", "axial")
    path = next((tmp_path / "series").glob("*.dcm"))
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[:-20]
    ds.save_as(path)
    with pytest.raises(KneegenError, match="pixel data is damaged") as excinfo:
        read_volume_slices(tmp_path / "series")
    assert "decoder" not in str(excinfo.value)


def test_slices_across_thick_voxels_get_square_pixels(tmp_path):
    """3 mm slices, 1 mm pixels: a sagittal cut runs down the 3 mm axis and is stretched 3× there;
    an axial cut, in the 1 mm plane, keeps its voxel grid."""
    path = tmp_path / "thick.nii.gz"
    nib.save(nib.Nifti1Image(synthetic_knee(), np.diag([1.0, 1.0, 3.0, 1.0])), path)
    sagittal = read_volume_slices(path, axis="sagittal", min_foreground=0.0)
    assert {image.shape for _, image in sagittal.slices} == {(3 * Z, Y)}
    axial = read_volume_slices(path, axis="axial", min_foreground=0.0)
    assert {image.shape for _, image in axial.slices} == {(Y, X)}


# --- Real files shipped with nibabel -----------------------------------------------------------


def test_real_mri_gives_uint16_slices_with_content():
    path = NIBABEL_DATA / "anatomical.nii"
    result = read_volume_slices(path)

    canonical = nib.as_closest_canonical(nib.load(path)).get_fdata(dtype=np.float32)
    print(
        f"anatomical.nii: RAS shape {result.shape}, {len(result.slices)} sagittal slices kept, "
        f"{result.skipped_empty} skipped, window {result.window}"
    )
    assert result.shape == canonical.shape
    assert result.window == pytest.approx(tuple(np.percentile(canonical, (0.5, 99.5))), rel=1e-6)
    assert len(result.slices) >= 10
    expected = windowed(canonical)
    for index, image in result.slices:
        assert image.dtype == np.uint16 and image.std() > 1000
        assert np.abs(image.astype(int) - upright(expected[index])).max() <= 1


def test_real_4d_file_is_refused_with_its_shape():
    path = NIBABEL_DATA / "example4d.nii.gz"
    with pytest.raises(KneegenError, match=r"\(128, 96, 24, 2\) is 4-D") as excinfo:
        read_volume_slices(path)
    assert_one_line_naming(excinfo, path)


def test_real_siemens_mosaic_dicom_is_refused(tmp_path):
    folder = tmp_path / "dti"
    folder.mkdir()
    for name in ["0.dcm", "1.dcm"]:  # two diffusion volumes, each one mosaic image of 48 slices
        shutil.copy(NIBABEL_DATA / name, folder / name)
    with pytest.raises(KneegenError, match="mosaic") as excinfo:
        read_volume_slices(folder)
    assert_one_line_naming(excinfo, folder)


# --- Bad input ---------------------------------------------------------------------------------


def test_volume_with_nans_is_refused_with_their_count(tmp_path):
    ras = synthetic_knee()
    ras[0, 0, :3] = np.nan
    path = save_nifti(tmp_path / "holes.nii.gz", ras)
    with pytest.raises(KneegenError, match="3 NaN") as excinfo:
        read_volume_slices(path)
    assert_one_line_naming(excinfo, path)


def test_single_volume_in_a_4d_file_is_read(tmp_path):
    path = tmp_path / "one.nii.gz"
    nib.save(nib.Nifti1Image(synthetic_knee()[..., None], np.eye(4)), path)
    assert read_volume_slices(path).shape == (X, Y, Z)


def test_2d_file_is_refused(tmp_path):
    path = tmp_path / "flat.nii"
    nib.save(nib.Nifti1Image(np.ones((X, Y), dtype=np.float32), np.eye(4)), path)
    with pytest.raises(KneegenError, match="2-D") as excinfo:
        read_volume_slices(path)
    assert_one_line_naming(excinfo, path)


def test_truncated_and_fake_files_are_refused(tmp_path):
    whole = save_nifti(tmp_path / "whole.nii.gz", synthetic_knee()).read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(whole[: len(whole) // 2])
    text = tmp_path / "notes.nii"
    text.write_text("not an image\n" * 40)
    for path in (truncated, text):
        with pytest.raises(KneegenError, match="cannot be read as NIfTI") as excinfo:
            read_volume_slices(path)
        assert_one_line_naming(excinfo, path)


@pytest.mark.parametrize("module", ["nibabel", "pydicom"])
def test_missing_readers_name_the_extra(tmp_path, monkeypatch, module):
    write_series(tmp_path / "series", "axial")
    monkeypatch.setitem(sys.modules, module, None)  # `import` now fails as if not installed
    with pytest.raises(KneegenError, match=r"pip install 'kneegen\[volumes\]'") as excinfo:
        read_volume_slices(tmp_path / "series")
    assert_one_line_naming(excinfo, tmp_path / "series")
