"""Checkpoints: plain dicts of state_dicts, config and counters, written atomically.

Loading uses `torch.load(weights_only=True)`, so a checkpoint can never run code; anything that
is not a kneegen checkpoint of a known format version is refused with a clear message, and so is
a training checkpoint that lacks what rebuilding its network needs (a latent model's record of its
autoencoder included) or, when it is resumed, what continuing needs. Loading weights into the
network a config builds goes through `load_weights`, so a mismatch is one line, not torch's report.

Format 2 added what continuing mid-epoch needs (position in the epoch, every RNG state, the
loss-scaler state); a format-1 checkpoint still samples and validates, but cannot be resumed.
"""

from __future__ import annotations

import io
import os
import pickle
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kneegen.errors import KneegenError

FORMAT = "kneegen-checkpoint"
FORMAT_VERSION = 3  # 3: autoencoders record model.vae.norm (before it, GroupNorm was the only one)
TEMPORARY_SUFFIX = ".tmp"
# What every training checkpoint (format 1 on) holds, and sampling, validating, distilling and
# resuming read: the config to rebuild the network, its weights (EMA ones None without an EMA),
# the image size it was built for, and the epochs trained.
TRAINING_KEYS = ("config", "model", "ema", "image_shape", "epoch")
# What a latent model's checkpoint (config model.autoencoder) adds: which autoencoder, at which scale.
LATENT_KEYS = ("digest", "scale")
# What resuming restores besides the weights (format 2 on): optimizer, loss scaler, RNGs, counters.
RESUME_KEYS = (
    "optimizer",
    "scaler",
    "generator",
    "rng",
    "step",
    "batch_in_epoch",
    "epoch_losses",
    "epoch_skipped",
    "bad_in_a_row",
    "best_val_loss",
)
OTHER_CHECKPOINT = "use another checkpoint of the run (last.pt, best.pt, checkpoints/step-*.pt) or train again"
CHANGED_CONFIG = f"the config stored with them was changed; {OTHER_CHECKPOINT}"  # weights no longer fit it


def save_checkpoint(payload: dict[str, Any], *paths: Path, then: str) -> None:
    """Serialise `payload` once and write it to each path: a temporary file in the same folder,
    fsync, then rename over the path. A write that fails (disk full, permissions) is refused in
    one line that ends with `then`, the command that carries on once the cause is fixed.

    A crash mid-write leaves the previous file intact (rename is atomic on POSIX) and at worst a
    hidden `.NAME.*.tmp`, which `remove_partial_writes` clears and resuming never reads.
    """
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, **payload}, buffer)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
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
                f"could not write {path} ({exc.strerror or exc}): {kept}; "
                f"free disk space (or fix the folder), then {then}"
            ) from None
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint dict at `path`, on the CPU, after checking that it is one of ours; one that
    holds network weights (`model`) must also be a whole training checkpoint (`TRAINING_KEYS`)."""
    if not path.is_file():
        raise KneegenError(f"checkpoint {path} not found: train first (kneegen train) or give an existing .pt file")
    try:
        with warnings.catch_warnings():  # torch warns before refusing foreign pickles: the refusal says it all
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only unpickling of arbitrary bytes fails in many ways
        raise unreadable(path, exc) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise KneegenError(f"{path} is not a kneegen checkpoint: give a last.pt or best.pt from a kneegen run")
    version = payload.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise KneegenError(f"{path} is damaged (its format_version is {version!r}, not a number); {OTHER_CHECKPOINT}")
    if version > FORMAT_VERSION:
        raise KneegenError(
            f"{path} has checkpoint format {payload['format_version']}, newer than this kneegen "
            f"understands ({FORMAT_VERSION}): upgrade kneegen"
        )
    if "model" in payload:
        check_training_keys(path, payload)
    if version < 3:
        record_group_norm(payload)
    return payload


def record_group_norm(payload: dict[str, Any]) -> None:
    """An autoencoder checkpoint written before `model.vae.norm` existed was trained with GroupNorm,
    the only normalisation then; its config says so from here on, since the default is now another."""
    config = payload.get("config")
    model = config.get("model") if isinstance(config, dict) else None
    if isinstance(model, dict) and model.get("arch") == "vae" and isinstance(model.setdefault("vae", {}), dict):
        model["vae"].setdefault("norm", "group")


def load_training_checkpoint(path: Path) -> dict[str, Any]:
    """A training run's checkpoint (not, say, an EMA snapshot): what sampling, validation and
    distillation rebuild a network from."""
    payload = load_checkpoint(path)
    check_training_keys(path, payload)
    return payload


def check_training_keys(path: Path, payload: dict[str, Any]) -> None:
    """Refuse, naming them, the keys a training checkpoint lacks, before anything reads them."""
    missing = [key for key in TRAINING_KEYS if key not in payload]
    if "config" in payload and not isinstance(payload["config"], dict):
        missing.insert(0, "config")
    if "model" in payload and not isinstance(payload["model"], dict):
        missing.append("model weights")
    if payload.get("ema") is not None and not isinstance(payload["ema"], dict):
        missing.append("EMA weights")
    shape = payload.get("image_shape")
    if "image_shape" in payload and not (
        isinstance(shape, (list, tuple)) and len(shape) == 2 and all(type(n) is int and n > 0 for n in shape)
    ):
        missing.append("image_shape (H, W)")
    if missing:
        raise KneegenError(
            f"{path} is not a kneegen checkpoint (no {', '.join(missing)}): give a last.pt or best.pt of a kneegen run"
        )
    model = payload["config"].get("model")
    latent = payload.get("latent")
    if (
        isinstance(model, dict)
        and model.get("autoencoder")
        and not (isinstance(latent, dict) and all(key in latent for key in LATENT_KEYS))
    ):
        raise KneegenError(
            f"{path} is not a complete kneegen latent diffusion checkpoint (no latent, the record of the autoencoder "
            f"it was trained with); {OTHER_CHECKPOINT}"
        )


def check_resume_keys(path: Path, payload: dict[str, Any]) -> None:
    """Refuse, naming them, the training state a checkpoint lacks, before resuming reads any of it."""
    check_training_keys(path, payload)
    missing = [key for key in RESUME_KEYS if key not in payload]
    if missing:
        raise KneegenError(
            f"{path} is not a complete kneegen checkpoint to resume (no {', '.join(missing)}): resume from another "
            "checkpoint of the run, or start a new run (this one can still be sampled)"
        )


def unreadable(path: Path, exc: Exception) -> KneegenError:
    """Why torch could not read `path`, in words: its own reasons are library internals."""
    with path.open("rb") as handle:
        start = handle.read(2)
    if not start:
        return KneegenError(f"{path} is empty (0 bytes), not a checkpoint; {OTHER_CHECKPOINT}")
    if not zipfile.is_zipfile(path):
        if start == b"PK":  # the start of a zip archive, as torch writes, whose end is missing
            return KneegenError(
                f"{path} is truncated (a torch file cut short), not a readable checkpoint; {OTHER_CHECKPOINT}"
            )
        return KneegenError(
            f"{path} is not a torch checkpoint file (it is text, a plain pickle or some other format): "
            "give a last.pt or best.pt of a kneegen run"
        )
    if isinstance(exc, pickle.UnpicklingError):  # weights_only refused what it holds
        return KneegenError(
            f"{path} holds Python objects besides tensors and plain values, which kneegen checkpoints never do, "
            "so it is not loaded (it could run code): give a last.pt or best.pt of a kneegen run"
        )
    return KneegenError(f"{path} is damaged, or a zip archive that is no torch checkpoint; {OTHER_CHECKPOINT}")


def load_weights(network: nn.Module, weights: dict[str, Any], source: str, advice: str) -> None:
    """`network.load_state_dict(weights)`, or one line saying they do not fit the network the
    config's model.* settings build (torch reports each mismatched tensor: a hundred lines for one
    wrong width); `advice` says what to do about it where it happened."""
    try:
        network.load_state_dict(weights)
    except RuntimeError:
        raise KneegenError(f"{source}: the weights do not fit the config's model.* settings: {advice}") from None


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
