"""Patient, visit, side and slice from OAI AKOA file names.

Names look like `OAI9014797_BaseLine_3_de3d1_SAG_3D_DESS_WE_LEFT.nii.gz_12.png`; the side is
also seen as `Left` or `L_E_F_T`, and the visit without its underscore (`BaseLine_3de3d1`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

AKOA_NAME = re.compile(
    r"OAI(?P<patient>\d+)_BaseLine_(?P<visit>\d+?)_?de3d1_SAG_3D_DESS_WE_(?P<side>[A-Za-z_]+?)"
    r"\.nii(?:\.gz)?_(?P<slice>\d+)\.[A-Za-z]+$",
    re.IGNORECASE,
)
SIDES = {"LEFT": "LEFT", "RIGHT": "RIGHT"}


@dataclass(frozen=True)
class SliceName:
    patient: str
    visit: str
    side: str  # LEFT or RIGHT
    slice_index: int

    @property
    def volume(self) -> str:
        """The unit kept together in one split: one knee of one patient at one visit."""
        return f"{self.patient}_{self.visit}_{self.side}"


def parse_akoa_name(name: str) -> SliceName | None:
    """The parts of an AKOA slice name, or None when `name` does not follow the pattern."""
    match = AKOA_NAME.search(name)
    if match is None:
        return None
    side = SIDES.get(match["side"].replace("_", "").upper())
    if side is None:
        return None
    return SliceName(match["patient"], match["visit"], side, int(match["slice"]))
