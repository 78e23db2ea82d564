"""Post-hoc EMA in a run: power-EMA snapshots each epoch, exact resume, and `kneegen ema` mixing
them into checkpoints of other EMA lengths."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from kneegen.cli import build_app
from kneegen.ema_snapshots import SNAPSHOTS, posthoc_payload, snapshot_paths
from kneegen.engine.checkpoint import load_checkpoint
from kneegen.engine.device import resolve_compute
from kneegen.engine.posthoc_ema import STORED_SIGMA_RELS
from kneegen.engine.trained import load_trained_model
from kneegen.errors import KneegenError
from kneegen.sampling import SamplerChoice, sample_batches
from kneegen.training_run import run_training

from helpers import tiny_config

CPU = resolve_compute("cpu", "fp32")
SNAPSHOTTING = {"ema_snapshots": True, "epochs": 3}


@pytest.fixture(scope="module")
def snapshot_run(prepared, tmp_path_factory):
    work = tmp_path_factory.mktemp("snapshots")
    run_training(tiny_config(prepared, work, train=SNAPSHOTTING), work / "run")
    return work / "run"


def test_each_epoch_stores_both_power_emas_at_its_last_step(snapshot_run):
    paths = snapshot_paths(snapshot_run)
    steps = [load_checkpoint(path)["step"] for path in paths]
    last = load_checkpoint(snapshot_run / "last.pt")
    assert len(paths) == 3 and steps[-1] == last["step"] and steps == sorted(steps)
    stored = load_checkpoint(paths[-1])
    assert stored["sigma_rels"] == list(STORED_SIGMA_RELS)
    for kept, live in zip(stored["power_emas"], last["power_emas"]):
        weight = next(name for name in live if name.endswith("weight"))
        assert kept[weight].dtype == torch.float16
        torch.testing.assert_close(kept[weight].float(), live[weight], rtol=1e-3, atol=1e-4)


def test_a_stored_length_mixes_back_to_its_own_snapshot(snapshot_run):
    last = load_checkpoint(snapshot_run / "last.pt")
    mixed = posthoc_payload(snapshot_run, 0.10)
    assert mixed["posthoc_ema"] == {"sigma_rel": 0.10, "step": last["step"], "snapshots": 6}
    for name, tensor in last["power_emas"][1].items():
        if tensor.is_floating_point():
            torch.testing.assert_close(mixed["ema"][name], tensor, rtol=2e-3, atol=2e-4)
    assert mixed["model"].keys() == mixed["ema"].keys()


@pytest.mark.slow
def test_resume_continues_the_power_emas_and_drops_later_snapshots(prepared, tmp_path, snapshot_run):
    run_dir = tmp_path / "run"
    run_training(tiny_config(prepared, tmp_path, train={**SNAPSHOTTING, "epochs": 2}), run_dir)
    (run_dir / SNAPSHOTS / "step-99999999.pt").write_bytes(b"written after the checkpoint, before a crash")
    run_training(tiny_config(prepared, tmp_path, train=SNAPSHOTTING), run_dir, resume=True)
    assert [p.name for p in snapshot_paths(run_dir)] == [p.name for p in snapshot_paths(snapshot_run)]
    straight, resumed = load_checkpoint(snapshot_run / "last.pt"), load_checkpoint(run_dir / "last.pt")
    for a, b in zip(straight["power_emas"], resumed["power_emas"]):
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_kneegen_ema_writes_checkpoints_that_sample_and_names_the_best(snapshot_run, monkeypatch):
    monkeypatch.chdir(snapshot_run.parent)
    result = CliRunner().invoke(build_app(), ["ema", str(snapshot_run), "--lengths", "0.05,0.2", "--samples", "16"])
    assert result.exit_code == 0, result.output
    assert "best: kneegen sample generate 64 --checkpoint" in result.output
    for sigma_rel in ("0.050", "0.200"):
        model = load_trained_model(snapshot_run / f"ema-{sigma_rel}.pt", CPU)
        ((_, images),) = sample_batches(model, CPU, SamplerChoice("ddim", 2), [0], 1)
        assert images.shape == (1, *model.image_shape)


def test_a_run_without_snapshots_or_a_bad_length_is_one_line(trained_run, snapshot_run):
    with pytest.raises(KneegenError, match="train.ema_snapshots=true"):
        posthoc_payload(trained_run, 0.1)
    with pytest.raises(KneegenError, match="out of range"):
        posthoc_payload(snapshot_run, 0.5)
    result = CliRunner().invoke(build_app(), ["ema", str(snapshot_run), "--lengths", "short"])
    assert result.exit_code == 1 and "--lengths 'short'" in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1
