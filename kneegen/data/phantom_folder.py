"""The folder `prepare --phantom` writes into, and the promise that it never touches a user's files.

The phantom's files carry AKOA names (`OAI9…_LEFT.nii.gz_12.png`), exactly the names of a
user's real slices, so a name is no proof of who wrote a file. Before writing a single slice,
the folder gets a marker listing every name about to be written; a later `--overwrite` deletes
only the names in that marker, and only in a folder that holds nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from kneegen.data.disk import check_room_for, full_disk_error, is_disk_full
from kneegen.data.phantom import AKOA_HEIGHT, AKOA_WIDTH, SLICES_PER_VOLUME, phantom_file_names, write_phantom
from kneegen.data.splits import SplitFractions, split_counts
from kneegen.errors import KneegenError
from kneegen.progress import progress_bar

MARKER = ".kneegen-phantom.json"
SHOWN = 3  # foreign files named in the refusal
PNG_BYTES_AT_LEAST = AKOA_HEIGHT * AKOA_WIDTH // 2  # a noisy slice's PNG: about 3/4 of its pixels' bytes


def make_phantom(n_images: int, folder: Path, seed: int, overwrite: bool, fractions: SplitFractions) -> Path:
    """`prepare --phantom N`: the phantom's slices in `folder`, with a progress bar; refuses a
    folder holding anything but an earlier phantom, too little room, and too few patients for
    the split `fractions` before writing (and before the bar starts)."""
    replaced = files_written_before(folder, overwrite)
    freed = sum((folder / name).stat().st_size for name in replaced if (folder / name).is_file())
    needed = max(0, n_images * PNG_BYTES_AT_LEAST - freed)
    check_room_for(folder, needed, "--phantom-dir", f"the phantom ({n_images} slices)", "a smaller --phantom N")
    check_phantom_splits(n_images, fractions)
    with progress_bar() as progress:
        task = progress.add_task("phantom", total=n_images, status="")
        return write_phantom_folder(folder, n_images, seed, replaced, on_volume=lambda n: progress.advance(task, n))


def check_phantom_splits(n_images: int, fractions: SplitFractions) -> None:
    """Refuse, before a slice is written, a phantom with too few patients (one per
    `SLICES_PER_VOLUME` slices) to give every split one: the folder would be left behind by a
    prepare that cannot succeed, and block the next try until --overwrite."""
    wanted = [name for name, value in fractions.as_dict().items() if value > 0]
    patients = -(-n_images // SLICES_PER_VOLUME)
    if all(split_counts(patients, fractions)[name] for name in wanted):
        return
    enough = len(wanted) * SLICES_PER_VOLUME  # split_counts gives each split one patient once there are as many
    raise KneegenError(
        f"--phantom {n_images}: {patients} patient(s) of {SLICES_PER_VOLUME} slices cannot fill the "
        f"{', '.join(wanted)} splits: give --phantom {enough} or more"
        + ("; or set --test-fraction 0" if "test" in wanted else "")
    )


def write_phantom_folder(
    folder: Path, n_images: int, seed: int, replaced: list[str], on_volume: Callable[[int], None] | None = None
) -> Path:
    """Write the phantom into `folder`, after deleting `replaced`: what `files_written_before`
    found of an earlier phantom there, so none of its slices linger."""
    for name in replaced:
        (folder / name).unlink(missing_ok=True)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    names = phantom_file_names(n_images, seed)
    try:
        (folder / MARKER).write_text(json.dumps({"seed": seed, "images": n_images, "files": names}))
        write_phantom(folder, n_images, seed=seed, on_volume=on_volume)
    except OSError as error:
        if not is_disk_full(error):
            raise
        delete_phantom(folder, names, created)  # half a phantom is no use, and holds space the user must free
        raise full_disk_error(folder, "--phantom-dir") from None
    return folder


def delete_phantom(folder: Path, names: list[str], created: bool) -> None:
    """Remove what `write_phantom_folder` wrote: the named slices, the marker, and the folder if
    it made it (and nothing else is in it)."""
    for name in (*names, MARKER):
        (folder / name).unlink(missing_ok=True)
    if created and not any(folder.iterdir()):
        folder.rmdir()


def files_written_before(folder: Path, overwrite: bool) -> list[str]:
    """The names an earlier phantom wrote into `folder` (none for a new or empty folder);
    refuses a file, a folder with anything kneegen did not write, and a phantom without --overwrite."""
    if folder.is_file():
        raise KneegenError(f"{folder} is a file: choose a folder for --phantom-dir")
    if not folder.exists() or not any(folder.iterdir()):
        return []
    marker = folder / MARKER
    own = read_marker(marker) if marker.is_file() else set()
    foreign = sorted(p.name for p in folder.iterdir() if p.name != MARKER and p.name not in own)
    if foreign:
        listed = ", ".join(foreign[:SHOWN]) + (f" and {len(foreign) - SHOWN} more" if len(foreign) > SHOWN else "")
        raise KneegenError(
            f"--phantom-dir {folder} holds files kneegen did not write ({listed}): choose a new or empty folder "
            "(if they are an earlier phantom's, delete them yourself)"
        )
    if not overwrite:
        raise KneegenError(
            f"--phantom-dir {folder} already holds a phantom: pass --overwrite to replace it, or choose another folder"
        )
    return sorted(own)


def read_marker(marker: Path) -> set[str]:
    try:
        files = json.loads(marker.read_text())["files"]
        if not all(isinstance(name, str) and "/" not in name and "\\" not in name for name in files):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise KneegenError(
            f"{marker} is damaged: delete the phantom folder {marker.parent} yourself, or choose another --phantom-dir"
        ) from None
    return set(files)
