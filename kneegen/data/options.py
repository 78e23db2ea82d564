"""What `prepare` is asked to do: every option that decides a cache's content, checked before any
file is read; the readers receive it too, so it sits apart from prepare's machinery."""

from __future__ import annotations

from dataclasses import dataclass, field

from kneegen.data.geometry import Fit
from kneegen.data.splits import SplitFractions
from kneegen.errors import KneegenError

MAX_SIDE = 4096  # pixels; beyond this a --size is a typo (and 18,680 slices would not fit in memory)


@dataclass(frozen=True)
class PrepareOptions:
    """Everything that decides the cache's content; recorded in its manifest."""

    size: tuple[int, int] = (256, 256)  # (H, W)
    fit: Fit = "pad"
    fractions: SplitFractions = field(default_factory=SplitFractions)
    seed: int = 0
    axis: str = "sagittal"  # volumes are sliced along it
    percentiles: tuple[float, float] = (0.5, 99.5)  # volume intensity window
    min_foreground: float = 0.05  # volume slices with less foreground are left out
    strict: bool = False  # an unreadable input stops the run instead of being skipped
    workers: int = 0  # processes decoding; 0 = every core

    def check(self) -> None:
        """Refuse values no input could make sense of, before any file is read or written."""
        self.fractions.check()
        if not 0 <= self.min_foreground <= 1:
            raise KneegenError(f"--min-foreground {self.min_foreground}: give a fraction of the slice from 0 to 1")
        if self.workers < 0:
            raise KneegenError(f"--workers {self.workers}: give a number of processes, or 0 for one per core")
        if max(self.size) > MAX_SIDE:
            raise KneegenError(f"--size {self.size[0]}x{self.size[1]}: at most {MAX_SIDE} pixels a side")
