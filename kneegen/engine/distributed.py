"""Data-parallel training over the processes `torchrun` starts, or one process without it.

Detected once from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK). A single
process gets `SINGLE`, whose collectives are no-ops, so the training loop has one code
path: `share`, `sum`, `sum_tensor`, `gather`, `no_sync` and `barrier` simply switch off.

How the work is cut up (pytorch/examples DDP tutorial; DistributedSampler semantics):
* `train.batch_size` is the global batch, the images of one optimizer step whatever the number
  of processes; process r trains on a contiguous share of every batch (sizes differ by ≤ 1).
* The epoch order comes from (seed, epoch) alone and t, ε are drawn for the whole global batch
  from a generator every process holds in the same state; each process keeps the rows of its
  share. So N processes make the update that one process makes on the same global batch.
  (Importance-sampled t also needs the loss history in the same state: every process adds the
  per-image losses of the whole batch, which `sum_tensor` collects from the shares.)
* DDP averages gradients over processes; each process scales its loss by N / batch_size so the
  average is the mean over the global batch.
* Rank 0 alone keeps the EMA, validates, and writes metrics, plots, previews and checkpoints.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from kneegen.engine.device import Compute
from kneegen.errors import KneegenError


@dataclass(frozen=True)
class Distributed:
    """This process's place among the training processes; one process when world_size is 1."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives run

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, validates and saves."""
        return self.rank == 0

    def share(self, batch_size: int) -> np.ndarray:
        """This process's positions 0 … batch_size−1 of a global batch: a contiguous slice."""
        return np.array_split(np.arange(batch_size), self.world_size)[self.rank]

    def wrap(self, network: nn.Module) -> nn.Module:
        """DistributedDataParallel around `network` (its gradients are averaged), or `network`."""
        if not self.enabled:
            return network
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(network, device_ids=device_ids)

    def no_sync(self, wrapped: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce of this micro-batch (all but the last of a step)."""
        if self.enabled and not sync:
            return wrapped.no_sync()  # type: ignore[operator]
        return contextlib.nullcontext()

    def sum(self, value: Tensor) -> float:
        """The sum of a scalar tensor over all processes."""
        if self.enabled:
            value = value.detach().to(self.device, torch.float32).clone()
            torch_dist.all_reduce(value)
        return float(value.item())

    def sum_tensor(self, value: Tensor) -> Tensor:
        """A tensor summed elementwise over all processes, in fp32 on the CPU. Each process
        filling its own rows of a zeros tensor gives every process the whole of it."""
        if self.enabled:
            value = value.detach().to(self.device, torch.float32).clone()
            torch_dist.all_reduce(value)
        return value.detach().to(torch.device("cpu"), torch.float32)

    def gather(self, obj: Any) -> list[Any]:
        """`obj` of every process, in rank order (pickled: small objects only)."""
        if not self.enabled:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj`, on every process."""
        if not self.enabled:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()


SINGLE = Distributed()  # one process: every collective is a no-op


def from_environment() -> Distributed:
    """The process's rank and world size as torchrun set them; one process when it did not."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE
    return Distributed(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world_size)


@contextlib.contextmanager
def process_group(dist: Distributed, compute: Compute) -> Iterator[tuple[Distributed, Compute]]:
    """Join the other processes (NCCL on CUDA, gloo on the CPU) for the block, then leave.

    Yields the Distributed object with its collective device, and `compute` moved to this
    process's own GPU (cuda:LOCAL_RANK) under DDP on CUDA.
    """
    if not dist.enabled:
        yield dist, compute
        return
    device = compute.device
    if device.type == "cuda":
        if dist.local_rank >= torch.cuda.device_count():
            raise KneegenError(
                f"torchrun started local rank {dist.local_rank} but this machine has {torch.cuda.device_count()} "
                f"GPUs: lower --nproc_per_node to at most the number of GPUs"
            )
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise KneegenError(
            f"data-parallel training (torchrun) runs on cuda or cpu, not {device.type}: use --device cpu"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch_dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    try:
        yield replace(dist, device=device), replace(compute, device=device)
    finally:
        torch_dist.destroy_process_group()


def check_world_fits(batch_size: int, grad_accumulation: int, n_images: int, world_size: int) -> None:
    """Every process needs at least one image of every micro-batch of a full global batch."""
    if world_size > batch_size:
        raise KneegenError(
            f"train.batch_size {batch_size} is smaller than the {world_size} processes torchrun started: each "
            f"needs at least one image per step; raise train.batch_size or lower --nproc_per_node"
        )
    if world_size * grad_accumulation > batch_size:
        raise KneegenError(
            f"train.grad_accumulation {grad_accumulation} × {world_size} processes needs train.batch_size ≥ "
            f"{world_size * grad_accumulation} (it is {batch_size}): lower train.grad_accumulation"
        )
    if world_size > n_images:
        raise KneegenError(
            f"{n_images} training images cannot be shared by {world_size} processes: lower --nproc_per_node"
        )
