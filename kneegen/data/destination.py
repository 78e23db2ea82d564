"""Where `prepare` may write its cache: never over a user's folder, never inside its own source.

A cache inside the folder it was prepared from becomes input the next time (its contact sheet
read as one more slice); a source inside the cache folder mixes the user's files with kneegen's.
Paths are compared as the file system resolves them, so a symlink cannot hide either.
"""

from __future__ import annotations

from pathlib import Path

from kneegen.data.cache import MANIFEST_FILE, is_replaceable, staging_folders
from kneegen.errors import KneegenError


def refuse_nested(src: Path, out: Path, source: str = "the source folder") -> None:
    """Refuse a cache inside its own source (the next prepare would read its contact sheet as a
    slice) and a source inside the cache folder, comparing real paths so symlinks cannot hide it.
    `source` names where `src` came from in the message (the SRC argument or --phantom-dir)."""
    real_src, real_out = src.resolve(), out.resolve()
    if real_out == real_src or real_src in real_out.parents:
        where = "is" if real_out == real_src else "is inside"
        raise KneegenError(
            f"--out {out} {where} {source} {src}{resolved(out, src)}: the cache would become part of its own "
            f"source; choose an --out outside it, e.g. {src.resolve().parent / (src.resolve().name + '-prepared')}"
        )
    if real_out in real_src.parents:
        raise KneegenError(
            f"{source} {src} is inside --out {out}{resolved(out, src)}: choose an --out that does not contain it, "
            "so the cache and its source stay apart"
        )


def resolved(*paths: Path) -> str:
    """' (really A and B)' when symlinks or relative parts make the real paths differ from the given."""
    if all(path.resolve() == path.absolute() for path in paths):
        return ""
    return f" (really {' and '.join(str(path.resolve()) for path in paths)})"


def refuse_links_into(out: Path, files: list[Path], src: Path) -> None:
    """Refuse a source whose symlinked folders lead into the cache folder: its files are not inputs."""
    if not out.exists():
        return  # a link to a folder not made yet is not followed
    real_out = out.resolve()
    inside = next((path for path in files if real_out in path.resolve().parents), None)
    if inside is not None:
        raise KneegenError(
            f"{inside} in the source folder {src} leads into --out {out} through a symlink: the cache would be "
            "read as its own input; remove the link or choose another --out"
        )


def refuse_to_clobber(out: Path, overwrite: bool, flag: str = "--out") -> None:
    """Never replace a user's folder: `--overwrite` replaces prepared data only, since a folder of
    other files may hold some named as a cache's are. `flag` is the option that named `out`."""
    if out.is_file():
        raise KneegenError(f"{out} is a file: choose a folder for {flag}")
    if not out.exists() or not (set(out.iterdir()) - set(staging_folders(out))):
        return
    if is_replaceable(out):
        if overwrite:
            return
        raise KneegenError(
            f"{out} already holds prepared data: pass --overwrite to replace it, or choose another {flag}"
        )
    raise KneegenError(
        f"{out} exists, is not empty and holds no prepared data (no {MANIFEST_FILE}): choose another {flag} "
        "(--overwrite replaces prepared data only), or empty that folder yourself"
    )
