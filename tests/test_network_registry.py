"""Networks as a registry: a package adds one through the `kneegen.networks` entry-point group and
kneegen trains, resumes and samples it by name; checkpoints from before the registry still load."""

from __future__ import annotations

import pytest
import torch

from kneegen.config import FLAT_UNET_KEYS, RunConfig, from_dict
from kneegen.engine.checkpoint import load_checkpoint, save_checkpoint
from kneegen.engine.device import resolve_compute
from kneegen.engine.network import network_settings, registered_networks
from kneegen.engine.trained import load_trained_model
from kneegen.errors import KneegenError
from kneegen.sampling import SamplerChoice, sample_batches
from kneegen.training_run import run_training

from helpers import install_plugin, tiny_config

CPU = resolve_compute("cpu", "fp32")

TOY_NETWORK = """
from dataclasses import dataclass

import torch
from torch import nn

from kneegen.engine.network import Network
from kneegen.errors import KneegenError


@dataclass
class ToyConfig:
    width: int = 4

    def check(self):
        if self.width < 1:
            raise KneegenError(f"model.toy.width = {self.width} must be >= 1")

    def size_multiple(self):
        return 1


class Toy(nn.Module):
    def __init__(self, cfg, image_channels=1):
        super().__init__()
        self.inner = nn.Conv2d(image_channels + 1, cfg.width, 3, padding=1)
        self.outer = nn.Conv2d(cfg.width, image_channels, 3, padding=1)

    def forward(self, x, t):
        time = (t.float() / 1000)[:, None, None, None].expand(-1, 1, *x.shape[2:])
        return self.outer(torch.relu(self.inner(torch.cat([x, time], dim=1))))


NETWORK = Network(Toy, ToyConfig)
"""


@pytest.mark.slow
def test_a_plugin_network_trains_resumes_and_samples_by_name(prepared, tmp_path, monkeypatch):
    install_plugin(tmp_path, monkeypatch, "kneegen.networks", "toy = toy_net:NETWORK", "toy_net", TOY_NETWORK)
    assert "toy" in registered_networks()
    run_dir = tmp_path / "run"
    model = {"arch": "toy", "toy": {"width": 6}}
    run_training(tiny_config(prepared, tmp_path, model=model, train={"epochs": 1}), run_dir)
    run_training(tiny_config(prepared, tmp_path, model=model, train={"epochs": 2}), run_dir, resume=True)

    trained = load_trained_model(run_dir / "last.pt", CPU)
    assert type(trained.network).__name__ == "Toy" and trained.network.inner.out_channels == 6
    assert trained.epoch == 2 and trained.config.model.sections["toy"] == {"width": 6}
    (images,) = [batch for _, batch in sample_batches(trained, CPU, SamplerChoice("ddim", 2), [0, 1], 2)]
    assert images.shape == (2, *trained.image_shape) and images.std() > 0

    with pytest.raises(KneegenError, match=r"model\.toy\.width = 0"):
        run_training(tiny_config(prepared, tmp_path, model={"arch": "toy", "toy": {"width": 0}}), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_a_plugin_that_fails_to_load_is_named_in_one_line(tmp_path, monkeypatch):
    install_plugin(
        tmp_path,
        monkeypatch,
        "kneegen.networks",
        "broken = broken_net:NETWORK",
        "broken_net",
        "raise ImportError('no torch_geometric')\n",
    )
    with pytest.raises(KneegenError, match=r"network plugin 'broken' \(broken_net:NETWORK\).*no torch_geometric"):
        registered_networks()


def test_an_unknown_arch_lists_the_registered_networks(prepared, tmp_path):
    with pytest.raises(KneegenError, match=r"model\.arch = 'transformer' is not one of seed, unet"):
        run_training(tiny_config(prepared, tmp_path, model={"arch": "transformer"}), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_from_before_network_sections_still_loads_and_samples_alike(trained_run, tmp_path):
    """Checkpoints written until 2026-12 hold the U-Net's keys flat under `model`."""
    payload = load_checkpoint(trained_run / "best.pt")
    flat = {key: value for key, value in payload["config"]["model"]["unet"].items() if key in FLAT_UNET_KEYS}
    old = {**payload, "config": {**payload["config"], "model": {"arch": "unet", **flat}}}
    assert "channels" in old["config"]["model"]
    save_checkpoint(
        {k: v for k, v in old.items() if k not in ("format", "format_version")}, tmp_path / "old.pt", then="retry"
    )

    now, before = load_trained_model(trained_run / "best.pt", CPU), load_trained_model(tmp_path / "old.pt", CPU)
    assert before.config == now.config
    parsed = from_dict(RunConfig, old["config"], "old.pt", "").model  # keys added since take their defaults
    assert network_settings(parsed) == network_settings(now.config.model)
    choice = SamplerChoice("ddim", 3)
    assert torch.equal(*(torch.as_tensor(next(sample_batches(m, CPU, choice, [5], 1))[1]) for m in (now, before)))
