"""Room on the disk for what `prepare` writes: checked before hours of work, in sizes people read.

A destination is refused up front when it cannot be written or its disk is too small; a disk that
fills up anyway, mid-write, is reported with the folder being written, which Python's own
"No space left on device" leaves out.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

from kneegen.errors import KneegenError

FULL_DISK = (errno.ENOSPC, errno.EDQUOT)  # no space left, or the user's quota is spent
UNITS = ("KiB", "MiB", "GiB", "TiB")
SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


def check_room_for(
    root: Path, needed: int, flag: str = "--out", what: str = "the cache", smaller: str = "a smaller --size"
) -> None:
    """Refuse when `root` cannot be made or written (`flag` named it), or when its disk has fewer
    than `needed` bytes free for `what`; `smaller` is the other way to need less room."""
    existing = check_writable(root, flag)
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise KneegenError(
            f"{root}: {what} needs at least {size_text(needed)} and the disk has {size_text(free)} free: "
            f"free some space, choose another {flag}, or {smaller}"
        )


def check_writable(root: Path, flag: str = "--out") -> Path:
    """The nearest existing folder on `root`'s path, refused unless a file can be made in it.

    `os.access` alone is not enough: it says yes to root on /proc and other places where nothing
    can be created, and then the free space there (0) would be blamed instead."""
    existing = next((p for p in (root, *root.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        made = "" if existing == root else f", so {root} cannot be made there"
        raise KneegenError(f"{existing} is a file{made}: choose another {flag}")
    if not can_create_in(existing):
        raise KneegenError(f"{existing} is not writable, so {root} cannot be made there: choose another {flag}")
    return existing


def can_create_in(folder: Path) -> bool:
    """Whether a file can be created in `folder` (a nameless temporary one, gone at once)."""
    if not os.access(folder, os.W_OK):
        return False
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError as error:
        return error.errno in FULL_DISK  # writable, only full: the space check says so


def is_disk_full(error: OSError) -> bool:
    """ENOSPC or EDQUOT, or numpy's short write ("N requested and M written", with no errno),
    which is how `np.save` reports a disk that filled up."""
    return error.errno in FULL_DISK or (error.errno is None and bool(SHORT_WRITE.search(str(error))))


def full_disk_error(folder: Path, flag: str) -> KneegenError:
    """The one line for a disk that filled up while `folder` (named by `flag`) was being written."""
    return KneegenError(
        f"no space left on the disk writing {folder} ({flag}): free some space, or choose another {flag}"
    )


def size_text(n_bytes: int) -> str:
    """Bytes as a person reads them, three significant figures: 0 bytes, 120 KiB, 1.43 MiB."""
    if n_bytes < 1024:
        return f"{n_bytes} byte{'' if n_bytes == 1 else 's'}"
    value, unit = n_bytes / 1024, UNITS[0]
    for bigger in UNITS[1:]:
        if round(value) < 1024:  # 1,023.7 KiB reads as 1.00 MiB, not 1,024 KiB
            break
        value, unit = value / 1024, bigger
    decimals = 2 if value < 10 else 1 if value < 100 else 0
    return f"{value:,.{decimals}f} {unit}"
