"""Shard and flat-buffer arithmetic for one unit. Pure functions: no torch.distributed, no tensors.

Invariants (see ARCHITECTURE.md, "Vocabulary"):
- A parameter of full shape ``S`` (dim 0 ``D``, ``R = prod(S[1:])`` elements per row) is split
  along dim 0 into ``world`` chunks of ``c = ceil(D / world)`` rows. Rank ``r`` owns rows
  ``[r*c, min((r+1)*c, D))``; the trailing ranks' shards can be empty.
- Every shard occupies ``P = c * R`` elements of the unit's local flat buffer (zero padding after
  the shard's own elements), at ``offset`` = sum of the previous parameters' ``P``.
- The all-gather buffer and the reduce-scatter input are ``world`` such slots, rank-major.
- With ``replicated=True`` (NO_SHARD) every rank holds the whole parameter: ``c = D``.
- A 0-d parameter is laid out as ``(world,)``: every rank holds the scalar (one element), so
  its gather takes any slot and its gradient, written into every slot, reduce-scatters to the
  rank average on every rank. Every rank knowing the value keeps state dicts free of
  collectives. (World size 1 and NO_SHARD: ``(1,)``.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass


def chunk_rows(dim0: int, world: int) -> int:
    """Rows per rank of a dim-0 split into ``world`` chunks (the last chunks may be short or empty)."""
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    return -(-dim0 // world) if dim0 > 0 else 0


@dataclass(frozen=True)
class ParamLayout:
    """Where one original parameter lives in its unit's flat buffers."""

    fqn: str
    full_shape: tuple[int, ...]
    chunk_rows: int
    offset: int

    @property
    def dim0(self) -> int:
        return self.full_shape[0]

    @property
    def row_numel(self) -> int:
        return math.prod(self.full_shape[1:])

    @property
    def padded_numel(self) -> int:
        return self.chunk_rows * self.row_numel

    @property
    def full_numel(self) -> int:
        return math.prod(self.full_shape)

    def shard_row_range(self, rank: int) -> tuple[int, int]:
        start = min(rank * self.chunk_rows, self.dim0)
        return start, min(start + self.chunk_rows, self.dim0)

    def shard_shape(self, rank: int) -> tuple[int, ...]:
        start, stop = self.shard_row_range(rank)
        return (stop - start, *self.full_shape[1:])

    def shard_numel(self, rank: int) -> int:
        return math.prod(self.shard_shape(rank))


@dataclass(frozen=True)
class UnitLayout:
    """All parameters of one unit, in flat-buffer order."""

    params: tuple[ParamLayout, ...]
    world_size: int
    replicated: bool = False

    @property
    def local_numel(self) -> int:
        """Elements of one rank's slot (the local flat buffer), padding included."""
        return sum(p.padded_numel for p in self.params)

    @property
    def gathered_numel(self) -> int:
        return self.local_numel * (1 if self.replicated else self.world_size)

    @property
    def padded_numels(self) -> list[int]:
        return [p.padded_numel for p in self.params]

    @property
    def full_shapes(self) -> list[list[int]]:
        return [list(p.full_shape) for p in self.params]

    def shard_shapes(self, rank: int) -> list[tuple[int, ...]]:
        if self.replicated:
            return [p.full_shape for p in self.params]
        return [p.shard_shape(rank) for p in self.params]

    def shard_views_spec(self, rank: int) -> list[tuple[int, tuple[int, ...]]]:
        """(offset, shape) of each shard inside the local flat buffer of ``rank``."""
        return [(p.offset, s) for p, s in zip(self.params, self.shard_shapes(rank))]


def make_unit_layout(
    fqns: list[str], shapes: list[tuple[int, ...]], world_size: int, replicated: bool = False
) -> UnitLayout:
    """Lay out parameters ``fqns`` (full ``shapes``, 0-d shapes are treated as ``(1,)``)."""
    if len(fqns) != len(shapes):
        raise ValueError(f"{len(fqns)} names but {len(shapes)} shapes")
    params, offset = [], 0
    for fqn, shape in zip(fqns, shapes):
        shape = tuple(int(s) for s in shape) or ((1,) if replicated else (world_size,))
        rows = shape[0] if replicated else chunk_rows(shape[0], world_size)
        param = ParamLayout(fqn, shape, rows, offset)
        params.append(param)
        offset += param.padded_numel
    return UnitLayout(tuple(params), world_size, replicated)
