"""Offset arithmetic for the copy kernels (private; pure Python, no torch).

Owns: chunk rows, padded shard sizes, slot offsets and the per-(rank, param) segment lists the
fused kernels iterate over. The public layout rules live in ``fsdp_compile/layout.py``; this file
re-derives the few numbers the kernels need so ``kernels/`` has no dependency on the runtime.

Layout (the contract): param ``i`` has full shape ``S_i`` with ``D_i = S_i[0]`` rows of
``R_i = prod(S_i[1:])`` elements; chunk rows ``c_i = ceil(D_i / W)``; padded shard numel
``P_i = c_i * R_i``; slot offset ``off_i = sum_{j<i} P_j``; slot length ``T = sum P_i``. Rank ``r``
holds rows ``[r*c_i, min((r+1)*c_i, D_i))`` at ``[off_i, off_i + rows*R_i)`` of its slot.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

Shape = tuple[int, ...]


def row_numel(shape: Sequence[int]) -> int:
    """Elements per dim-0 row (1 for a 0-D or 1-D shape)."""
    return math.prod(shape[1:]) if len(shape) > 1 else 1


def chunk_rows(dim0: int, world_size: int) -> int:
    """``ceil(dim0 / world_size)``; 0 for an empty dim 0."""
    return -(-dim0 // world_size)


def shard_rows(dim0: int, world_size: int, rank: int) -> int:
    """Rows of dim 0 owned by ``rank``: ``min((r+1)*c, D) - r*c`` clamped at 0."""
    c = chunk_rows(dim0, world_size)
    return max(0, min((rank + 1) * c, dim0) - rank * c)


def padded_numels(full_shapes: Sequence[Sequence[int]], world_size: int) -> tuple[int, ...]:
    """``P_i = c_i * R_i`` for every param."""
    return tuple(chunk_rows(s[0] if s else 1, world_size) * row_numel(s) for s in full_shapes)


def prefix_offsets(sizes: Sequence[int]) -> tuple[int, ...]:
    """Exclusive prefix sum with the total appended: ``(0, s0, s0+s1, ..., sum)``."""
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return tuple(out)


def pack_shapes(full_shapes: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
    """Flatten a list of shapes into ``(flat_dims, ndims)`` for a custom-op schema."""
    flat: list[int] = []
    ndims: list[int] = []
    for s in full_shapes:
        flat.extend(int(d) for d in s)
        ndims.append(len(s))
    return flat, ndims


def unpack_shapes(flat_dims: Sequence[int], ndims: Sequence[int]) -> list[Shape]:
    """Inverse of :func:`pack_shapes`."""
    shapes, pos = [], 0
    for n in ndims:
        shapes.append(tuple(flat_dims[pos : pos + n]))
        pos += n
    if pos != len(flat_dims):
        raise ValueError(f"fsdp_compile.kernels: {len(flat_dims)} dims given but ndims sum to {pos}")
    return shapes


class Segment(NamedTuple):
    """One contiguous run copied by the kernels.

    ``param``/``rank`` name the piece; ``full_start`` is the element offset inside the full
    (unsharded, flattened) param; ``slot_start`` the element offset inside the rank-major
    ``W*T`` buffer; ``numel`` the valid elements; ``padded`` the elements reserved in the buffer
    (``P_i``, of which ``padded - numel`` are zero padding).
    """

    param: int
    rank: int
    full_start: int
    slot_start: int
    numel: int
    padded: int


@functools.lru_cache(maxsize=256)
def rank_major_segments(full_shapes: tuple[Shape, ...], world_size: int) -> tuple[Segment, ...]:
    """Segments of the ``W*T`` buffer in buffer order (rank-major, then param)."""
    padded = padded_numels(full_shapes, world_size)
    offs = prefix_offsets(padded)
    total = offs[-1]
    segs = []
    for r in range(world_size):
        for i, shape in enumerate(full_shapes):
            dim0 = shape[0] if shape else 1
            rn = row_numel(shape)
            c = chunk_rows(dim0, world_size)
            n = shard_rows(dim0, world_size, r) * rn
            segs.append(Segment(i, r, min(r * c, dim0) * rn, r * total + offs[i], n, padded[i]))
    return tuple(segs)
