"""Where runs live and how a checkpoint argument is found.

A run dir holds config.yaml, metrics.jsonl, the loss plots and last.pt / best.pt, and with
`train.keep_checkpoints` the newest step checkpoints as checkpoints/step-NNNNNNNN.pt. Commands
that need a checkpoint default to the latest run's best.pt, and accept a bare file name
(`best.pt`, `last.pt`) that is looked up in the latest run.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path

from kneegen.engine.distributed import Distributed
from kneegen.errors import KneegenError

RUNS_ROOT = Path("runs")
CONFIG = "config.yaml"  # the run's config, written before its first step
LAST = "last.pt"
BEST = "best.pt"
LOCK = ".training.lock"  # held by the process training into a run dir, while it does
UNLOCKABLE = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP}  # flock's "not on this file system"
STEP_CHECKPOINTS = "checkpoints"  # folder of the kept step checkpoints
STEP_PATTERN = "step-*.pt"


def new_run_dir(root: Path = RUNS_ROOT) -> Path:
    """runs/YYYYmmdd-HHMMSS, with a suffix if two runs start in the same second."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, n = root / stamp, 1
    while candidate.exists():
        n += 1
        candidate = root / f"{stamp}-{n}"
    return candidate


def start_run_dir(run_dir: Path) -> Path:
    """Create the run dir; an existing one holds someone's results and is never reused silently."""
    if holds_anything(run_dir):
        raise KneegenError(
            f"run dir {run_dir} already exists: pass --resume to continue it, or choose another --run-dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


@contextlib.contextmanager
def training_into(run_dir: Path) -> Iterator[None]:
    """Hold the run dir for one training process: a second one (say, `--resume` typed twice)
    would write the same checkpoints and metrics, each cutting back the other's. The lock is the
    kernel's (flock), so a process that dies, even by kill -9, lets go of it. The file stays:
    removing it would let a process that opened it before lock a file nobody else sees."""
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform: the run dir is not guarded
        yield
        return
    with open(run_dir / LOCK, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            raise KneegenError(
                f"run dir {run_dir} is being trained by another process (pid {holder}): let it finish "
                "(or stop it) first, or train into another --run-dir"
            ) from None
        except OSError as error:  # a file system without locks (NFS without lockd, Lustre without flock)
            if error.errno not in UNLOCKABLE:
                raise
            yield
            return
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        yield


class RunDirHold:
    """The run dirs one training holds (`training_into`, by rank 0, until `stack` closes). A
    refusal reaches every process, so no rank waits on a collective rank 0 never joins."""

    def __init__(self, stack: contextlib.ExitStack, dist: Distributed) -> None:
        self.stack, self.dist = stack, dist
        self.held: set[Path] = set()

    def __call__(self, run_dir: Path) -> None:
        where = run_dir.resolve()
        if where in self.held:
            return
        refusal = None
        if self.dist.is_main:
            try:
                self.stack.enter_context(training_into(run_dir))
            except KneegenError as error:
                refusal = str(error)
        refusal = self.dist.broadcast(refusal)
        if refusal:
            raise KneegenError(refusal)
        self.held.add(where)


def latest_run(root: Path = RUNS_ROOT) -> Path:
    """The run whose last checkpoint was written most recently."""
    runs = [p.parent for p in root.glob(f"*/{LAST}")] if root.is_dir() else []
    if not runs:
        raise KneegenError(
            f"no trained run found under {root}/: train one first (kneegen train), or name a checkpoint file"
        )
    return max(runs, key=lambda run: (run / LAST).stat().st_mtime)


def latest_run_dir(root: Path = RUNS_ROOT) -> Path:
    """The run most recently started or checkpointed, with or without a checkpoint: the one
    `train --resume` continues (a run stopped before its first checkpoint included)."""
    run_dir = newest_run_dir(root)
    if run_dir is None:
        raise KneegenError(f"--resume: no run found under {root}/ to continue: start one with kneegen train")
    return run_dir


def newest_run_dir(root: Path = RUNS_ROOT) -> Path | None:
    """`latest_run_dir`, or None when `root` holds no run: for commands whose default is the
    latest run and that say in their own words what they want instead."""
    runs = [p.parent for p in root.glob(f"*/{CONFIG}")] if root.is_dir() else []
    if not runs:
        return None
    return max(runs, key=lambda run: max(p.stat().st_mtime for p in (run / CONFIG, run / LAST) if p.is_file()))


def check_resume_target(checkpoint: Path, run_dir: Path) -> None:
    """`--resume-from CHECKPOINT --run-dir DIR` continues the checkpoint's training in DIR: its own
    run, or a new (or empty) folder, never another run, whose checkpoints, metrics and EMA
    snapshots the continued training would replace."""
    home = home_run_of(checkpoint)
    if (home is not None and same_place(home, run_dir)) or not holds_anything(run_dir):
        return
    held = "a file" if not run_dir.is_dir() else "another run" if (run_dir / CONFIG).is_file() else "not empty"
    own = f", or --run-dir {home} (its own run)" if home is not None else ""
    raise KneegenError(
        f"--run-dir {run_dir} is {held}, and --resume-from {checkpoint} is none of its checkpoints: continuing "
        f"there would replace its files: choose a new or empty --run-dir{own}"
    )


def holds_anything(path: Path) -> bool:
    """Whether `path` is a file, or a folder with anything in it: a place a new run may not write
    (a lock left by a training process that was killed holds nothing)."""
    return path.exists() and (not path.is_dir() or any(entry.name != LOCK for entry in path.iterdir()))


def same_place(a: Path, b: Path) -> bool:
    """Whether two paths name the same file or folder, however spelt (relative, `..`, links)."""
    return a.resolve() == b.resolve()


def resolve_checkpoint(argument: Path | None, root: Path = RUNS_ROOT) -> Path:
    """An explicit file, a run dir (its best.pt), a bare name in the latest run, or the latest best.pt."""
    if argument is None:
        return best_or_last(latest_run(root))
    if argument.is_dir():
        return best_or_last(argument)
    if argument.exists() or len(argument.parts) > 1:
        return argument
    if newest_run_dir(root) is None:
        raise KneegenError(f"checkpoint {argument} not found, and no run under {root}/ holds it: check the path")
    candidate = latest_run(root) / argument
    if not candidate.exists():
        raise KneegenError(
            f"checkpoint {argument} not found here nor in the latest run {candidate.parent}: "
            f"give a path such as {candidate.parent / BEST}"
        )
    return candidate


def best_or_last(run_dir: Path) -> Path:
    """best.pt, or last.pt for a run that has not validated yet."""
    best = run_dir / BEST
    return best if best.is_file() else run_dir / LAST


def step_checkpoint(run_dir: Path, step: int) -> Path:
    """checkpoints/step-00001234.pt: zero-padded, so names sort in step order."""
    return run_dir / STEP_CHECKPOINTS / f"step-{step:08d}.pt"


def step_checkpoints(run_dir: Path) -> list[Path]:
    """The kept step checkpoints of a run, oldest first."""
    return sorted((run_dir / STEP_CHECKPOINTS).glob(STEP_PATTERN))


def resume_candidates(run_dir: Path) -> list[Path]:
    """Where a resumed run may continue from, newest first: last.pt (written first at every
    checkpoint, so never older than a step checkpoint), the step checkpoints, then best.pt
    (an earlier point of the run, but better than none when the others are damaged)."""
    return [run_dir / LAST, *reversed(step_checkpoints(run_dir)), run_dir / BEST]


def home_run_of(checkpoint: Path) -> Path | None:
    """The run dir a checkpoint file lives in; None for a file copied out of its run (resumed, it
    continues in a new run dir, not in whatever folder holds it)."""
    home = run_dir_of(checkpoint)
    return home if (home / CONFIG).is_file() else None


def run_dir_of(checkpoint: Path) -> Path:
    """The run dir a checkpoint file belongs to (runs/x for runs/x/last.pt and runs/x/checkpoints/*.pt)."""
    parent = checkpoint.parent
    return parent.parent if parent.name == STEP_CHECKPOINTS else parent
