"""What a prepared cache holds, computed from its manifest alone.

`kneegen prepare` prints this when it finishes and `kneegen prepare --inspect DIR` prints it
for an existing cache; both go through `summarize`, so they can never disagree.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from kneegen.data.splits import SPLITS

LEADING_PATH = re.compile(r"^[^\s:]*[/\\.][^\s:]*:\s+")  # "vol/dcm1/a.dcm: cannot be read …": a file inside a volume


@dataclass
class SplitCounts:
    images: int = 0
    patients: int = 0
    volumes: int = 0
    sides: dict[str, int] = field(default_factory=dict)  # slices per knee side


@dataclass
class PrepareSummary:
    images: int
    patients: int
    volumes: int
    sides: dict[str, int]  # slices per knee side ("unknown" when not known)
    image_shape: tuple[int, int]
    dtype: str
    fit: str
    source_sizes: dict[str, int]  # "HxW" of the inputs as found → how many inputs
    splits: dict[str, SplitCounts]
    skipped: list[tuple[str, str]]  # (path, reason)

    @property
    def split_images(self) -> dict[str, int]:
        return {name: counts.images for name, counts in self.splits.items()}

    @property
    def split_patients(self) -> dict[str, int]:
        return {name: counts.patients for name, counts in self.splits.items()}

    def skip_reasons(self) -> Counter[str]:
        """How many inputs were skipped for each kind of reason: the file a reason starts with and
        all from the first bracket (details, nested or not) or colon (advice) on dropped, numbers
        made alike, so one kind of problem counts as one line."""
        reasons = (LEADING_PATH.sub("", reason) for _, reason in self.skipped)
        kinds = (re.sub(r"\d+", "N", reason.split("(")[0].split(":")[0]).strip() for reason in reasons)
        return Counter(kinds)


def summarize(manifest: dict[str, Any]) -> PrepareSummary:
    records = manifest["slices"]
    splits = {name: split_counts([r for r in records if r["split"] == name]) for name in SPLITS}
    options = manifest.get("options", {})
    return PrepareSummary(
        images=len(records),
        patients=len({r["patient"] for r in records}),
        volumes=len({r.get("volume", r["patient"]) for r in records}),
        sides=side_counts(records),
        image_shape=tuple(manifest["image_shape"]),  # type: ignore[arg-type]
        dtype=manifest.get("dtype", "uint8"),
        fit=options.get("fit", "stretch"),  # caches from before --fit stretched
        source_sizes=dict(Counter("x".join(map(str, size)) for size in manifest.get("source_sizes", []))),
        splits=splits,
        skipped=[(item["path"], item["reason"]) for item in manifest.get("skipped", [])],
    )


def split_counts(records: list[dict[str, Any]]) -> SplitCounts:
    return SplitCounts(
        images=len(records),
        patients=len({r["patient"] for r in records}),
        volumes=len({r.get("volume", r["patient"]) for r in records}),
        sides=side_counts(records),
    )


def side_counts(records: list[dict[str, Any]]) -> dict[str, int]:
    return dict(sorted(Counter(r["side"] or "unknown" for r in records).items()))
