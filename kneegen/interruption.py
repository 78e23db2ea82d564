"""Ctrl-C (SIGINT) or SIGTERM during training: finish the step, checkpoint it, say how to go on.

A signal only sets a flag; the training loop looks at it between steps, where the state is
whole (a step stopped half way could leave the optimizer's update half applied). A second
Ctrl-C stops at once, as a user who insists expects; the last checkpoint is then the one to
resume from. In multi-process runs the launcher owns the signals, so the flag stays off there.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

from kneegen.errors import KneegenError
from kneegen.progress import console

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KneegenError):
    """Training stopped on a signal after saving; the message says how to resume."""

    exit_code = 130  # 128 + SIGINT, what shells report for a Ctrl-C'd command


class StopRequest:
    """`requested` names the first signal received while active (None until then)."""

    def __init__(self, active: bool, until: str = "this step to save a checkpoint") -> None:
        self.active = active and threading.current_thread() is threading.main_thread()
        self.until = until  # what the process finishes before it stops, for the message
        self.requested: str | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if self.active:
            self.previous = {number: signal.signal(number, self.handle) for number in SIGNALS}
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.restore()

    def handle(self, number: int, frame: FrameType | None) -> None:
        if self.requested is not None:
            self.restore()
            raise KeyboardInterrupt
        self.requested = signal.Signals(number).name
        console.print(
            f"{self.requested}: stopping after {self.until} (Ctrl-C again to stop at once)",
            highlight=False,
        )

    def restore(self) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}
