"""Checks that every rank holds the same value (a fingerprint of units, a collective schedule,
a model's parameters) before a mismatch could hang a collective."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from . import torch_private


def first_mismatch_across_ranks(value: Any, group=None) -> Optional[tuple[int, Any]]:
    """``(rank, their_value)`` for the first rank of ``group`` whose picklable ``value`` differs
    from this rank's, or ``None`` when all agree. A collective: every rank must call it."""
    everyone = values_of_every_rank(value, group)
    return next(((rank, theirs) for rank, theirs in enumerate(everyone) if theirs != value), None)


def values_of_every_rank(value: Any, group=None) -> list:
    """Every rank's picklable ``value``, in rank order (one ``all_gather_object``). A collective."""
    everyone = [None] * dist.get_world_size(group)
    with _real_tensors():
        dist.all_gather_object(everyone, value, group=group)
    return everyone


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
    return torch_private.unset_fake_temporarily()


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bitwise_checksum(tensor: torch.Tensor) -> torch.Tensor:
    """Two int64s that identify ``tensor``'s bits. Each dim-0 row's elements, read as integers of
    their width, give the XOR of their bit patterns (``torch.hash_tensor``) and their wrapping
    sum; the checksum is the XOR over rows and the rows' mix weighted by row position. Any one
    changed bit changes the XOR; rows in another order change the weighted sum; a float sum
    would hide any pair of elements that trade value. Exact bits, not values: ``-0.0`` differs
    from ``0.0``. One pass over the data with temporaries of a few integers per row (no copy of
    a contiguous tensor: ``fully_shard`` of a meta model holds one module's tensors at a time)."""
    t = tensor.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.numel() == 0:
        return torch.zeros(2, dtype=torch.int64, device=t.device)
    rows = t.contiguous().reshape(t.shape[0] if t.dim() else 1, -1)
    words = rows.view(_INT_OF_SIZE[t.element_size()])
    row_xor = torch.hash_tensor(words, dim=1).view(torch.int64)
    row_sum = words.sum(dim=1, dtype=words.dtype).to(torch.int64)  # native width: no copy
    weights = torch.arange(1, 2 * len(row_xor), 2, dtype=torch.int64, device=t.device)
    mixed = (row_xor + row_sum * 0x9E3779B1) * weights
    return torch.stack([torch.hash_tensor(row_xor).view(torch.int64), mixed.sum()])


class StartingValues:
    """Every rank starts from the same parameters and buffers (``fully_shard``).

    ``sync=True`` (``sync_module_states``): each full tensor is broadcast from rank 0 of
    ``group`` as it is shown (before it is sharded). Else, with ``check``, each one's
    :func:`bitwise_checksum` is kept, and :meth:`finish` compares them across ranks in one small
    collective (its fingerprint goes with the units' fingerprint). Tensors must be shown in the
    same order on every rank; ``fully_shard`` compares the units first, so a rank whose model
    differs in structure fails there, not here."""

    def __init__(self, group, sync: bool, check: bool):
        on = group is not None and dist.get_world_size(group) > 1
        self.group = group if on else None
        self.sync = on and sync
        self.check = on and check and not sync
        self.names: list[str] = []
        self._sums: list[torch.Tensor] = []

    def show(self, what: str, name: str, tensor: torch.Tensor) -> None:
        """``what`` ("parameter" / "buffer") ``name``'s full value, before it is sharded. A
        ``DTensor`` (a tensor-parallel parameter) is neither broadcast nor checked: its local
        tensor legitimately differs across the ranks of its TP mesh, and torch's TP plan placed
        it (``distribute_tensor``)."""
        from torch.distributed.tensor import DTensor

        if isinstance(tensor, DTensor):
            return
        if self.sync:
            with torch.no_grad():
                dist.broadcast(tensor.detach(), src=dist.get_global_rank(self.group, 0), group=self.group)
        elif self.check:
            self.names.append(f"{what} {name!r}")
            self._sums.append(bitwise_checksum(tensor).cpu())

    def checksums(self) -> list[tuple[int, int]]:
        return [tuple(row) for row in torch.stack(self._sums).tolist()] if self._sums else []

    def first_difference(self, mine: list, everyone: list[list]) -> Optional[str]:
        """The error text for the first tensor whose checksum differs between ranks, or None."""
        for i, name in enumerate(self.names):
            ranks = [r for r, theirs in enumerate(everyone) if i < len(theirs) and theirs[i] != mine[i]]
            if ranks:
                return (
                    f"fully_shard: {name} holds different values on different ranks (this rank's "
                    f"differ from rank {ranks[0]}'s; bitwise checksums {mine[i]} vs "
                    f"{everyone[ranks[0]][i]}). Sharding it would silently train a mixture of "
                    "the ranks' initializations; pass fully_shard(..., sync_module_states=True) to "
                    "start every rank from rank 0's values, or seed every rank identically "
                    "(torch.manual_seed(0) before building the model)"
                )
        return None
