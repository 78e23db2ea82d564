"""The one place progress bars are made: Rich, on stderr, with rate and ETA."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


class ClearedOnError(Progress):
    """A Progress that clears its bars when an error ends it, so the error's one line stands alone
    (where stderr is no terminal, a stopped bar stays printed above it)."""

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if kind is not None:
            self.live.transient = True
        super().__exit__(kind, error, trace)


def progress_bar() -> Progress:
    """A Progress to use as a context manager; add one task per long phase."""
    return ClearedOnError(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
    )


@contextmanager
def progress_once_started(description: str) -> Iterator[Callable[[int, int], None]]:
    """An `update(done, total)` callback whose bar appears on its first call, not before.

    Checks that fail before any work starts then print their one-line error alone, and a
    failure during the work clears the bar so the error line stands alone too.
    """
    progress = progress_bar()
    task = progress.add_task(description, total=None, status="")

    def update(done: int, total: int) -> None:
        if not progress.live.is_started:
            progress.start()
        progress.update(task, completed=done, total=total)

    try:
        yield update
    except BaseException:
        progress.live.transient = True
        raise
    finally:
        if progress.live.is_started:  # stopping a bar never shown still prints an empty line
            progress.stop()
