"""The phantom writes only where it may and deletes only what it wrote; inputs are found through
symlinked folders without looping, and hidden files are not inputs."""

from __future__ import annotations

import json
import os

import pytest

from kneegen.data.phantom import phantom_file_names, write_phantom
from kneegen.data.phantom_folder import MARKER, files_written_before, write_phantom_folder
from kneegen.data.prepare import find_inputs, walk_files
from kneegen.errors import KneegenError

USER_SLICE = "OAI9014797_BaseLine_3_de3d1_SAG_3D_DESS_WE_LEFT.nii.gz_12.png"  # a real AKOA name


def phantom_into(folder, n_images, seed, overwrite):
    return write_phantom_folder(folder, n_images, seed, files_written_before(folder, overwrite))


def test_the_plan_names_exactly_the_files_written(tmp_path):
    written = write_phantom(tmp_path, 45, seed=3, slices_per_volume=20)
    assert [p.name for p in written] == phantom_file_names(45, seed=3, slices_per_volume=20)


def test_a_new_folder_gets_a_marker_listing_every_slice(tmp_path):
    folder = phantom_into(tmp_path / "ph", 25, 1, False)
    marker = json.loads((folder / MARKER).read_text())
    on_disk = sorted(p.name for p in folder.iterdir() if p.name != MARKER)
    assert sorted(marker["files"]) == on_disk and len(on_disk) == 25


def test_overwrite_replaces_an_earlier_phantom_and_leaves_none_of_its_slices(tmp_path):
    folder = tmp_path / "ph"
    phantom_into(folder, 30, 1, False)
    phantom_into(folder, 12, 2, True)
    assert sorted(p.name for p in folder.iterdir() if p.name != MARKER) == sorted(phantom_file_names(12, seed=2))


def test_an_earlier_phantom_is_kept_without_overwrite(tmp_path):
    folder = phantom_into(tmp_path / "ph", 10, 1, False)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(KneegenError, match="--overwrite"):
        phantom_into(folder, 10, 2, False)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@pytest.mark.parametrize("with_marker", [False, True], ids=["user-folder", "phantom-plus-user-file"])
def test_a_users_akoa_slices_are_never_deleted_even_with_overwrite(tmp_path, with_marker):
    folder = tmp_path / "ph"
    if with_marker:
        phantom_into(folder, 10, 1, False)
    else:
        folder.mkdir()
    (folder / USER_SLICE).write_bytes(b"the user's own slice")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(KneegenError, match="did not write") as error:
        phantom_into(folder, 10, 2, True)
    assert USER_SLICE in str(error.value)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_damaged_marker_is_refused_and_nothing_is_deleted(tmp_path):
    folder = phantom_into(tmp_path / "ph", 5, 1, False)
    (folder / MARKER).write_text(json.dumps({"files": ["../outside.png"]}))
    count = len(list(folder.iterdir()))
    with pytest.raises(KneegenError, match="damaged"):
        phantom_into(folder, 5, 1, True)
    assert len(list(folder.iterdir())) == count


def test_a_file_as_phantom_dir_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(KneegenError, match="is a file"):
        phantom_into(tmp_path / "file", 5, 1, True)


def test_symlinked_folders_are_followed_once_and_links_back_up_do_not_loop(tmp_path):
    outside = tmp_path / "other_disk/patient_b"
    write_phantom(outside, 3, seed=4, slices_per_volume=3)
    src = tmp_path / "src"
    write_phantom(src / "patient_a", 3, seed=5, slices_per_volume=3)
    os.symlink(outside, src / "patient_b")
    os.symlink(src, src / "patient_a" / "loop")  # a link back to the top
    os.symlink(outside, src / "same_again")  # the same real folder twice
    files = walk_files(src)
    assert len(files) == 6
    items, ignored = find_inputs(src)
    assert len(items) == 6 and ignored == []


def test_hidden_files_and_folders_are_not_inputs(tmp_path):
    write_phantom(tmp_path, 2, seed=1, slices_per_volume=2)
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.png").write_bytes(b"")
    items, ignored = find_inputs(tmp_path)
    assert len(items) == 2 and ignored == []
