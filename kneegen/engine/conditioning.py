"""Conditions a network can be asked for, and how they are dropped so one network also serves
unconditional sampling (classifier-free guidance, Ho & Salimans 2022).

A batch's conditions travel as one float tensor c of shape (B, K), a column per name of
`model.conditions` in that order (kneegen/data/conditions.py): side 0 = left, 1 = right;
position in [0, 1]. NaN means "not given": unknown in the data, dropped in training, or left
out by the user. The network turns each column into an embedding added to its time embedding,
a learned "null" embedding standing in for NaN, so no value has to be reserved for "no label".
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kneegen.engine.sinusoidal import sinusoidal_embedding

POSITION_SCALE = 1000.0  # position ∈ [0, 1] is embedded like a timestep ∈ [0, 1000]


class ConditionEmbedding(nn.Module):
    """(B, K) conditions with NaN for "not given" → (B, dim), the sum of one embedding per column."""

    def __init__(self, conditions: list[str], dim: int, frequencies: int) -> None:
        super().__init__()
        self.conditions = list(conditions)
        self.embeddings = nn.ModuleDict()
        for name in self.conditions:
            if name == "side":
                self.embeddings[name] = nn.Embedding(3, dim)  # left, right, null
            else:
                self.embeddings[name] = PositionEmbedding(dim, frequencies)

    def forward(self, c: Tensor | None, batch: int, device: torch.device) -> Tensor:
        if c is None:  # nothing asked: every condition null, the unconditional model
            c = null_conditions(batch, len(self.conditions), device)
        parts = []
        for column, name in enumerate(self.conditions):
            value = c[:, column].float()  # (B,)
            if name == "side":
                index = torch.where(value.isnan(), 2, value.nan_to_num(0).round().clamp(0, 1)).long()
                parts.append(self.embeddings[name](index))
            else:
                parts.append(self.embeddings[name](value))
        return torch.stack(parts).sum(dim=0)  # (B, dim)


class PositionEmbedding(nn.Module):
    """A number in [0, 1] through sinusoids and an MLP; a learned vector where it is NaN."""

    def __init__(self, dim: int, frequencies: int) -> None:
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.null = nn.Parameter(torch.zeros(dim))

    def forward(self, value: Tensor) -> Tensor:
        missing = value.isnan()[:, None]  # (B, 1)
        embedded = self.mlp(sinusoidal_embedding(value.nan_to_num(0) * POSITION_SCALE, self.frequencies))
        return torch.where(missing, self.null.to(embedded.dtype), embedded)  # (B, dim)


def drop_conditions(c: Tensor, probability: float, generator: torch.Generator) -> Tensor:
    """Training's condition dropout: each condition alone, and all of them together, are set to
    NaN with `probability`. Dropping them together teaches the unconditional model guidance
    subtracts; dropping them one by one teaches the model with only some given (`--side left`
    with any position). Draws come from the training generator, so resumed runs repeat them."""
    batch, k = c.shape
    together = torch.rand(batch, 1, generator=generator) < probability  # (B, 1)
    alone = torch.rand(batch, k, generator=generator) < probability  # (B, K)
    return torch.where(together | alone, torch.full_like(c, math.nan), c)


def null_conditions(batch: int, k: int, device: torch.device) -> Tensor:
    """(B, K) of NaN: no condition given."""
    return torch.full((batch, k), math.nan, device=device)


def call_network(network: nn.Module, x: Tensor, t: Tensor, c: Tensor | None) -> Tensor:
    """network(x, t), with the conditions only when there are some: an unconditional network (a
    plugin's too) keeps its two-argument forward."""
    return network(x, t) if c is None else network(x, t, c)
