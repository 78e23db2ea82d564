"""The one exception the core raises for problems a user can fix, and the file an OS error
while writing concerns."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class KneegenError(Exception):
    """A user-facing problem: the message names the file, key or flag and what to do.

    The CLI prints it as one line and exits with status 1, without a traceback; anything
    else that escapes is a bug and keeps its traceback.
    """

    exit_code = 1


@contextmanager
def naming(path: Path) -> Iterator[None]:
    """An OSError raised while writing `path` names it: a full disk fails a write() or close(),
    whose error names no file, so the one-line report could not say which output it was."""
    try:
        yield
    except OSError as error:
        if error.filename is not None or error.errno is None:
            raise
        raise OSError(error.errno, error.strerror or str(error), str(path)) from None
