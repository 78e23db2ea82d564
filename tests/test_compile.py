"""`sample.compile`: the compiled network draws the same images as eager, pads the last partial
batch instead of compiling a second graph, and falls back to eager when compilation fails."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kneegen.config import ModelConfig
from kneegen.engine.compilation import compile_for_inference, compile_mode
from kneegen.engine.device import Compute
from kneegen.engine.network import build_network
from kneegen.engine.trained import load_trained_model
from kneegen.sampling import SamplerChoice, sample_batches

CPU_FP32 = Compute(torch.device("cpu"), None)
TINY = ModelConfig(
    "unet", {"unet": dict(channels=16, channel_mults=[1, 2], blocks_per_level=1, attention_levels=[1], patch_size=2)}
)


def random_network() -> torch.nn.Module:
    """The tiny U-Net with every weight random (its zero-initialised head would output zeros)."""
    torch.manual_seed(0)
    network = build_network(TINY, (16, 16)).eval()
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.normal_(0, 0.1)
    return network


class Recorder:
    """A stand-in for torch.compile's result: records the batch sizes it is called with."""

    def __init__(self, network: torch.nn.Module) -> None:
        self.network, self.batches = network, []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        return self.network(x, t)


@pytest.mark.slow
def test_compiled_sampling_draws_the_same_images_as_eager(trained_run: Path):
    """Seeds 0-2 in batches of 2: one real compilation, the last batch of 1 padded to 2."""
    model = load_trained_model(trained_run / "best.pt", CPU_FP32)
    seeds = [0, 1, 2]
    eager = [images for _, images in sample_batches(model, CPU_FP32, SamplerChoice("ddim", 2), seeds, 2)]
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = [
        images for _, images in sample_batches(model, CPU_FP32, SamplerChoice("ddim", 2, compile=True), seeds, 2)
    ]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 1, "the partial batch recompiled"
    eager_images, compiled_images = np.concatenate(eager).astype(int), np.concatenate(compiled).astype(int)
    assert compiled_images.shape == eager_images.shape == (3, 32, 32)
    difference = np.abs(compiled_images - eager_images)
    assert difference.max() <= 1 and difference.mean() < 0.01  # float reordering flips a rare rounding


def test_a_partial_batch_is_padded_to_the_compiled_size(monkeypatch):
    network = random_network()
    recorder = Recorder(network)
    monkeypatch.setattr(torch, "compile", lambda net, **_: recorder)
    compiled = compile_for_inference(network, CPU_FP32)
    x, t = torch.randn(4, 1, 16, 16), torch.tensor([999, 500, 20, 0])
    with torch.inference_mode():
        full, partial = compiled(x, t), compiled(x[:3], t[:3])
        expected = network(x, t)
    assert recorder.batches == [4, 4]
    assert partial.shape == (3, 1, 16, 16)
    torch.testing.assert_close(full, expected)
    torch.testing.assert_close(partial, expected[:3])


def test_a_failing_compiler_falls_back_to_eager_with_one_warning_line(monkeypatch, capsys):
    def no_toolchain(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("InvalidCxxCompiler: No working C compiler detected\n(and a long traceback)")

    monkeypatch.setattr(torch, "compile", lambda net, **_: no_toolchain)
    network = random_network()
    compiled = compile_for_inference(network, CPU_FP32)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([999, 10])
    with torch.inference_mode():
        first, second, expected = compiled(x, t), compiled(x, t), network(x, t)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines  # warned once, not once per call
    assert "torch.compile failed" in lines[0] and "No working C compiler" in lines[0] and "--compile" in lines[0]


@pytest.mark.parametrize("device, mode", [("cuda", "reduce-overhead"), ("cpu", "default"), ("mps", "default")])
def test_cuda_graphs_only_on_cuda(device, mode):
    assert compile_mode(torch.device(device)) == mode
