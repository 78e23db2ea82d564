"""Which files in an output folder kneegen wrote: the ones `sample --overwrite` may replace.

Every image kneegen writes says so inside the file (a PNG text chunk, a GIF comment, a NIfTI
header description), and a sample's JSON sidecar holds its checkpoint and sampler; a file that
does not, a user's own image among the samples, is never replaced or removed.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

WRITER = "kneegen"  # the mark: PNG text "software", GIF comment, NIfTI descrip
SIDECAR_KEYS = ("checkpoint", "sampler")  # what a sample's JSON holds (and older samples' PNG text)


def written_by_kneegen(path: Path) -> bool:
    """Whether `path` carries kneegen's mark (or, for samples of older versions, their sampler and
    checkpoint); an unreadable file is the user's."""
    try:
        if path.name.endswith(".json"):
            record = json.loads(path.read_text())
            return isinstance(record, dict) and all(key in record for key in SIDECAR_KEYS)
        if path.name.endswith(".nii.gz"):
            import nibabel

            return nibabel.load(path).header["descrip"].item() == WRITER.encode()
        with Image.open(path) as image:
            if image.format == "GIF":
                return image.info.get("comment") == WRITER.encode()
            text = getattr(image, "text", {})
            return text.get("software") == WRITER or all(key in text for key in SIDECAR_KEYS)
    except Exception:  # noqa: BLE001 - any file kneegen cannot read back is not one it wrote
        return False
