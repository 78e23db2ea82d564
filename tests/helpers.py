"""The tests' tiny setup as plain functions: a small model config, a 32×32 phantom, prepare options.

Test modules import these directly (`from helpers import tiny_config`); the fixtures built from
them live in conftest.py. pytest puts tests/ on sys.path (`pythonpath` in pyproject.toml).
"""

from __future__ import annotations

import copy
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner, Result

from kneegen.cli import build_app
from kneegen.config import RunConfig, load_config
from kneegen.data.options import PrepareOptions
from kneegen.data.splits import SplitFractions

IMAGE_SIZE = 32
PHANTOM_IMAGES = 60
PHANTOM_SLICES_PER_VOLUME = 10  # 6 patients

# A model that trains in about a second per epoch on 50 images of 32×32 on one CPU thread.
TINY_MODEL: dict[str, Any] = {
    "arch": "unet",
    "unet": {"channels": 16, "channel_mults": [1, 2], "blocks_per_level": 1, "attention_levels": [1], "patch_size": 2},
}

TINY_RUN: dict[str, Any] = {
    "device": "cpu",
    "precision": "fp32",
    "model": TINY_MODEL,
    "diffusion": {"timesteps": 1000, "schedule": "cosine", "prediction": "v", "loss": "l2"},
    "train": {
        "epochs": 2,
        "batch_size": 16,
        "lr": 2e-3,
        "warmup_steps": 0,
        "ema_decay": 0.9,
        "seed": 0,
        "val_every": 1,
        "val_images": 16,
        "val_timesteps": 4,
    },
    "sample": {"sampler": "ddim", "steps": 4, "eta": 0.0, "batch_size": 8},
}


def tiny_run_dict(data: Path | str, **sections: dict[str, Any]) -> dict[str, Any]:
    """The tiny run config as a plain dict (YAML-ready), with `data` and section overrides."""
    raw = copy.deepcopy(TINY_RUN)
    raw["data"] = str(data)
    for section, values in sections.items():
        raw[section].update(values)
    return raw


def tiny_config(data: Path | str, tmp_dir: Path, **sections: dict[str, Any]) -> RunConfig:
    """The tiny config through the real loader (YAML file → validated RunConfig)."""
    path = tmp_dir / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_run_dict(data, **sections)))
    return load_config(path)


def prepare_options(size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE), **changes: Any) -> PrepareOptions:
    """The tests' prepare settings: 6 phantom patients → 5 train, 1 val, no test; one process."""
    settings: dict[str, Any] = {"size": size, "fractions": SplitFractions(0.8, 0.2, 0.0), "seed": 0, "workers": 1}
    return PrepareOptions(**{**settings, **changes})


def invoke(*args: object) -> Result:
    """The CLI through Typer's test runner, every argument as the shell would pass it: a string."""
    return CliRunner().invoke(build_app(), [str(a) for a in args])


def one_line_error(result: Result, *named: str) -> str:
    """The refusal's single line (exit status ≠ 0, no traceback), checked to name each of `named`."""
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for thing in named:
        assert thing in lines[0], lines[0]
    return lines[0]


def install_plugin(
    folder: Path,
    monkeypatch: pytest.MonkeyPatch,
    group: str,
    entry_points: str,
    module: str,
    source: str,
    dist: str = "",
) -> None:
    """A package `dist` (default: `module`) on sys.path, as pip would install it: its entry points
    in `group` (lines "name = module:object") and the module's `source`, imported afresh."""
    dist = dist or module
    dist_info = folder / f"{dist}-0.1.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(f"[{group}]\n{entry_points}\n")
    (folder / f"{module}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, module, raising=False)
