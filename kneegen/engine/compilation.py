"""The optional `torch.compile` of the network for sampling, decided in this one place.

Sampling calls one network thousands of times at one batch shape, the case compilation is for.
On CUDA the mode is "reduce-overhead": Inductor's fused kernels are replayed as one CUDA graph
per call, which removes the launch cost of the U-Net's few hundred small kernels. Elsewhere it is
the default mode: there are no CUDA graphs, the convolutions go to oneDNN compiled or not, and
the gain is the GroupNorm/SiLU/residual work fused around them. On a 2-core AVX2 CPU, fp32, one
thread (benchmarks/sampling.py --compile): the default U-Net at 64², batch 8, 0-12 % faster
(noisy), after ~70 s of compilation (~6 s with Inductor's cache warm); the tiny test model at 32²,
1.4x. "max-autotune-no-cudagraphs" would only tune GEMM templates for the few Linear layers, at
several times the compile time; `freezing` (oneDNN weight prepacking) measured about the same.

Shapes are static (`dynamic=False`): one graph for the batch size of the first call. The last,
partial batch of a run is padded up to that size with zeros and the extra rows dropped, which
costs at most one batch of wasted work. Measured against the alternatives: a second static graph
compiles as slowly as the first (~30 s for the tiny model); a batch marked dynamic compiled as
slowly or slower (up to 3x with `dynamic=True`, which even so compiled a second graph for the
second batch size) and ran 2 % (default U-Net) to 19 % (tiny model) slower. The network treats
images independently in eval mode, so the padding does not change the real rows.

Compilation happens at the first call, and may fail there (no C++ compiler, no Triton, an
unsupported device): the module then prints one warning line on stderr and runs eagerly.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import Tensor, nn

from kneegen.engine.conditioning import call_network
from kneegen.engine.device import Compute

CUDA_GRAPH_MODE = "reduce-overhead"  # Inductor kernels replayed as a CUDA graph
DEFAULT_MODE = "default"  # Inductor kernels, no CUDA graphs (there are none off CUDA)


def compile_mode(device: torch.device) -> str:
    """The torch.compile mode for sampling on `device` (see the module docstring for why)."""
    return CUDA_GRAPH_MODE if device.type == "cuda" else DEFAULT_MODE


def compile_for_inference(network: nn.Module, compute: Compute) -> nn.Module:
    """`network` compiled for repeated inference calls `forward(x, t[, c])` at one batch size;
    eager again, with a warning, if compilation fails."""
    return CompiledNetwork(network, compute)


class CompiledNetwork(nn.Module):
    """forward(x (B, C, H, W), t (B,), c (B, K) or None) like the network, through a graph of fixed
    batch size."""

    def __init__(self, network: nn.Module, compute: Compute) -> None:
        super().__init__()
        self.network = network
        self.compiled = torch.compile(network, mode=compile_mode(compute.device), dynamic=False)
        self.memory_format = compute.memory_format
        self.batch: int | None = None  # the batch size the graph is compiled for, set on first call
        self.failed = False

    def forward(self, x: Tensor, t: Tensor, c: Tensor | None = None) -> Tensor:
        if self.failed:
            return call_network(self.network, x, t, c)
        real = x.shape[0]
        self.batch = max(self.batch or real, real)  # a larger batch compiles a graph of its size
        # Fresh inputs of the graph's batch size, padded with zeros (any valid t; those rows are dropped).
        # Made here every time so that every call's tensors look alike to the graph's guards: the
        # caller's may be normal tensors and the padded ones inference tensors, a recompilation.
        padding = self.batch - real
        x = torch.cat([x, x.new_zeros((padding, *x.shape[1:]))]).contiguous(memory_format=self.memory_format)
        t = torch.cat([t, t.new_zeros(padding)])  # (batch,)
        if c is not None:
            c = torch.cat([c, c.new_full((padding, c.shape[1]), math.nan)])  # (batch, K), padding: none given
        try:
            output = call_network(self.compiled, x, t, c)
        except Exception as error:  # noqa: BLE001 - any compiler failure; eager re-raises real bugs
            self.failed = True
            reason = (str(error).strip().splitlines() or [""])[0][:160]
            print(
                f"warning: torch.compile failed ({type(error).__name__}: {reason}); sampling continues "
                f"uncompiled (drop --compile or set sample.compile: false to skip the attempt)",
                file=sys.stderr,
                flush=True,
            )
            return call_network(self.network, x[:real], t[:real], None if c is None else c[:real])
        return output[:real].clone()  # a copy: CUDA graphs overwrite their outputs on the next replay
