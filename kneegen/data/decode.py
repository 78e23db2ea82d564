"""One slice image file → a grayscale array that keeps the file's bit depth: the `image` input reader.

AKOA slices are RGB PNGs with three equal channels; other sources bring palette, alpha or
16-bit files. 8-bit sources become uint8, 16-bit ones uint16, so no precision is thrown away
before training. Every way a file can fail is turned into an `UnreadableFile` reason the
summary can count, instead of an exception from deep inside Pillow.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from kneegen.data.akoa import parse_akoa_name
from kneegen.data.inputs import FOLDER_PATIENT, Decoded, InputReader, Item
from kneegen.errors import KneegenError

if TYPE_CHECKING:
    from kneegen.data.options import PrepareOptions

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class UnreadableFile(KneegenError):
    """A file that cannot be used, with the reason shown in the summary (prepare skips it)."""


def read_image(item: Item, options: PrepareOptions) -> Decoded:
    """A slice file; AKOA names give patient, knee and slice, other files their top folder (the
    patient) and own folder (the volume), or their own name. A multi-page TIFF is a stack: its
    pages are the slices of one volume, in page order."""
    pages = read_pages(item.path)
    parsed = parse_akoa_name(item.path.name)
    if len(pages) > 1:
        patient, side = (parsed.patient, parsed.side) if parsed is not None else (item.group, None)
        return Decoded(item, list(enumerate(pages)), patient, item.name, side)
    if parsed is not None:
        return Decoded(item, [(parsed.slice_index, pages[0])], parsed.patient, parsed.volume, parsed.side)
    folder = Path(item.name).parent
    return Decoded(
        item, [(None, pages[0])], item.group, f"{FOLDER_PATIENT}{folder if folder != Path('.') else item.name}"
    )


IMAGES = InputReader("image", read_image, suffixes=IMAGE_SUFFIXES)


def read_pages(path: Path) -> list[np.ndarray]:
    """Each page (H, W): uint8 for 8-bit sources, uint16 for 16-bit ones; UnreadableFile otherwise.
    Most files hold one page; a multi-page TIFF holds a stack.

    Pillow warns above `Image.MAX_IMAGE_PIXELS` and refuses above twice that; both are taken as
    one limit, so no warning reaches the terminal and no worker decodes gigabytes of pixels:
    no knee slice has 89 million of them, while a decompression bomb or a stray scan does.
    """
    if path.stat().st_size == 0:
        raise UnreadableFile("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return [to_gray_array(page) for page in stack_pages(image)]
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise UnreadableFile(too_many_pixels(str(exc))) from None
    except UnidentifiedImageError:
        raise UnreadableFile("not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise UnreadableFile(f"corrupt or truncated image ({exc})") from None


def stack_pages(image: Image.Image) -> Iterator[Image.Image]:
    """A TIFF's pages, each loaded in turn; any other format's first frame only (an animated PNG
    or a JPEG's thumbnail frame is no stack of slices). Pages of another size than the first (a
    preview) and stacks past Pillow's pixel limit in all are refused, as one image over it is."""
    pages = getattr(image, "n_frames", 1) if image.format == "TIFF" else 1
    width, height = image.size
    if pages * width * height > 2 * Image.MAX_IMAGE_PIXELS:
        raise UnreadableFile(too_many_pixels(f"({pages * width * height} pixels)"))
    for page in range(pages):
        image.seek(page)
        if image.size != (width, height):
            raise UnreadableFile(
                f"page {page + 1} is {image.size[0]}x{image.size[1]}, page 1 {width}x{height}: "
                "a stack's pages share one size"
            )
        image.load()
        yield image


def too_many_pixels(pillow_message: str) -> str:
    """The skip reason for an image over Pillow's pixel limit, with its size when Pillow gave it."""
    found = re.search(r"\((\d+) pixels\)", pillow_message)
    size = f"{int(found.group(1)):,} pixels, " if found else ""
    return f"image too large ({size}Pillow's decompression-bomb limit is {Image.MAX_IMAGE_PIXELS:,}): downscale it"


def to_gray_array(image: Image.Image) -> np.ndarray:
    """Collapse colour, alpha and palette to one channel; keep 16-bit samples as uint16."""
    if image.mode in SIXTEEN_BIT_MODES:
        pixels = np.asarray(image)
        if pixels.dtype != np.uint16:  # mode "I" is 32-bit; PNG stores at most 16 bits
            if pixels.min() < 0 or pixels.max() > np.iinfo(np.uint16).max:
                raise UnreadableFile(f"{image.mode} pixels outside 0..65535")
            pixels = pixels.astype(np.uint16)
        return pixels
    if image.mode == "F":
        raise UnreadableFile("floating-point image: convert it to 8- or 16-bit first")
    return np.asarray(image.convert("L"), dtype=np.uint8)


def widen_to_16_bit(pixels: np.ndarray) -> np.ndarray:
    """uint8 → uint16 with 255 ↦ 65535, so mixed-depth folders share one full range."""
    if pixels.dtype == np.uint16:
        return pixels
    return pixels.astype(np.uint16) * np.uint16(257)
