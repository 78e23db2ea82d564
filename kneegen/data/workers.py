"""A function over many inputs in worker processes, in order, stopped soon by Ctrl-C.

`ProcessPoolExecutor.map` alone handles Ctrl-C badly. A terminal sends it to every process of
the group: a worker interrupted mid-task breaks the pool, or, racing its shutdown, hangs it; one
that lands while a worker is being forked is swallowed; and with workers that ignore it, the
shutdown waits for every queued chunk. Killing the workers instead can cut a result half-written
into the pipe, on which the pool's reader then waits for ever. So here the workers ignore Ctrl-C
and SIGTERM, each task is one input, and the main process only notes the signal
(`StopRequest`), looks at the note between short waits, drops the queued tasks and lets the
running ones (one input per worker) finish, deaf to further signals while they do.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, wait
from typing import TypeVar

from kneegen.interruption import SIGNALS, StopRequest

Task = TypeVar("Task")
Result = TypeVar("Result")

POLL_SECONDS = 0.2  # the longest a noted Ctrl-C waits to be acted on, beyond the inputs being read


def map_in_processes(
    function: Callable[[Task], Result], tasks: Sequence[Task], workers: int, until: str
) -> Iterator[Result]:
    """`function(task)` for each task, in order, on `workers` processes. `until` says what a
    Ctrl-C waits for, in its message."""
    with StopRequest(active=True, until=until) as stop:
        pool = ProcessPoolExecutor(max_workers=workers, initializer=ignore_stop_signals)
        try:
            futures = [pool.submit(function, task) for task in tasks]
            for future in futures:
                while not wait([future], timeout=POLL_SECONDS).done:
                    if stop.requested:
                        raise KeyboardInterrupt
                if stop.requested:
                    raise KeyboardInterrupt
                yield future.result()
            if stop.requested:  # noted while the caller took the last results
                raise KeyboardInterrupt
        finally:  # also when the caller stops early: the queued tasks are dropped, the running ones finish
            with signals_ignored():  # a Ctrl-C amid the shutdown would leave the pool's thread feeding workers
                pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    previous = {number: signal.signal(number, signal.SIG_IGN) for number in SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def ignore_stop_signals() -> None:
    """A worker's start: Ctrl-C and SIGTERM reach the whole process group; the main process answers them."""
    for number in SIGNALS:
        signal.signal(number, signal.SIG_IGN)
