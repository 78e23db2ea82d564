"""Which checkpoints a training run writes, and which one `--resume` continues from.

Written: last.pt at every epoch end (and on Ctrl-C), the newest `train.keep_checkpoints` step
checkpoints, best.pt when the validation loss (or FID) improved. Read back: the newest readable
one, after checking that the config may continue it exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kneegen.config import RunConfig, from_dict, to_dict
from kneegen.engine.checkpoint import check_resume_keys, load_checkpoint, save_checkpoint
from kneegen.engine.latent import LatentSpace
from kneegen.engine.plugins import resolve_plugins
from kneegen.engine.training import TrainState, rng_states, state_payload
from kneegen.engine.validation import ValidationResult
from kneegen.errors import KneegenError
from kneegen.evaluation.during_training import SampleQuality
from kneegen.progress import console
from kneegen.run import Run
from kneegen.runs import BEST, LAST, resume_candidates, step_checkpoint, step_checkpoints

ARCHITECTURE_SECTIONS = ("model", "diffusion", "distill")  # a resumed run may not change these
MAY_MOVE = ("model.autoencoder", "distill.teacher")  # files that may move: checked by content hash, or saved inside
POSITION_KEYS = ("batch_size", "seed")  # train keys that place a mid-epoch position in the data


def save_training_checkpoint(
    state: TrainState, run: Run, validation: ValidationResult | None = None, quality: SampleQuality | None = None
) -> None:
    """Every process hands its RNG states to rank 0, which writes last.pt, the step history
    (`train.keep_checkpoints`) and best.pt when the validation loss (or, with `train.best_by:
    fid`, the FID) improved."""
    rng = run.dist.gather(rng_states())
    if not run.dist.is_main:
        return
    loss_improved = validation is not None and validation.loss < state.best_val_loss
    fid_improved = quality is not None and quality.fid < state.best_fid
    if loss_improved:
        state.best_val_loss = validation.loss  # type: ignore[union-attr]
    if fid_improved:
        state.best_fid = quality.fid  # type: ignore[union-attr]
    improved = fid_improved if run.cfg.train.best_by == "fid" else loss_improved
    payload = {
        **state_payload(state, rng),
        "config": to_dict(run.cfg),
        "image_shape": list(run.image_shape),
        "data_key": run.data_key,
    }
    if run.latent is not None:
        payload["latent"] = latent_record(run.latent, run.image_shape)
    keep = run.cfg.train.keep_checkpoints
    paths = [run.run_dir / LAST]  # first: last.pt is never older than a step checkpoint
    if keep > 0:
        paths.append(step_checkpoint(run.run_dir, state.step))
    if improved:
        paths.append(run.run_dir / BEST)
    save_checkpoint(payload, *paths, then=resume_command(state, run.run_dir))
    if keep > 0:
        for stale in step_checkpoints(run.run_dir)[:-keep]:
            stale.unlink()


def resume_command(state: TrainState, run_dir: Path) -> str:
    """The command that continues this run from its last checkpoint: `distill --resume` for a
    distillation, `train --resume` otherwise, with its run dir (the latest run may be another)."""
    command = "distill" if state.distillation is not None else "train"
    return f"kneegen {command} --resume --run-dir {run_dir}"


def resume_point(
    run_dir: Path | None, checkpoint: Path | None, cfg: RunConfig
) -> tuple[Path, dict[str, Any], str] | None:
    """(path, payload, the train keys changed) of `checkpoint`, or of the newest readable
    checkpoint of `run_dir` (a truncated or corrupt one is named and skipped); None when the run
    has no checkpoint file at all, i.e. it stopped before its first. Checks that `cfg` may continue it."""
    if checkpoint is not None:
        payload = load_checkpoint(checkpoint)
        return checkpoint, payload, check_resumable(checkpoint, payload, cfg)
    assert run_dir is not None
    candidates = [path for path in resume_candidates(run_dir) if path.is_file()]
    if not candidates:
        return None
    for path in candidates:
        try:
            payload = load_checkpoint(path)
        except KneegenError as error:
            console.print(f"skipping a damaged checkpoint: {error}", highlight=False, soft_wrap=True)
            continue
        return path, payload, check_resumable(path, payload, cfg)
    raise KneegenError(
        f"--resume: every checkpoint in {run_dir} is damaged ({', '.join(p.name for p in candidates)}): "
        f"start a new run with another --run-dir"
    )


def check_resumable(path: Path, payload: dict[str, Any], cfg: RunConfig) -> str:
    """Refuse a checkpoint too old to resume, and a config that would change the network, the
    process, or (mid-epoch) the meaning of the saved position in the data; return the data and
    the other train keys that changed (lr, epochs, …), as ", with train.lr 0.001 → 0.0005" for
    the log."""
    version = payload.get("format_version")
    if not isinstance(version, int) or version < 2:
        format_name = f"checkpoint format {version}" if version is not None else "no checkpoint format version"
        raise KneegenError(
            f"{path} has {format_name}, which cannot be resumed exactly: sample from it, or start a new run"
        )
    check_resume_keys(path, payload)
    saved = to_dict(resolve_plugins(from_dict(RunConfig, payload["config"], source=str(path), prefix=""), str(path)))
    current = to_dict(resolve_plugins(cfg, "config"))
    changed = [
        difference
        for section in ARCHITECTURE_SECTIONS
        for key in sorted(current.get(section, {}).keys() | saved.get(section, {}).keys())  # one side may omit it
        if not moved(section, key, current, saved)
        for difference in differences(
            f"{section}.{key}", saved.get(section, {}).get(key), current.get(section, {}).get(key)
        )
    ]
    if payload["batch_in_epoch"] > 0:
        changed += [
            (f"train.{key}", saved["train"][key], current["train"][key])
            for key in POSITION_KEYS
            if current["train"][key] != saved["train"][key]
        ]
    if changed:
        values = "; ".join(f"{key}: {was!r} there, {now!r} now" for key, was, now in changed)
        raise KneegenError(
            f"--resume: {', '.join(key for key, _, _ in changed)} differ from the config of {path} ({values}); "
            "keep them as they were"
        )
    allowed = [
        f"train.{key} {saved['train'][key]} → {value}"
        for key, value in current["train"].items()
        if value != saved["train"][key]
    ]
    if current["data"] != saved["data"]:  # the same size of images (checked later), but other ones
        allowed.insert(0, f"data {saved['data']} → {current['data']}")
    return f", with {', '.join(allowed)}" if allowed else ""


def latent_record(space: LatentSpace, image_shape: tuple[int, int]) -> dict[str, Any]:
    """What a latent checkpoint records of its autoencoder: which one (by content hash), the
    scale its latents were trained at, and their (C, h, w)."""
    return {"digest": space.digest, "scale": space.scale, "shape": list(space.shape_of(image_shape))}


def differences(key: str, saved: Any, current: Any) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, current value) of each leaf that differs, so a message names
    model.unet.channels rather than all of model.unet."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [
            difference
            for name in sorted(saved.keys() | current.keys())
            for difference in differences(f"{key}.{name}", saved.get(name), current.get(name))
        ]
    return [] if saved == current else [(key, saved, current)]


def moved(section: str, key: str, current: dict[str, Any], saved: dict[str, Any]) -> bool:
    """A path in MAY_MOVE given anew (not added or dropped: a pixel run stays a pixel run)."""
    now, before = current.get(section, {}).get(key), saved.get(section, {}).get(key)
    return f"{section}.{key}" in MAY_MOVE and bool(now) and bool(before)
