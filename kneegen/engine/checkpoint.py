"""Checkpoints: plain dicts of state_dicts, config and counters, written atomically.

Loading uses `torch.load(weights_only=True)`, so a checkpoint can never run code; anything that
is not a kneegen checkpoint of a known format version is refused with a clear message.

Format 2 added what continuing mid-epoch needs (position in the epoch, every RNG state, the
loss-scaler state); a format-1 checkpoint still samples and validates, but cannot be resumed.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from kneegen.errors import KneegenError

FORMAT = "kneegen-checkpoint"
FORMAT_VERSION = 2
TEMPORARY_SUFFIX = ".tmp"


def save_checkpoint(payload: dict[str, Any], *paths: Path) -> None:
    """Serialise `payload` once and write it to each path: a temporary file in the same folder,
    fsync, then rename over the path.

    A crash mid-write leaves the previous file intact (rename is atomic on POSIX) and at worst a
    hidden `.NAME.*.tmp`, which `remove_partial_writes` clears and resuming never reads.
    """
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, **payload}, buffer)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(buffer.getbuffer())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, path)
        except OSError as exc:  # disk full, quota, permissions: the old file is still whole
            Path(tmp_name).unlink(missing_ok=True)
            raise KneegenError(
                f"could not write {path} ({exc.strerror or exc}): the previous {path.name} is intact; "
                f"free disk space (or fix the folder), then kneegen train --resume"
            ) from None
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint dict at `path`, on the CPU, after checking that it is one of ours."""
    if not path.is_file():
        raise KneegenError(f"checkpoint {path} not found: train first (kneegen train) or give an existing .pt file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only unpickling of arbitrary bytes fails in many ways
        reason = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise KneegenError(f"{path} is not a readable kneegen checkpoint ({reason[:120]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise KneegenError(f"{path} is not a kneegen checkpoint: give a last.pt or best.pt from a kneegen run")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise KneegenError(
            f"{path} has checkpoint format {payload['format_version']}, newer than this kneegen "
            f"understands ({FORMAT_VERSION}): upgrade kneegen"
        )
    return payload


def remove_partial_writes(folder: Path) -> None:
    """Delete the temporary files a process killed mid-`save_checkpoint` left behind."""
    for leftover in folder.glob(f".*{TEMPORARY_SUFFIX}"):
        leftover.unlink(missing_ok=True)


def checkpoint_config(path: Path) -> dict[str, Any]:
    """The run config stored inside a checkpoint, as the mapping `config.config_from_mapping` reads."""
    config = load_checkpoint(path).get("config")
    if not isinstance(config, dict):
        raise KneegenError(f"{path} holds no run config: give --config with the settings it was trained with")
    return config
