"""Merge the gathers of adjacent small units into one (Dynamo graph, after insert_collectives).

Before (two units gathered one after the other, each a collective of a few KiB)::

    g3 = gather_unit(3, SYNC, None, a0, a1)      # unit 3
    w  = g3[0]; ...                               # unit 3's compute
    g4 = gather_unit(4, SYNC, None, b0, b1, b2)  # unit 4
    v  = g4[2]; ...

After, with ``bucket_bytes`` >= the two units' shard bytes together::

    g = gather_unit(9, SYNC, None, a0, a1, b0, b1, b2)   # 9: a bucket of units 3 and 4
    w = g[0]; ...
    v = g[4]; ...

A bucket is a ``Unit`` whose layout is its members' layouts one after the other, so one
all-gather and (in backward) one reduce-scatter move all of them. Only gathers that are adjacent
in program order, in SYNC mode, with the same strategy, group and dtypes, are merged: every rank
derives the same buckets from the same graph. Entry point ``bucket_gathers``.
"""
from __future__ import annotations

import operator
from typing import Callable

import torch.fx

from fsdp_compile.ops import GradMode, gather_unit
from fsdp_compile.params import tree_state
from fsdp_compile.registry import get_unit


def is_gather(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is gather_unit


def _bucket_key(unit):
    return (unit.strategy, unit.spec, unit.shard_dtype, unit.compute_device, id(tree_state(unit.module)))


def _shard_bytes(unit) -> int:
    return unit.layout.local_numel * unit.local_flat.element_size()


def plan_buckets(gathers: list[torch.fx.Node], bucket_bytes: int) -> list[list[torch.fx.Node]]:
    """Greedy, in program order: extend the current bucket while the key matches and the bucket
    stays within ``bucket_bytes``."""
    buckets: list[list[torch.fx.Node]] = []
    size, key = 0, None
    for node in gathers:
        unit = get_unit(node.args[0])
        nbytes, this_key = _shard_bytes(unit), _bucket_key(unit)
        if node.args[1] != GradMode.SYNC:
            buckets.append([node])
            size, key = 0, None
            continue
        if buckets and key == this_key and size + nbytes <= bucket_bytes:
            buckets[-1].append(node)
            size += nbytes
        else:
            buckets.append([node])
            size, key = nbytes, this_key
    return buckets


def bucket_gathers(
    gm: torch.fx.GraphModule, bucket_bytes: int, make_bucket: Callable[[list[int]], int]
) -> list[list[int]]:
    """Rewrite ``gm`` in place; ``make_bucket(unit_ids)`` registers a merged unit and returns
    its id. Returns the unit ids of every bucket (a list per gather left in the graph)."""
    gathers = [n for n in gm.graph.nodes if is_gather(n)]
    result = []
    for group in plan_buckets(gathers, bucket_bytes):
        unit_ids = [n.args[0] for n in group]
        result.append(unit_ids)
        if len(group) == 1:
            continue
        bucket_id = make_bucket(unit_ids)
        shards = [shard for n in group for shard in n.args[3:]]
        with gm.graph.inserting_before(group[0]):
            merged = gm.graph.call_function(gather_unit, (bucket_id, int(GradMode.SYNC), None, *shards))
        offset = 0
        for node in group:
            for user in list(node.users):
                assert user.target is operator.getitem, user
                user.args = (merged, offset + user.args[1])
            offset += len(node.args) - 3
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return result
