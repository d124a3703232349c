"""Checks that every rank holds the same value (a fingerprint of units, a collective schedule,
a model's parameters) before a mismatch could hang a collective."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist


def first_mismatch_across_ranks(value: Any, group=None) -> Optional[tuple[int, Any]]:
    """``(rank, their_value)`` for the first rank of ``group`` whose picklable ``value`` differs
    from this rank's, or ``None`` when all agree. A collective: every rank must call it."""
    everyone = [None] * dist.get_world_size(group)
    with _real_tensors():
        dist.all_gather_object(everyone, value, group=group)
    return next(((rank, theirs) for rank, theirs in enumerate(everyone) if theirs != value), None)


def exchange_records(record: Sequence[int], group, device: torch.device) -> list[tuple[int, ...]]:
    """Every rank's ``record`` (a few ints), in rank order: one all-gather of a tiny int64 tensor.
    A collective: every rank of ``group`` must call it."""
    world = dist.get_world_size(group)
    with _real_tensors():
        mine = torch.tensor(list(record), dtype=torch.int64, device=device)
        everyone = torch.empty(world * mine.numel(), dtype=torch.int64, device=device)
        dist.all_gather_single(everyone, mine, group=group)
        return [tuple(row) for row in everyone.view(world, -1).tolist()]


def _real_tensors():
    """These checks exchange Python values: under a ``FakeTensorMode`` (``fsdp_compile.estimate``
    traces a step under one) their few tensors must still be real to be read back."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    return unset_fake_temporarily()
