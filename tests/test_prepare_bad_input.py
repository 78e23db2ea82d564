"""`kneegen prepare` on bad input: a decompression bomb is one more unreadable file, the cache is
never written into its own source, conflicting sources are refused, disk-space messages read in
sizes people understand and name the folder being written, and a file given for a folder says so.
Every refusal comes before anything is written."""

from __future__ import annotations

import errno
import shutil
import warnings
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kneegen.cli import describe
from kneegen.data.cache import open_cache
from kneegen.data.phantom_folder import write_phantom_folder
from kneegen.data.prepare import prepare_folder
from kneegen.data.splits import SplitFractions
from kneegen.errors import KneegenError

from helpers import invoke, one_line_error, prepare_options

SMALL_PIXEL_LIMIT = 100_000  # Pillow's MAX_IMAGE_PIXELS here: warns above it, refuses above twice it (a slice: 59,280)
WARNED, REFUSED = 400, 500  # sides of square images in either range
Usage = namedtuple("Usage", "total used free")


def options(**changes):
    return prepare_options((16, 16), fractions=SplitFractions(0.5, 0.5, 0.0), **changes)


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def small_pixel_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow's bomb limits at 100,000 / 200,000 pixels: tests need not write 90-million-pixel images."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", SMALL_PIXEL_LIMIT)


# 0. Links to nothing


def test_a_link_to_nothing_is_skipped_and_counted_with_its_target(small_src, tmp_path):
    (small_src / "moved.png").symlink_to(tmp_path / "other-disk" / "slice.png")
    summary = prepare_folder(small_src, tmp_path / "out", options())
    assert summary.images == 20
    assert (
        dict(summary.skipped)["moved.png"] == f"a link to {tmp_path / 'other-disk' / 'slice.png'}, which is not there"
    )


def test_a_loop_of_links_is_skipped_as_one(small_src, tmp_path):
    (small_src / "loop1.png").symlink_to(small_src / "loop2.png")
    (small_src / "loop2.png").symlink_to(small_src / "loop1.png")
    skipped = dict(prepare_folder(small_src, tmp_path / "out", options()).skipped)
    assert skipped["loop1.png"] == f"a link to {small_src / 'loop2.png'}, which leads round in a loop of links"


def test_a_folder_of_hidden_files_only_says_they_are_not_read(tmp_path):
    src = tmp_path / "hidden"
    src.mkdir()
    Image.new("L", (8, 8)).save(src / ".slice.png")
    with pytest.raises(KneegenError, match="1 hidden entry"):
        prepare_folder(src, tmp_path / "out", options())


def test_strict_stops_at_a_link_to_nothing_naming_it(small_src, tmp_path):
    (small_src / "moved.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(KneegenError, match=r"moved\.png: a link to .*gone\.png, which is not there .*--strict"):
        prepare_folder(small_src, tmp_path / "out", options(strict=True))
    assert not (tmp_path / "out").exists()


# 1. Images over Pillow's pixel limit


@pytest.mark.parametrize("side", [WARNED, REFUSED], ids=["warning-range", "error-range"])
def test_an_image_over_pillows_pixel_limit_is_skipped_and_counted_without_a_warning(
    small_src, tmp_path, small_pixel_limit, side
):
    Image.new("L", (side, side)).save(small_src / "bomb.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = prepare_folder(small_src, tmp_path / "out", options())
    assert summary.images == 20
    reasons = dict(summary.skipped)
    assert reasons["bomb.png"].startswith(f"image too large ({side * side:,} pixels")
    assert summary.skip_reasons() == {"image too large": 1}
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_strict_stops_at_an_image_over_the_pixel_limit_naming_it(small_src, tmp_path, small_pixel_limit):
    Image.new("L", (REFUSED, REFUSED)).save(small_src / "bomb.png")
    with pytest.raises(KneegenError, match=r"bomb\.png: image too large .*--strict"):
        prepare_folder(small_src, tmp_path / "out", options(strict=True))
    assert not (tmp_path / "out").exists()


def test_the_command_reports_an_image_over_the_pixel_limit_as_skipped(small_src, tmp_path, small_pixel_limit):
    Image.new("L", (REFUSED, REFUSED)).save(small_src / "bomb.png")
    args = ("prepare", small_src, "--size", 16, "--val-fraction", 0.5, "--test-fraction", 0, "--workers", 1)
    result = invoke(*args, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "image too large 1" in result.output
    strict = one_line_error(invoke(*args, "--out", tmp_path / "strict", "--strict"))
    assert "bomb.png" in strict and "image too large" in strict


# 2. The cache inside its own source


@pytest.mark.parametrize("where", ["inside", "equal", "inside-through-a-link"])
def test_out_inside_the_source_folder_is_refused_before_anything_is_written(small_src, tmp_path, where):
    out = {"inside": small_src / "cache", "equal": small_src, "inside-through-a-link": tmp_path / "link" / "cache"}[
        where
    ]
    (tmp_path / "link").symlink_to(small_src)
    before = files_under(small_src)
    with pytest.raises(KneegenError) as error:
        prepare_folder(small_src, out, options(), overwrite=True)
    assert str(out) in str(error.value) and str(small_src) in str(error.value)
    assert files_under(small_src) == before
    assert not (small_src / "cache").exists()


def test_a_symlink_in_the_source_leading_into_the_cache_is_refused(small_src, tmp_path):
    out = tmp_path / "out"
    prepare_folder(small_src, out, options())
    (small_src / "linked").symlink_to(out)
    with pytest.raises(KneegenError, match="symlink"):
        prepare_folder(small_src, tmp_path / "out", options(), overwrite=True)


@pytest.mark.parametrize("nesting", ["out-inside-phantom-dir", "phantom-dir-inside-out"])
def test_phantom_dir_and_out_inside_one_another_are_refused_before_the_phantom_is_written(tmp_path, nesting):
    root = tmp_path / "nest"
    out, phantom_dir = (root / "cache", root) if nesting == "out-inside-phantom-dir" else (root, root / "ph")
    line = one_line_error(invoke("prepare", "--phantom", 20, "--size", 16, "--phantom-dir", phantom_dir, "--out", out))
    assert str(out) in line and str(phantom_dir) in line
    assert not root.exists()


# 3. A source folder and --phantom together


def test_a_source_folder_with_phantom_is_refused_before_anything_is_written(small_src, tmp_path):
    line = one_line_error(
        invoke("prepare", small_src, "--phantom", 20, "--phantom-dir", tmp_path / "ph", "--out", tmp_path / "out")
    )
    assert str(small_src) in line and "--phantom" in line and "conflict" in line
    assert not (tmp_path / "ph").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("slices, extra, enough", [(1, [], "60"), (19, ["--test-fraction", "0"], "40")])
def test_a_phantom_too_small_to_split_is_refused_before_it_is_written(tmp_path, slices, extra, enough):
    """Written first, it would stay behind and block the next try until --overwrite."""
    phantom_dir = tmp_path / "ph"
    args = ("prepare", "--phantom", slices, "--size", 16, "--phantom-dir", phantom_dir, "--out", tmp_path / "out")
    line = one_line_error(invoke(*args, *extra))
    assert f"--phantom {slices}:" in line and f"give --phantom {enough} or more" in line
    assert not phantom_dir.exists() and not (tmp_path / "out").exists()


# 4. Room on the disk


def test_too_little_space_is_given_in_kib_not_as_zero_mib(small_src, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 100, 100))
    with pytest.raises(KneegenError) as error:
        prepare_folder(small_src, tmp_path / "out", options())  # 20 slices of 16×16: 5,120 bytes
    message = str(error.value)
    assert "0 MiB" not in message
    assert "needs at least 5.00 KiB" in message and "has 100 bytes free" in message


def test_too_little_space_for_the_phantom_names_phantom_dir_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9, 0))
    line = one_line_error(
        invoke("prepare", "--phantom", 20, "--phantom-dir", tmp_path / "ph", "--out", tmp_path / "out")
    )
    assert "--phantom-dir" in line and "0 bytes free" in line
    assert not (tmp_path / "ph").exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_a_place_where_nothing_can_be_created_is_not_writable_rather_than_full(small_src):
    with pytest.raises(KneegenError, match="is not writable") as error:
        prepare_folder(small_src, Path("/proc/kneegen-test/out"), options())
    assert "free" not in str(error.value)


def test_a_disk_filling_up_while_writing_the_phantom_names_phantom_dir_and_leaves_nothing(tmp_path, monkeypatch):
    saved = []

    def save_until_full(image, path, *args, **kwargs):
        if len(saved) == 3:
            Path(path).write_bytes(b"\x89PNG half")
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(path)
        Path(path).write_bytes(b"png")

    monkeypatch.setattr(Image.Image, "save", save_until_full)
    folder = tmp_path / "ph"
    with pytest.raises(KneegenError) as error:
        write_phantom_folder(folder, 20, 0, [])
    assert str(folder) in str(error.value) and "--phantom-dir" in str(error.value)
    assert not folder.exists()  # the half-written phantom is gone, and the space it took is free again


def test_a_disk_filling_up_while_writing_the_cache_names_the_cache(small_src, tmp_path, monkeypatch):
    def short_write(*args, **kwargs):
        raise OSError("491520 requested and 65408 written")  # how numpy reports a full disk

    monkeypatch.setattr("kneegen.data.cache.np.save", short_write)
    out = tmp_path / "out"
    with pytest.raises(OSError) as error:
        prepare_folder(small_src, out, options())
    assert describe(error.value) == f"no space left on the disk writing {out}: free some space or write elsewhere"


# 5. A file where a folder is expected


def test_a_file_as_source_folder_says_it_is_a_file_and_names_its_folder(small_src, tmp_path):
    slice_file = sorted(small_src.iterdir())[0]
    line = one_line_error(invoke("prepare", slice_file, "--out", tmp_path / "out"))
    assert f"{slice_file} is a file, not a folder" in line and f"(e.g. {small_src})" in line
    assert "not found" not in line


def test_a_file_as_data_dir_says_it_is_a_file_and_names_its_folder(prepared):
    manifest = prepared / "manifest.json"
    with pytest.raises(KneegenError, match="is a file, not a folder") as error:
        open_cache(manifest)
    assert f"({prepared})" in str(error.value) and "not found" not in str(error.value)
    line = one_line_error(invoke("prepare", "--inspect", manifest))
    assert "is a file, not a folder" in line


def test_the_cache_of_an_image_over_the_pixel_limit_holds_only_the_good_slices(small_src, tmp_path, small_pixel_limit):
    Image.new("L", (REFUSED, REFUSED), 255).save(small_src / "bomb.png")
    prepare_folder(small_src, tmp_path / "out", options())
    data = open_cache(tmp_path / "out")
    assert len(data.images) == 20 and "bomb.png" not in {record["path"] for record in data.manifest["slices"]}
    assert not np.any(np.all(data.images == 255, axis=(1, 2)))


def test_skip_reasons_that_start_with_a_file_inside_a_volume_count_as_their_kind():
    from kneegen.data.summary import PrepareSummary

    skipped = [
        ("dcm1", "vol/dcm1/a.dcm: cannot be read as DICOM (File is missing its header): remove or replace the file"),
        ("dcm2", "vol/dcm2/b.dcm: cannot be read as DICOM (truncated): remove or replace the file"),
        ("k.nii.gz", "shape is 2-D: give 3-D volumes"),
        ("bad.dcm", "cannot be read (ValueError: invalid literal for int() with base 10: '1A')"),
    ]
    summary = PrepareSummary(0, 0, 0, {}, (32, 32), "uint8", "pad", {}, {}, skipped)
    assert summary.skip_reasons() == {"cannot be read as DICOM": 2, "shape is N-D": 1, "cannot be read": 1}
