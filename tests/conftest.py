"""Session fixtures: a small phantom, its 32×32 cache and one trained run of the tiny model.

Everything expensive is session-scoped so it happens once. Torch is kept to one thread: the
tests are small, and on a shared machine a second thread mostly adds contention. The settings the
fixtures are built from (tiny config, prepare options) are plain functions in helpers.py.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
# pytest-xdist sets COLUMNS=80 in its workers; Rich would fix its width from that at import and
# ignore the COLUMNS a test gives its own command, so a worker is left to behave as a serial run.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.pop("COLUMNS", None)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from kneegen.data.phantom import write_phantom  # noqa: E402
from kneegen.data.prepare import prepare_folder  # noqa: E402
from kneegen.training_run import run_training  # noqa: E402

from helpers import PHANTOM_IMAGES, PHANTOM_SLICES_PER_VOLUME, prepare_options, tiny_config  # noqa: E402


@pytest.fixture(scope="session")
def phantom_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 AKOA-named phantom slices (260×228), 10 per knee: 6 patients."""
    src = tmp_path_factory.mktemp("phantom") / "slices"
    write_phantom(src, PHANTOM_IMAGES, seed=0, slices_per_volume=PHANTOM_SLICES_PER_VOLUME)
    return src


@pytest.fixture(scope="session")
def prepared(phantom_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The phantom prepared into a 32×32 cache (read-only for tests: prepare elsewhere to modify)."""
    out = tmp_path_factory.mktemp("prepared") / "cache"
    prepare_folder(phantom_src, out, prepare_options())
    return out


@pytest.fixture(scope="session")
def trained_run(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run dir with last.pt / best.pt of the tiny model after 2 epochs."""
    work = tmp_path_factory.mktemp("trained")
    run_dir = work / "run"
    run_training(tiny_config(prepared, work), run_dir, resume=False)
    return run_dir


@pytest.fixture()
def small_src(phantom_src: Path, tmp_path: Path) -> Path:
    """20 phantom slices (2 patients) copied into a folder the test may add files to."""
    src = tmp_path / "src"
    src.mkdir()
    for path in sorted(phantom_src.glob("*.png"))[:20]:
        shutil.copy(path, src / path.name)
    return src
