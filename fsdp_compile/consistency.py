"""Checks that every rank holds the same value (a fingerprint of units, a collective schedule,
a model's parameters) before a mismatch could hang a collective."""
from __future__ import annotations

from typing import Any, Optional

import torch.distributed as dist


def first_mismatch_across_ranks(value: Any, group=None) -> Optional[tuple[int, Any]]:
    """``(rank, their_value)`` for the first rank of ``group`` whose picklable ``value`` differs
    from this rank's, or ``None`` when all agree. A collective: every rank must call it."""
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, value, group=group)
    return next(((rank, theirs) for rank, theirs in enumerate(everyone) if theirs != value), None)
