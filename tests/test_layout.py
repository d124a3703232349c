"""Exhaustive tests of ``fsdp_compile/layout.py`` (pure arithmetic, no process group).

Reference: plain torch written here. Every rank's shard is cut from a real tensor with
``torch.split`` (chunks of ``ceil(D / world)`` rows), each rank's local flat buffer is built by
zero-padded ``torch.cat``, and the rank-major buffer is compared with ``torch._chunk_cat`` (the
padded layout FSDP2 reduce-scatters). Concatenating every rank's shard rows must rebuild the
full tensor exactly, for world sizes 1..8, empty shards, 0-d and empty parameters.
"""
from __future__ import annotations

import math

import pytest
import torch

from fsdp_compile.layout import ParamLayout, chunk_rows, make_unit_layout
from fsdp_compile.testing.reference import reference_shards

WORLDS = range(1, 9)
SHAPES = [  # 0-d parameters have a layout of their own (test_zero_dim_param_...)
    (0,),
    (0, 5),
    (1,),
    (1, 16),
    (2,),
    (3, 4),
    (5, 2, 3),
    (7, 3),
    (8,),
    (9, 1, 2),
    (13, 4),
    (16, 2),
    (17,),
]


def _ref_chunk(dim0: int, world: int) -> int:
    return math.ceil(dim0 / world)


_ref_shards = reference_shards


def _full(shape, seed: int = 0) -> torch.Tensor:
    shape = tuple(shape) or (1,)
    return torch.arange(math.prod(shape), dtype=torch.float64).add_(seed * 1000).reshape(shape)


# ---- chunk_rows ----------------------------------------------------------------------------
@pytest.mark.parametrize("world", WORLDS)
def test_chunk_rows_is_ceil(world):
    for dim0 in range(0, 70):
        assert chunk_rows(dim0, world) == _ref_chunk(dim0, world), (dim0, world)


@pytest.mark.parametrize("world", [0, -1, -8])
def test_chunk_rows_rejects_bad_world(world):
    with pytest.raises(ValueError, match=f"world size must be >= 1, got {world}"):
        chunk_rows(4, world)


# ---- one parameter -------------------------------------------------------------------------
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_param_shards_rebuild_full(shape, world):
    layout = make_unit_layout(["p"], [shape], world)
    (p,) = layout.params
    full = _full(shape)
    dim0, row = full.shape[0], math.prod(full.shape[1:])
    c = _ref_chunk(dim0, world)

    assert p.full_shape == tuple(full.shape)
    assert p.dim0 == dim0 and p.row_numel == row and p.full_numel == full.numel()
    assert p.chunk_rows == c
    assert p.padded_numel == c * row
    assert p.offset == 0

    ref = _ref_shards(full, world)
    rows = []
    for rank in range(world):
        start, stop = p.shard_row_range(rank)
        # Ranks own consecutive, non-overlapping row ranges inside [0, dim0].
        assert 0 <= start <= stop <= dim0
        assert stop - start <= c
        assert (start, stop) == (min(rank * c, dim0), min((rank + 1) * c, dim0))
        shard = full[start:stop]
        assert torch.equal(shard, ref[rank])
        assert p.shard_shape(rank) == tuple(ref[rank].shape)
        assert p.shard_numel(rank) == ref[rank].numel()
        assert p.shard_numel(rank) <= p.padded_numel
        rows.append(shard)
    assert torch.equal(torch.cat(rows), full)
    assert sum(p.shard_numel(r) for r in range(world)) == full.numel()
    # Empty shards are exactly the ranks past ceil(D / c) non-empty chunks.
    nonempty = math.ceil(dim0 / c) if c else 0
    assert [p.shard_numel(r) > 0 for r in range(world)] == [r < nonempty for r in range(world)]


@pytest.mark.parametrize("world", WORLDS)
def test_zero_dim_param_is_held_whole_by_every_rank(world):
    """A 0-d parameter is laid out as ``(world,)``: one element per rank, the scalar itself
    on every rank (so its gradient, written into every slot, reduces to the average)."""
    layout = make_unit_layout(["scale"], [()], world)
    (p,) = layout.params
    assert p.full_shape == (world,)
    assert p.chunk_rows == 1 and p.padded_numel == 1
    assert [layout.shard_shapes(r) for r in range(world)] == [[(1,)]] * world
    assert layout.local_numel == 1 and layout.gathered_numel == world


def test_zero_dim_param_without_sharding_is_one_element():
    for layout in (make_unit_layout(["t"], [()], 1), make_unit_layout(["t"], [()], 4, replicated=True)):
        assert layout.params[0].full_shape == (1,) and layout.shard_shapes(0) == [(1,)]


def test_empty_shards_on_trailing_ranks():
    # A (1, 16) weight and a (1,) bias on 2 ranks: rank 1 owns nothing but still has padding.
    layout = make_unit_layout(["w", "b"], [(1, 16), (1,)], 2)
    assert layout.shard_shapes(0) == [(1, 16), (1,)]
    assert layout.shard_shapes(1) == [(0, 16), (0,)]
    assert layout.padded_numels == [16, 1]
    assert layout.local_numel == 17
    assert layout.gathered_numel == 34
    assert [p.offset for p in layout.params] == [0, 16]
    # (5,) on 4 ranks: c = 2, rows [0,2) [2,4) [4,5) [5,5)
    (p,) = make_unit_layout(["x"], [(5,)], 4).params
    assert [p.shard_row_range(r) for r in range(4)] == [(0, 2), (2, 4), (4, 5), (5, 5)]
    # (9,) on 8 ranks: c = 2, only 5 ranks hold rows, the last one a single row
    (p,) = make_unit_layout(["x"], [(9,)], 8).params
    assert [p.shard_numel(r) for r in range(8)] == [2, 2, 2, 2, 1, 0, 0, 0]


# ---- a unit: offsets, padding, local flat buffers, the rank-major buffer -------------------
def _local_flat(layout, fulls, rank):
    """This rank's local flat buffer built from the layout's (offset, shape) views."""
    flat = torch.zeros(layout.local_numel, dtype=torch.float64)
    for p, (offset, shape), full in zip(layout.params, layout.shard_views_spec(rank), fulls):
        start, stop = p.shard_row_range(rank)
        rows = full[start:stop]
        assert tuple(shape) == tuple(rows.shape)
        flat.narrow(0, offset, rows.numel()).copy_(rows.reshape(-1))
    return flat


def _ref_local_flat(fulls, world, rank):
    """The same buffer from torch only: each shard zero-padded to ceil(D/world) rows, concatenated."""
    pieces = []
    for full in fulls:
        shard = _ref_shards(full, world)[rank].reshape(-1)
        padded = _ref_chunk(full.shape[0], world) * math.prod(full.shape[1:])
        pieces += [shard, torch.zeros(padded - shard.numel(), dtype=full.dtype)]
    return torch.cat(pieces)


@pytest.mark.parametrize("world", WORLDS)
def test_unit_layout_offsets_padding_and_gather(world):
    fqns = [f"p{i}" for i in range(len(SHAPES))]
    layout = make_unit_layout(fqns, SHAPES, world)
    fulls = [_full(s, seed=i) for i, s in enumerate(SHAPES)]

    assert layout.world_size == world and not layout.replicated
    assert [p.fqn for p in layout.params] == fqns
    padded = [_ref_chunk(f.shape[0], world) * math.prod(f.shape[1:]) for f in fulls]
    assert layout.padded_numels == padded
    assert [p.offset for p in layout.params] == [sum(padded[:i]) for i in range(len(padded))]
    assert layout.local_numel == sum(padded)
    assert layout.gathered_numel == world * sum(padded)
    assert layout.full_shapes == [list(f.shape) for f in fulls]

    flats = [_local_flat(layout, fulls, r) for r in range(world)]
    for rank, flat in enumerate(flats):
        assert torch.equal(flat, _ref_local_flat(fulls, world, rank))
        # Shard views never overlap the next parameter's slot.
        for p, (offset, shape) in zip(layout.params, layout.shard_views_spec(rank)):
            assert offset == p.offset
            assert offset + math.prod(shape) <= offset + p.padded_numel <= layout.local_numel

    # The rank-major buffer is torch._chunk_cat of the full tensors (FSDP2's padded layout).
    nonempty = [f for f in fulls if f.shape[0] > 0]
    gathered = torch.cat(flats)
    assert gathered.numel() == layout.gathered_numel
    chunked = torch._chunk_cat(nonempty, 0, world)
    nonempty_layout = make_unit_layout(
        [f"q{i}" for i in range(len(nonempty))], [tuple(f.shape) for f in nonempty], world
    )
    ref_flats = [_local_flat(nonempty_layout, nonempty, r) for r in range(world)]
    assert torch.equal(torch.stack(ref_flats), chunked)

    # Unpacking the gathered buffer rebuilds every full tensor exactly.
    g2 = gathered.view(world, layout.local_numel)
    for p, full in zip(layout.params, fulls):
        rows = g2[:, p.offset:p.offset + p.padded_numel].reshape(world * p.chunk_rows, *full.shape[1:])
        assert torch.equal(rows[: p.dim0], full)


@pytest.mark.parametrize("world", WORLDS)
def test_replicated_layout(world):
    layout = make_unit_layout(["a", "b", "c", "d"], [(7, 3), (1,), (), (0, 2)], world, replicated=True)
    assert layout.replicated
    assert [p.chunk_rows for p in layout.params] == [7, 1, 1, 0]
    assert layout.padded_numels == [21, 1, 1, 0]
    assert [p.offset for p in layout.params] == [0, 21, 22, 23]
    assert layout.local_numel == 23
    assert layout.gathered_numel == 23  # no gather: every rank holds everything
    for rank in range(world):
        assert layout.shard_shapes(rank) == [(7, 3), (1,), (1,), (0, 2)]
        assert layout.shard_views_spec(rank) == [(0, (7, 3)), (21, (1,)), (22, (1,)), (23, (0, 2))]
    assert layout.params[0].shard_row_range(0) == (0, 7)


def test_world_one_is_the_identity():
    layout = make_unit_layout(["a", "b"], [(5, 2), (3,)], 1)
    assert layout.shard_shapes(0) == [(5, 2), (3,)]
    assert layout.local_numel == layout.gathered_numel == 13
    assert layout.params[0].shard_row_range(0) == (0, 5)


def test_layout_is_plain_data():
    layout = make_unit_layout(["w"], [[4, 2]], 3)  # lists and torch.Size are accepted
    assert layout == make_unit_layout(["w"], [torch.Size([4, 2])], 3)
    assert layout.params[0] == ParamLayout("w", (4, 2), 2, 0)
    assert layout.params[0].full_shape == (4, 2)
    with pytest.raises(ValueError, match="2 names but 1 shapes"):
        make_unit_layout(["a", "b"], [(1,)], 2)
    with pytest.raises(ValueError, match="world size must be >= 1"):
        make_unit_layout(["a"], [(4,)], 0)


def test_empty_unit():
    layout = make_unit_layout([], [], 4)
    assert layout.params == () and layout.local_numel == 0 and layout.gathered_numel == 0
