"""Input readers as plugins: a new kind of input for `kneegen prepare` is one module plus one
`kneegen.inputs` entry point, with nothing in kneegen edited; clashing or broken plugins are one
clear line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from kneegen.cli import build_app
from kneegen.data.cache import open_cache
from kneegen.data.inputs import load_readers
from kneegen.data.options import PrepareOptions
from kneegen.data.prepare import prepare_folder
from kneegen.data.splits import SplitFractions
from kneegen.errors import KneegenError

from helpers import install_plugin

SIDE = 8  # pixels of the toy slices, and the cache's size, so fitting leaves them as they are
SLICES_PER_PATIENT = 20  # 2 patients: 40 inputs, enough for prepare to share them among processes

# A toy format: a `.knee` text file is one slice; its first line names the patient, the other
# lines are rows of 8-bit pixel values.
KNEE_READER = """
    import numpy as np

    from kneegen.data.inputs import Decoded, InputReader
    from kneegen.errors import KneegenError


    def read_knee(item, options):
        patient, *rows = item.path.read_text().splitlines()
        try:
            pixels = np.array([[int(value) for value in row.split()] for row in rows], dtype=np.uint8)
        except ValueError:
            raise KneegenError(f"{item.path}: pixel rows must be whole numbers") from None
        return Decoded(item, [(None, pixels)], patient, item.name)


    KNEE = InputReader("knee", read_knee, suffixes=(".knee",))
"""


def write_knees(src: Path) -> dict[str, np.ndarray]:
    """Two patients' `.knee` slices, one broken file and one file no reader claims."""
    rng = np.random.default_rng(0)
    written = {}
    for patient in ("P1", "P2"):
        for index in range(SLICES_PER_PATIENT):
            pixels = rng.integers(0, 256, (SIDE, SIDE), dtype=np.uint8)
            name = f"{patient}_{index:02d}.knee"
            (src / name).write_text("\n".join([patient, *(" ".join(map(str, row)) for row in pixels)]))
            written[name] = pixels
    (src / "broken.knee").write_text("P3\nnot numbers\n")
    (src / "notes.txt").write_text("scanned on Tuesday")
    return written


def one_clean_line(result) -> str:
    """Exit status 1 and a single line of output, no traceback: how every user error ends."""
    assert result.exit_code == 1, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output, result.output
    return result.output


def test_a_plugin_reader_adds_an_input_kind_read_in_worker_processes(tmp_path, monkeypatch):
    install_plugin(
        tmp_path / "site",
        monkeypatch,
        "kneegen.inputs",
        "knee = kneeformat_mod:KNEE",
        "kneeformat_mod",
        KNEE_READER,
        dist="kneeformat",
    )
    src = tmp_path / "src"
    src.mkdir()
    written = write_knees(src)
    options = PrepareOptions(size=(SIDE, SIDE), fractions=SplitFractions(0.5, 0.5, 0.0), workers=2)
    summary = prepare_folder(src, tmp_path / "out", options)

    assert summary.images == 2 * SLICES_PER_PATIENT and summary.patients == 2
    assert dict(summary.skipped) == {
        "broken.knee": "pixel rows must be whole numbers",
        "notes.txt": "not an image or volume (.txt)",
    }
    data = open_cache(tmp_path / "out")
    records = data.manifest["slices"]
    assert data.manifest["volumes"] == []  # the reader is not volumetric
    assert {record["patient"] for record in records} == {"P1", "P2"}
    for image, record in zip(data.images, records):
        assert np.array_equal(image, written[record["path"]])


def test_kneegen_prepare_reads_a_plugin_input_kind_from_the_command_line(tmp_path, monkeypatch):
    install_plugin(
        tmp_path / "site",
        monkeypatch,
        "kneegen.inputs",
        "knee = kneecli_mod:KNEE",
        "kneecli_mod",
        KNEE_READER,
        dist="kneecli",
    )
    src = tmp_path / "src"
    src.mkdir()
    written = write_knees(src)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        build_app(),
        ["prepare", str(src), "--out", str(out), "--size", str(SIDE), "--val-fraction", "0.5", "--test-fraction", "0"],
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(record["path"] for record in manifest["slices"]) == sorted(written)


def test_two_readers_claiming_one_suffix_are_refused_naming_both(tmp_path, monkeypatch):
    rival = """
        from kneegen.data.decode import read_image
        from kneegen.data.inputs import InputReader

        PNGS = InputReader("pngs", read_image, suffixes=(".PNG",))
    """
    install_plugin(
        tmp_path / "site",
        monkeypatch,
        "kneegen.inputs",
        "pngs = pngrival_mod:PNGS",
        "pngrival_mod",
        rival,
        dist="pngrival",
    )
    with pytest.raises(KneegenError, match=r"'image' \(kneegen\) and 'pngs' \(pngrival\) both claim files \.PNG"):
        load_readers()
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(b"")
    output = one_clean_line(CliRunner().invoke(build_app(), ["prepare", str(src), "--out", str(tmp_path / "out")]))
    assert "'pngs' (pngrival)" in output and ".PNG" in output
    assert not (tmp_path / "out").exists()


def test_the_longest_claimed_suffix_wins(tmp_path, monkeypatch):
    gzip = """
        from kneegen.data.decode import read_image
        from kneegen.data.inputs import InputReader

        GZ = InputReader("gz", read_image, suffixes=(".gz",))
    """
    install_plugin(
        tmp_path / "site", monkeypatch, "kneegen.inputs", "gz = gzreader_mod:GZ", "gzreader_mod", gzip, dist="gzreader"
    )
    readers = load_readers()
    assert readers.for_file(Path("knee.NII.GZ")).name == "nifti"
    assert readers.for_file(Path("notes.tar.gz")).name == "gz"
    assert readers.for_file(Path("series/1.dcm")) is None
    assert readers.for_folder_of(Path("series/1.dcm")).name == "dicom"


def test_a_plugin_reader_that_fails_to_import_is_one_line_naming_it(tmp_path, monkeypatch):
    broken = """
        import kneegen_missing_dependency

        READER = None
    """
    install_plugin(
        tmp_path / "site",
        monkeypatch,
        "kneegen.inputs",
        "broken = brokenreader_mod:READER",
        "brokenreader_mod",
        broken,
        dist="brokenreader",
    )
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(b"")
    output = one_clean_line(CliRunner().invoke(build_app(), ["prepare", str(src), "--out", str(tmp_path / "out")]))
    assert "input reader plugin 'broken'" in output and "brokenreader" in output
    assert "kneegen_missing_dependency" in output
