"""An independent reference for what each rank holds: written with ``torch.split`` alone, never
with the library's layout code, so tests that compare against it check that code."""
from __future__ import annotations

import math

import torch


def reference_shards(full: torch.Tensor, world: int) -> list[torch.Tensor]:
    """Every rank's rows of ``full``: dim 0 cut in chunks of ``ceil(D / world)`` rows, in rank
    order (``torch.chunk``'s split, DTensor's ``Shard(0)``); trailing ranks may be empty."""
    c = math.ceil(full.shape[0] / world)
    pieces = list(full.split(c)) if c else []
    return pieces + [full[full.shape[0]:]] * (world - len(pieces))


def reference_shard(full: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s rows of ``full`` (see :func:`reference_shards`)."""
    return reference_shards(full, world)[rank]
