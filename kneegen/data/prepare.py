"""Slice images and MRI volumes → the cache training reads, split by patient.

`prepare_folder` reads every input once, on all cores, brings each slice to one size and bit
depth, assigns patients to train/val/test, and writes the cache with a manifest that records
where every slice came from. Unreadable inputs are skipped and counted (or fatal with
`strict`), so one bad file among 18,680 never costs the user the whole run. What counts as an
input, and how it is read, is up to the input readers (`kneegen.data.inputs`); this module
names no format.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from kneegen.data.cache import write_cache
from kneegen.data.decode import widen_to_16_bit
from kneegen.data.destination import refuse_links_into, refuse_nested, refuse_to_clobber
from kneegen.data.disk import check_room_for
from kneegen.data.geometry import fit_to_size
from kneegen.data.inputs import FOLDER_PATIENT, Decoded, InputReader, Item, ReaderUnavailable, first_line, load_readers
from kneegen.data.options import PrepareOptions
from kneegen.data.splits import SPLITS, split_patients
from kneegen.data.summary import PrepareSummary, summarize
from kneegen.data.workers import map_in_processes
from kneegen.errors import KneegenError

INPUTS_WORTH_WORKERS = 32  # fewer inputs are read in this process: starting workers would cost more


def prepare_folder(
    src: Path,
    out: Path,
    options: PrepareOptions,
    overwrite: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> PrepareSummary:
    """Read, split by patient and cache every usable slice under `src` into `out`.

    `on_progress(done, total)` is called after each input, for a progress bar.
    """
    refuse_nested(src, out)
    refuse_to_clobber(out, overwrite)
    options.check()
    items, ignored = find_inputs(src)
    missing = [path for path, _ in ignored if not path.exists()]
    if options.strict and missing:
        raise KneegenError(f"{missing[0]}: {broken_link(missing[0])} (without --strict it would be skipped)")
    refuse_links_into(out, [item.path for item in items] + [path for path, _ in ignored], src)
    check_room_for(out, len(items) * options.size[0] * options.size[1])  # one 8-bit slice per input, at least

    # 1. Read every input on all cores; failures become skip reasons (or stop with --strict).
    decoded, skipped = [], [{"path": str(path.relative_to(src)), "reason": reason} for path, reason in ignored]
    if on_progress is not None:
        on_progress(0, len(items))
    with contextlib.closing(read_all(items, options)) as results:  # closed on any error: no worker reads on
        for done, result in enumerate(results, start=1):
            if on_progress is not None:
                on_progress(done, len(items))
            if result.reason is None:
                decoded.append(result)
                continue
            if options.strict:
                raise KneegenError(f"{result.item.path}: {result.reason} (without --strict it would be skipped)")
            skipped.append({"path": result.item.name, "reason": result.reason})
    if not decoded:
        first = next(entry for entry in skipped if entry["path"] == items[0].name)
        raise KneegenError(
            f"none of the {len(items)} inputs in {src} could be read: check the files "
            f"({first['path']}: {first['reason']})"
        )

    # 2. Split by patient, then order the slices split by split so each split is one block.
    sides: dict[str, set[str]] = {}
    for result in decoded:
        sides.setdefault(result.patient, set()).add(result.side)  # type: ignore[arg-type]
    refuse_one_folder_patient(decoded, src)
    assignment = split_patients(sides, options.fractions, options.seed)
    rows = [
        (SPLITS.index(assignment[r.patient]), n, r, index, pixels)
        for n, r in enumerate(decoded)
        for index, pixels in r.slices
    ]
    rows.sort(key=lambda row: row[:2])

    # 3. One bit depth for all: 16-bit if any source is, so no precision is lost.
    sixteen = any(pixels.dtype == np.uint16 for *_, pixels in rows)
    images = np.stack([widen_to_16_bit(p) if sixteen else p for *_, p in rows])  # (N, H, W)
    records = [slice_record(r, index, SPLITS[split]) for split, _, r, index, _ in rows]
    counts = [sum(1 for row in rows if row[0] == i) for i in range(len(SPLITS))]
    starts = np.cumsum([0, *counts])
    manifest: dict[str, Any] = {
        "source": str(src.resolve()),
        "image_shape": list(options.size),
        "dtype": str(images.dtype),
        "options": {**asdict(options), "size": list(options.size)},
        "split_ranges": {name: [int(starts[i]), int(starts[i + 1])] for i, name in enumerate(SPLITS)},
        "patients": dict(sorted(assignment.items())),
        "volumes": [volume_record(r) for r in decoded if r.item.reader.volumetric],
        "source_sizes": [list(r.source_size) for r in decoded],
        "slices": records,
        "skipped": skipped,
    }
    write_cache(out, images, manifest)
    return summarize(manifest)


def find_inputs(src: Path) -> tuple[list[Item], list[tuple[Path, str]]]:
    """The inputs under `src`, each with the reader that claims it, and the other files with
    why they are ignored."""
    if src.is_file():
        raise KneegenError(
            f"source folder {src} is a file, not a folder: give the folder that holds the slices or volumes "
            f"(e.g. {src.parent}), or use --phantom N"
        )
    if not src.is_dir():
        raise KneegenError(f"source folder {src} not found: give a folder of slices or volumes, or use --phantom N")
    readers = load_readers()
    files = walk_files(src)
    # 1. Folder shapes first: a folder some of whose files make it one input (a DICOM series).
    part_of = {path: readers.for_folder_of(path) for path in files}  # once: a marker is read from the file
    folders: dict[Path, InputReader] = {}
    for path, reader in part_of.items():
        if reader is not None:
            folders.setdefault(path.parent, reader)
    # 2. Every other file is an input of its own or ignored; a claimed folder's other files silently.
    items = [input_item(folder, reader, src) for folder, reader in folders.items()]
    ignored = []
    for path in files:
        if not path.exists():
            ignored.append((path, broken_link(path)))
            continue
        if part_of[path] is not None:
            if folders[path.parent] is not part_of[path]:  # two folder kinds in one folder: the first file's wins
                ignored.append((path, f"in a folder read as one {folders[path.parent].name} input"))
        elif (reader := readers.for_file(path)) is not None:
            items.append(input_item(path, reader, src))
        elif path.parent not in folders:
            ignored.append((path, f"not an image or volume ({path.suffix or 'no suffix'})"))
    if not items:
        hidden = sum(1 for entry in src.iterdir() if entry.name.startswith("."))
        entries = "entry (its name starts" if hidden == 1 else "entries (their names start"
        left_out = f"; {hidden} hidden {entries} with a dot) are not read" if hidden else ""
        raise KneegenError(
            f"no images (PNG/JPG/TIFF) or volumes found in {src} (the input readers claim {readers.claims()}"
            f"{left_out}): point kneegen prepare at the folder that holds them"
        )
    return sorted(items, key=lambda item: str(item.path)), ignored


def refuse_one_folder_patient(decoded: list[Decoded], src: Path) -> None:
    """All inputs in one folder at the top of `src`, and nothing else saying whose they are: that
    folder is one patient, which no split can use. If it holds folders of inputs, they likely are
    the patients; if not, its files are one patient's slices, and splitting them would leak."""
    patients = {result.patient for result in decoded}
    if len(patients) > 1 or not next(iter(patients)).startswith(FOLDER_PATIENT):
        return
    folder = src / next(iter(patients)).removeprefix(FOLDER_PATIENT)
    if not folder.is_dir():
        return
    nested = any(len(Path(result.item.name).parts) > 2 for result in decoded)
    advice = (
        f"if the folders in {folder} are patients, run kneegen prepare {folder}"
        if nested
        else "add other patients' folders beside it"
    )
    raise KneegenError(
        f"every input is in {folder}, taken as one patient (no file name or header says whose they are), "
        f"and a split needs several: {advice}"
    )


def walk_files(src: Path) -> list[Path]:
    """Every file under `src`, following symlinked folders (data is often linked in from another
    disk) but entering each real folder once, so a link back up cannot loop. Hidden files and
    folders (`.DS_Store`, `.git`, the phantom's marker) are not inputs and are left out. A link to a file that is
    not there is kept, so that it is reported as skipped rather than vanish from the count."""
    files: list[Path] = []
    seen: set[str] = set()
    for root, folders, names in os.walk(src, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            folders[:] = []
            continue
        seen.add(real)
        folders[:] = [f for f in folders if not f.startswith(".")]
        files += [Path(root, name) for name in names if not name.startswith(".") and is_file_or_link(Path(root, name))]
    return sorted(files)


def is_file_or_link(path: Path) -> bool:
    """A file, or a symlink that is not a folder (a link to nothing among them)."""
    return path.is_file() or (path.is_symlink() and not path.is_dir())


def broken_link(path: Path) -> str:
    """Why a link that leads to no file is skipped: its target, so the user can find the disk it
    was on, or the loop it is part of."""
    target = os.readlink(path)
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"a link to {target}, which leads round in a loop of links"
    return f"a link to {target}, which is not there"


def input_item(path: Path, reader: InputReader, src: Path) -> Item:
    """Without a name or header to go by, each folder at the top of `src` is taken as one patient,
    however deep its files lie (`<patient>/<visit>/<knee>/…` keeps a patient's visits and knees
    together): the safe side for leakage. A loose file at the top is its own."""
    name = path.relative_to(src)
    top = name.parts[0] if name.parts else src.name  # SRC itself is the input (one DICOM series)
    return Item(path, reader, str(name), f"{FOLDER_PATIENT}{top}")


def read_all(items: list[Item], options: PrepareOptions) -> Iterator[Decoded]:
    """Decoded inputs in order; several processes when there are cores and inputs to share."""
    workers = min(options.workers or os.cpu_count() or 1, len(items))  # never more processes than inputs
    tasks = [(item, options) for item in items]
    if workers == 1 or len(items) < INPUTS_WORTH_WORKERS:
        yield from (read_input(task) for task in tasks)
        return
    yield from map_in_processes(read_input, tasks, workers, until="the files being read")


def read_input(task: tuple[Item, PrepareOptions]) -> Decoded:
    """One input → its fitted slices and identity, or the reason it cannot be used."""
    item, options = task
    try:
        decoded = item.reader.read(item, options)
    except ReaderUnavailable:
        raise  # the reader cannot read anything (its optional packages are missing): stop the run
    except KneegenError as exc:  # this input only, with its one-line reason
        return Decoded(item, [], reason=str(exc).removeprefix(f"{item.path}: "))
    except MemoryError:  # e.g. a header claiming a volume of terabytes
        return Decoded(item, [], reason="too large to read into memory: check its header gives its true size")
    except Exception as exc:  # a damaged file can make a format's library raise anything: this input only
        return Decoded(item, [], reason=f"cannot be read ({type(exc).__name__}: {first_line(exc)})")
    slices = [(index, fit_to_size(pixels, options.size, options.fit)) for index, pixels in decoded.slices]
    return replace(decoded, slices=slices, source_size=decoded.slices[0][1].shape)


def slice_record(result: Decoded, index: int | None, split: str) -> dict[str, Any]:
    return {
        "path": result.item.name,
        "patient": result.patient,
        "volume": result.volume,
        "side": result.side,
        "slice": index,
        "split": split,
    }


def volume_record(result: Decoded) -> dict[str, Any]:
    return {
        "path": result.item.name,
        "patient": result.patient,
        "slices": len(result.slices),
        "empty_slices_left_out": result.empty_slices,
        "window": list(result.window or ()),
    }
