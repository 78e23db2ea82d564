"""NIfTI files and DICOM series → windowed uint16 slices along a named anatomical axis.

Both formats are read into one array with a voxel→world affine and reoriented to the closest
canonical RAS+ (what `nibabel.as_closest_canonical` does), so the axis names mean the same for
every file: sagittal slices are taken along x (left→right), coronal along y (posterior→anterior),
axial along z (inferior→superior); a slice's index counts from the left, posterior or inferior end.

Each slice is shown the way a radiologist would look at it: superior at the top (sagittal,
coronal) or anterior at the top (axial); anterior on the left (sagittal) and the patient's right
on the left (coronal, axial). For the standard planes this is exactly how a DICOM series stores
its images, so a DICOM slice comes back as it was acquired.

Intensities are windowed once per volume: the low and high percentiles (0.5 and 99.5 by default)
map to 0 and 65535, values outside are clipped. A slice is near-empty, and left out, when fewer
than `min_foreground` (5 % by default) of its pixels are brighter than 5 % of the window
(windowed value > 0.05 × 65535): air beyond the knee at the ends of the field of view.

nibabel and pydicom are the optional `volumes` extra, imported only when a volume is read.
`NIFTI` and `DICOM` are the input readers that hand volumes to `prepare`.
"""

from __future__ import annotations

import importlib
import math
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from kneegen.data.akoa import parse_akoa_name
from kneegen.data.disk import size_text
from kneegen.data.geometry import resize
from kneegen.data.inputs import Decoded, InputReader, Item, ReaderUnavailable, first_line, has_marker
from kneegen.errors import KneegenError

if TYPE_CHECKING:
    from kneegen.data.options import PrepareOptions

VOLUME_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz")
DICOM_SUFFIX = ".dcm"
DICOM_MARKER = (128, b"DICM")  # after a DICOM file's 128-byte preamble, whatever its name
AXES = ("sagittal", "coronal", "axial")  # slices along RAS x, y, z
UINT16_MAX = 65535
FOREGROUND_LEVEL = 0.05 * UINT16_MAX  # a pixel is foreground above 5 % of the window
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # DICOM's patient axes point left/posterior, RAS's right/anterior
PIXEL_DATA_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
GREY_PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")
SAME_POSITION_MM = 1e-3  # slices closer than this along the normal are at the same position
DICOM_SIDES = {"L": "LEFT", "R": "RIGHT"}
MISSING_READERS = "reading NIfTI/DICOM volumes needs nibabel and pydicom: pip install 'kneegen[volumes]'"


@dataclass
class VolumeSlices:
    source: Path  # the .nii/.nii.gz file or the DICOM series folder
    patient: str | None  # AKOA patient id, else DICOM PatientID; None when neither says
    side: str | None  # LEFT or RIGHT when the name or the DICOM laterality says
    shape: tuple[int, ...]  # (X, Y, Z) after reorientation to RAS
    window: tuple[float, float]  # intensities mapped to 0 and 65535
    slices: list[tuple[int, np.ndarray]]  # (index along the axis, uint16 (H, W) image), near-empty ones left out
    skipped_empty: int  # slices left out as near-empty


class RawVolume(NamedTuple):
    data: np.ndarray  # (I, J, K) float32, as stored
    affine: np.ndarray  # (4, 4) voxel → RAS world (mm)
    patient_id: str | None  # DICOM PatientID
    laterality: str | None  # DICOM Laterality / ImageLaterality code


def find_volumes(src: Path) -> list[Path]:
    """NIfTI files and DICOM series folders (any folder directly holding .dcm files) under `src`.

    Sorted by path so repeated runs see the same order; empty when there are none, so a caller
    can combine this with other kinds of sources. (`prepare` finds them through the readers.)
    """
    if not src.is_dir():
        raise KneegenError(f"source folder {src} not found: give a folder of NIfTI files or DICOM series")
    found = set()
    for path in (p for p in src.rglob("*") if p.is_file()):
        if is_nifti(path):
            found.add(path)
        elif is_dicom_file(path):
            found.add(path.parent)
    return sorted(found)


def read_volume_slices(
    path: Path,
    axis: str = "sagittal",
    percentiles: tuple[float, float] = (0.5, 99.5),
    min_foreground: float = 0.05,
) -> VolumeSlices:
    """The displayable, windowed, non-empty slices of one volume along `axis`."""
    if axis not in AXES:
        raise KneegenError(f"{path}: unknown axis {axis!r}: choose one of {', '.join(AXES)}")
    if not 0.0 <= percentiles[0] < percentiles[1] <= 100.0:
        raise KneegenError(f"{path}: percentiles {percentiles} must rise within 0..100, e.g. (0.5, 99.5)")

    # 1. Read, check and reorient to RAS.
    nib = import_reader("nibabel", path)
    raw = read_dicom_series(path) if path.is_dir() else read_nifti(path, nib)
    check_volume(raw.data, path)
    orientation = nib.orientations.io_orientation(raw.affine)
    volume = nib.orientations.apply_orientation(raw.data, orientation)  # (X, Y, Z)
    spacing = np.empty(3)  # mm per voxel along X, Y, Z
    spacing[orientation[:, 0].astype(int)] = nib.affines.voxel_sizes(raw.affine)

    # 2. Window the whole volume, then cut it into slices of square pixels.
    window = intensity_window(volume, percentiles, path)
    scaled = apply_window(volume, window)
    cut = AXES.index(axis)
    slices, skipped = cut_slices(scaled, cut, min_foreground)
    across, down = (spacing[i] for i in range(3) if i != cut)  # the image's columns run along the first
    slices = [(index, square_pixels(image, down, across)) for index, image in slices]

    patient, side = identify(path, raw)
    return VolumeSlices(path, patient, side, volume.shape, window, slices, skipped)


def read_volume(item: Item, options: PrepareOptions) -> Decoded:
    """A NIfTI file or DICOM series as a `prepare` input: windowed, near-empty slices left out."""
    volume = read_volume_slices(item.path, options.axis, options.percentiles, options.min_foreground)
    if not volume.slices:
        raise KneegenError(f"{item.path}: every slice along {options.axis} is near-empty")
    patient = volume.patient or item.group  # nothing names the patient: the folder it is in does
    return Decoded(item, volume.slices, patient, item.name, volume.side, volume.window, volume.skipped_empty)


NIFTI = InputReader("nifti", read_volume, suffixes=VOLUME_SUFFIXES, volumetric=True)
DICOM = InputReader("dicom", read_volume, folder_suffixes=(DICOM_SUFFIX,), folder_marker=DICOM_MARKER, volumetric=True)


def import_reader(name: str, path: Path) -> ModuleType:
    """`nibabel` or `pydicom`, imported on first use because they are an optional extra."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ReaderUnavailable(f"{path}: {MISSING_READERS}") from None


def read_nifti(path: Path, nib: ModuleType) -> RawVolume:
    """The voxels (scaled by the header's slope/intercept) and affine of a .nii/.nii.gz file."""
    from nibabel.filebasedimages import ImageFileError

    try:
        image = nib.load(path)
        check_voxels_present(image, path)
        data = image.get_fdata(dtype=np.float32)
    except (ImageFileError, OSError, EOFError, ValueError, zlib.error) as exc:
        raise KneegenError(
            f"{path}: cannot be read as NIfTI ({first_line(exc)}): check the file is complete, or export it again"
        ) from None
    if getattr(image, "affine", None) is None:  # CIFTI: surface and parcel data in a .nii, no voxel grid
        raise KneegenError(f"{path}: a {type(image).__name__} holds no voxel grid to slice: give NIfTI volumes")
    while data.ndim > 3 and data.shape[-1] == 1:  # a 4-D file holding one volume
        data = data[..., 0]
    return RawVolume(data, image.affine, None, None)


def check_voxels_present(image: Any, path: Path) -> None:
    """An uncompressed file must hold the voxels its header describes: a damaged header can claim
    terabytes, which reading would try to allocate before finding the file short."""
    proxy = getattr(image, "dataobj", None)
    if path.name.lower().endswith(".gz") or not all(hasattr(proxy, key) for key in ("shape", "dtype", "offset")):
        return
    needed = proxy.offset + math.prod(proxy.shape) * np.dtype(proxy.dtype).itemsize
    if needed > path.stat().st_size:
        raise KneegenError(
            f"{path}: its header describes {size_text(needed)} of voxels and the file holds "
            f"{size_text(path.stat().st_size)}: the file is damaged or cut short; export it again"
        )


def read_dicom_series(folder: Path) -> RawVolume:
    """One DICOM series (the .dcm files directly in `folder`), stacked in slice-position order.

    A folder holding several series is refused rather than split: the caller names one volume
    per folder, and guessing which series the user meant would hide the mistake.
    """
    pydicom = import_reader("pydicom", folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_dicom_file(p))
    if not files:
        raise KneegenError(
            f"{folder}: no DICOM files (.dcm, or marked DICM) in this folder: give a NIfTI file or a folder of one "
            "DICOM series"
        )
    with warnings.catch_warnings():  # pydicom warns of each odd tag on stderr; what matters is refused below
        warnings.simplefilter("ignore")
        datasets = [read_dicom_file(pydicom, f) for f in files]
    check_one_series(datasets, folder)

    # 1. Geometry: in-plane directions from the orientation, slice order along their normal.
    row_dir, col_dir = image_orientation(datasets, folder)
    normal = np.cross(row_dir, col_dir)
    datasets, step = sort_along_normal(datasets, normal, folder)

    # 2. Pixels in physical units, stacked as (columns, rows, slices) to match the affine's axes.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pixels = [dicom_pixels(ds) for ds in datasets]  # each (rows, columns)
    if len({p.shape for p in pixels}) > 1:
        raise KneegenError(f"{folder}: the slices have different sizes: the folder should hold one series")
    data = np.stack([p.T for p in pixels], axis=-1)  # (I, J, K)

    # 3. Voxel → LPS world, then → RAS. PixelSpacing is (between rows, between columns).
    first = datasets[0]
    row_spacing, col_spacing = (float(s) for s in first.get("PixelSpacing", [1.0, 1.0]))
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing
    lps[:3, 1] = col_dir * row_spacing
    lps[:3, 2] = step
    lps[:3, 3] = [float(v) for v in first.get("ImagePositionPatient", [0.0, 0.0, 0.0])]
    laterality = first.get("Laterality") or first.get("ImageLaterality")
    return RawVolume(data, LPS_TO_RAS @ lps, str(first.get("PatientID", "")).strip() or None, laterality)


def read_dicom_file(pydicom: ModuleType, path: Path) -> Any:
    """One parsed DICOM file; the folder's other checks need every header."""
    try:
        return pydicom.dcmread(path)
    except pydicom.errors.InvalidDicomError:  # its own message asks for force=True, which is no answer here
        raise KneegenError(
            f"{path}: not a DICOM file (no 'DICM' marker after its 128-byte preamble): remove it from the series "
            "folder, or export the series again"
        ) from None
    except (OSError, ValueError, EOFError) as exc:
        raise KneegenError(f"{path}: cannot be read as DICOM ({first_line(exc)}): remove or replace the file") from None


def check_one_series(datasets: list[Any], folder: Path) -> None:
    """Refuse folders that are not one plain single-frame series of 2-D images."""
    series = {ds.get("SeriesInstanceUID") for ds in datasets}
    if len(series) > 1:
        raise KneegenError(
            f"{folder}: the .dcm files belong to {len(series)} series: put each series in its own folder"
        )
    for ds in datasets:
        if not any(tag in ds for tag in PIXEL_DATA_TAGS):
            what = str(ds.get("Modality") or "") or getattr(ds.get("SOPClassUID"), "name", "") or "no image"
            raise KneegenError(
                f"{ds.filename}: holds no pixel data ({what}: an RT plan, report or waveform is no image slice): "
                "remove it from the series folder"
            )
    first = datasets[0]
    photometric = str(first.get("PhotometricInterpretation") or "MONOCHROME2").strip().upper()
    if photometric not in GREY_PHOTOMETRICS:
        raise KneegenError(
            f"{folder}: {photometric} images are colour, and MRI slices are grey (MONOCHROME1/2): "
            "give the series' grey-scale images, or convert them to grey first"
        )
    if "MOSAIC" in first.get("ImageType", []):
        raise KneegenError(
            f"{folder}: Siemens mosaic images (each file packs many slices): "
            "convert the series to NIfTI first, e.g. with dcm2niix"
        )
    if int(first.get("NumberOfFrames") or 1) > 1:
        raise KneegenError(
            f"{folder}: multi-frame DICOM is not supported: convert the series to NIfTI first, e.g. with dcm2niix"
        )


def image_orientation(datasets: list[Any], folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Unit directions (LPS) of increasing column and row index, shared by every slice."""
    orientations = [ds.get("ImageOrientationPatient") for ds in datasets]
    if any(o is None for o in orientations):
        raise KneegenError(
            f"{folder}: a slice has no ImageOrientationPatient, so its plane is unknown: export the series again"
        )
    values = np.array(orientations, dtype=float)  # (N, 6)
    if values.shape[1] != 6 or not np.allclose(np.linalg.norm(values.reshape(-1, 2, 3), axis=2), 1, atol=1e-2):
        raise KneegenError(
            f"{folder}: ImageOrientationPatient must be two unit vectors (6 numbers), not {values[0].tolist()}: "
            "export the series again"
        )
    if not np.allclose(values, values[0], atol=1e-4):
        raise KneegenError(f"{folder}: the slices have different orientations: the folder should hold one series")
    return values[0, :3], values[0, 3:]


def sort_along_normal(datasets: list[Any], normal: np.ndarray, folder: Path) -> tuple[list[Any], np.ndarray]:
    """Slices ordered by position along `normal`, and the LPS step from one slice to the next.

    Without ImagePositionPatient on every slice, InstanceNumber gives the order and the
    header's spacing the step.
    """
    if any(ds.get("ImagePositionPatient") is None for ds in datasets):
        ordered = sorted(datasets, key=lambda ds: int(ds.get("InstanceNumber") or 0))
        spacing = ordered[0].get("SpacingBetweenSlices") or ordered[0].get("SliceThickness") or 1.0
        return ordered, normal * float(spacing)
    positions = np.array([ds.ImagePositionPatient for ds in datasets], dtype=float)  # (N, 3)
    order = np.argsort(positions @ normal, kind="stable")
    distances = np.diff((positions @ normal)[order])
    if np.any(distances < SAME_POSITION_MM):
        raise KneegenError(
            f"{folder}: several slices share one position: the folder holds more than one volume "
            "(echoes or time points?); put one volume per folder"
        )
    positions = positions[order]
    step = (positions[-1] - positions[0]) / max(len(order) - 1, 1)
    return [datasets[i] for i in order], step


def dicom_pixels(ds: Any) -> np.ndarray:
    """One slice's pixels in physical units (RescaleSlope/Intercept applied), float32 (rows, columns)."""
    try:
        stored = ds.pixel_array
    except (AttributeError, ValueError, RuntimeError, NotImplementedError) as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is not None and syntax.is_compressed:
            raise KneegenError(
                f"{ds.filename}: its {syntax.name} pixel data needs a decoder pydicom does not have here: install one "
                "(pydicom's docs list them per syntax: e.g. pylibjpeg with pylibjpeg-libjpeg for JPEG, pyjpegls for "
                "JPEG-LS) or export the series uncompressed"
            ) from None
        raise KneegenError(
            f"{ds.filename}: its pixel data is damaged ({first_line(exc)}): export the series again"
        ) from None
    slope = float(ds.get("RescaleSlope") or 1.0)
    intercept = float(ds.get("RescaleIntercept") or 0.0)
    physical = stored.astype(np.float32) * slope + intercept
    # MONOCHROME1 shows its lowest values white: negated, the window maps them as MONOCHROME2's do.
    return -physical if str(ds.get("PhotometricInterpretation") or "").strip().upper() == "MONOCHROME1" else physical


def check_volume(data: np.ndarray, path: Path) -> None:
    """One finite 3-D volume, at least two voxels along every axis."""
    if data.ndim != 3 or min(data.shape) < 2:
        what = f"{data.ndim}-D" if data.ndim != 3 else "a single slice"
        split = ": split it into 3-D files first (e.g. fslsplit, or nibabel's four_to_three)" if data.ndim > 3 else ""
        raise KneegenError(
            f"{path}: shape {tuple(data.shape)} is {what}: kneegen needs one 3-D volume per file or DICOM folder{split}"
        )
    if not np.isfinite(data).all():
        n_nan = int(np.isnan(data).sum())
        n_inf = int(np.isinf(data).sum())
        raise KneegenError(
            f"{path}: contains {n_nan} NaN and {n_inf} infinite voxels: "
            "fix the file (e.g. set them to 0) and export it again"
        )


def intensity_window(volume: np.ndarray, percentiles: tuple[float, float], path: Path) -> tuple[float, float]:
    """The intensities at the two percentiles of the whole volume (all voxels are finite here)."""
    low, high = (float(v) for v in np.percentile(volume, percentiles))
    if high <= low:
        raise KneegenError(
            f"{path}: the volume is constant ({low:g}) between the {percentiles[0]:g}th and {percentiles[1]:g}th "
            "percentiles: nothing to show; check the file or widen the percentiles"
        )
    return low, high


def apply_window(volume: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """`volume` clipped to the window and scaled to 0..65535 (uint16, same shape)."""
    low, high = window
    scaled = (np.clip(volume, low, high) - low) * (UINT16_MAX / (high - low))
    return np.rint(scaled).astype(np.uint16)


def cut_slices(volume: np.ndarray, axis: int, min_foreground: float) -> tuple[list[tuple[int, np.ndarray]], int]:
    """(index, upright image) for each slice along `axis` with enough foreground; and how many had too little."""
    kept, skipped = [], 0
    for index in range(volume.shape[axis]):
        plane = np.take(volume, index, axis=axis)  # (A, B): the two other RAS axes, in order
        # Rows run from high B to low B (superior or anterior at the top), columns from high A to
        # low A (anterior, or the patient's right, on the left): the radiological view.
        image = np.ascontiguousarray(plane.T[::-1, ::-1])  # (H, W) = (B, A)
        if np.mean(image > FOREGROUND_LEVEL) < min_foreground:
            skipped += 1
        else:
            kept.append((index, image))
    return kept, skipped


def square_pixels(image: np.ndarray, row_mm: float, column_mm: float) -> np.ndarray:
    """The slice resampled so a pixel spans as many mm down as across: a cut across thick slices
    (an axial cut of a sagittal scan) is otherwise squashed by their thickness over the pixel
    size. The finer spacing is kept; the coarser axis is interpolated up to it."""
    finer = min(row_mm, column_mm)
    height, width = image.shape
    shape = (max(1, round(height * row_mm / finer)), max(1, round(width * column_mm / finer)))
    return resize(image, shape)


def identify(path: Path, raw: RawVolume) -> tuple[str | None, str | None]:
    """Patient and side: from an AKOA name first, then the DICOM header; None for what neither says."""
    # An AKOA slice is named after its volume file plus `_<slice>.png`, so the volume's own name
    # parses as its slice 0.
    akoa = parse_akoa_name(f"{path.name}_0.png")
    if akoa is not None:
        return akoa.patient, akoa.side
    return raw.patient_id or None, DICOM_SIDES.get(str(raw.laterality or "").upper())


def is_dicom_file(path: Path) -> bool:
    """A file of a DICOM series: named .dcm, or, named otherwise (OAI's are 001, 002, …), marked DICM."""
    if path.suffix.lower() == DICOM_SUFFIX:
        return True
    return not path.name.startswith(".") and not is_nifti(path) and has_marker(path, DICOM_MARKER)


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(VOLUME_SUFFIXES)
