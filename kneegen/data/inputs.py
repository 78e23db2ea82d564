"""Input readers: the plugins that turn source files into slices, one per kind of input.

Every kind `prepare` reads (slice images, NIfTI files, DICOM series, or a third party's format)
is an `InputReader` registered in the entry-point group `kneegen.inputs`. A reader declares what
it claims, file suffixes and/or the suffixes of files that make their folder one input, and
reads one claimed input into its slices and identity. So a new kind of input is one module
plus one entry point: nothing in `prepare` names a format.

When two claims overlap, the more specific one wins and is decided here, once: a folder claim
takes the files it is made of (a DICOM series is one input, not one per `.dcm`), and of two
file suffixes that both end a name the longer wins (`.nii.gz` before a plugin's `.gz`). Two
readers claiming the same suffix, or sharing a name, are refused: which one the user meant
cannot be guessed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kneegen.errors import KneegenError

if TYPE_CHECKING:
    from kneegen.data.options import PrepareOptions

INPUT_GROUP = "kneegen.inputs"  # entry-point group through which a package adds an input reader


class ReaderUnavailable(KneegenError):
    """A reader that cannot work at all (an optional package is missing): fatal for the whole
    run, where any other `KneegenError` from `read` only skips that one input."""


@dataclass(frozen=True)
class InputReader:
    """One kind of input: what it claims and how one claimed input is read.

    `read(item, options)` returns the input's slices as read (any size; `prepare` fits them)
    with the patient, volume and side they belong to, or raises a `KneegenError` whose message
    is the reason the input is skipped (stopping the run with --strict); `ReaderUnavailable`
    when it cannot read anything at all. The reader travels to the worker processes by pickle,
    so `read` must be a module-level function.
    """

    name: str  # the kind of input, as messages name it
    read: Callable[[Item, PrepareOptions], Decoded]
    suffixes: tuple[str, ...] = ()  # files ending in one of these (any case) are one input each
    folder_suffixes: tuple[str, ...] = ()  # a folder directly holding such files is one input
    folder_marker: tuple[int, bytes] | None = None  # or files no suffix claims, holding these bytes at this offset
    volumetric: bool = False  # an input is a volume: the manifest records its window and slice counts

    def __post_init__(self) -> None:
        for suffix in (*self.suffixes, *self.folder_suffixes):
            if not suffix.startswith("."):
                raise KneegenError(
                    f"input reader {self.name!r}: suffix {suffix!r} must start with a dot, e.g. '.{suffix}'"
                )


FOLDER_PATIENT = "file:"  # a patient (or volume) named after the folder or file it came from, not by the data


@dataclass
class Item:
    """One input: a file or a folder, and the reader that claimed it."""

    path: Path
    reader: InputReader
    name: str  # the path relative to the source folder, as the manifest records it
    group: str  # the patient when nothing in the input names one: its folder at the top of SRC, else itself


@dataclass
class Decoded:
    """What one input gave: slices with their identity, or the reason it gave none."""

    item: Item
    slices: list[tuple[int | None, np.ndarray]]  # (slice index, (H, W) uint8/uint16)
    patient: str = ""
    volume: str = ""
    side: str | None = None  # LEFT, RIGHT or unknown
    window: tuple[float, float] | None = None  # a volume's intensities mapped to black and white
    empty_slices: int = 0  # a volume's slices left out as near-empty
    source_size: tuple[int, ...] = ()  # the first slice's (H, W) as read; set by prepare when it fits them
    reason: str | None = None  # why the input gave no slices; set by prepare from the reader's error


@dataclass(frozen=True)
class InputReaders:
    """The installed readers, by name and by what they claim (lower-case suffix → reader)."""

    by_name: dict[str, InputReader]
    files: dict[str, InputReader]
    folders: dict[str, InputReader]

    def for_file(self, path: Path) -> InputReader | None:
        """The reader claiming `path` by the longest suffix its name ends in, if any."""
        name = path.name.lower()
        tails = [name[i:] for i, char in enumerate(name) if char == "."]  # longest first
        return next((self.files[tail] for tail in tails if tail in self.files), None)

    def for_folder_of(self, path: Path) -> InputReader | None:
        """The reader that takes `path`'s folder as one input because of this file, if any: by its
        suffix, or, for a file no suffix claims (DICOM files are often named 00000001), by its marker."""
        reader = self.folders.get(path.suffix.lower())
        if reader is not None or self.for_file(path) is not None:
            return reader
        return next((r for r in self.by_name.values() if r.folder_marker and has_marker(path, r.folder_marker)), None)

    def claims(self) -> str:
        """What the readers claim, for a message: 'dicom: folders of .dcm; image: .png .jpg'."""

        def claim(reader: InputReader) -> str:
            folders = [f"folders of {suffix}" for suffix in reader.folder_suffixes]
            if reader.folder_marker:
                folders.append(f"or of files marked {reader.folder_marker[1].decode(errors='replace')}")
            return f"{reader.name}: {' '.join([*reader.suffixes, *folders])}"

        return "; ".join(claim(reader) for _, reader in sorted(self.by_name.items()))


def load_readers() -> InputReaders:
    """Every reader installed in `kneegen.inputs` (kneegen's own included), checked for clashes."""
    readers: dict[str, InputReader] = {}
    owners: dict[str, str] = {}  # reader name → where it comes from, for messages
    for entry in sorted(entry_points(group=INPUT_GROUP), key=lambda ep: ep.name):
        reader = load_reader(entry)
        origin = f"{reader.name!r} ({provider(entry)})"
        if reader.name in readers:
            raise KneegenError(
                f"two input readers are named {reader.name!r}: {owners[reader.name]} and {origin}: uninstall one"
            )
        readers[reader.name], owners[reader.name] = reader, origin
    files: dict[str, InputReader] = {}
    folders: dict[str, InputReader] = {}
    for reader in readers.values():
        for claimed, suffixes, what in (
            (files, reader.suffixes, "files"),
            (folders, reader.folder_suffixes, "folders of"),
        ):
            for suffix in suffixes:
                rival = claimed.setdefault(suffix.lower(), reader)
                if rival is not reader:
                    raise KneegenError(
                        f"input readers {owners[rival.name]} and {owners[reader.name]} both claim {what} {suffix}: "
                        "uninstall one of the two packages"
                    )
    return InputReaders(readers, files, folders)


def load_reader(entry: EntryPoint) -> InputReader:
    """One plugin's reader; a plugin that cannot be imported is one line naming it."""
    try:
        reader = entry.load()
    except Exception as error:  # noqa: BLE001 - any failure inside a third party's import
        raise KneegenError(
            f"input reader plugin {entry.name!r} ({entry.value}, from {provider(entry)}) failed to load: "
            f"{error.__class__.__name__}: {' '.join(str(error).split())}: reinstall or uninstall it"
        ) from None
    if not isinstance(reader, InputReader):
        raise KneegenError(
            f"input reader plugin {entry.name!r} ({entry.value}, from {provider(entry)}) is a "
            f"{type(reader).__name__}, not a kneegen.data.inputs.InputReader"
        )
    return reader


def provider(entry: EntryPoint) -> str:
    """The distribution that installed an entry point, as pip names it."""
    return entry.dist.name if entry.dist is not None else "an unknown package"


def has_marker(path: Path, marker: tuple[int, bytes]) -> bool:
    """Whether the file holds `marker`'s bytes at its offset (an unreadable file does not; nor does
    anything but a regular file: opening a FIFO would wait for a writer)."""
    offset, expected = marker
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read(len(expected)) == expected
    except OSError:
        return False


def first_line(exc: Exception) -> str:
    """An exception's message cut to its first line, so the error we raise stays one line."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else exc.__class__.__name__
