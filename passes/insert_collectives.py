"""Replace every original-parameter marker by one gather per unit (Dynamo graph, pre-AOT).

Before (one marker per read of an original parameter; ``shards`` are all of the unit's shards)::

    w1 = fsdp_compile.param_use([s0, s1, s2], None, unit=3, index=0, mode=SYNC)
    y  = linear(x, w1, ...)
    b1 = fsdp_compile.param_use([s0, s1, s2], None, unit=3, index=1, mode=SYNC)
    w1_again = fsdp_compile.param_use([s0, s1, s2], None, unit=3, index=0, mode=SYNC)

A marker names its unit by id in a whole-model trace, and by the unit's *template* (the first
unit with the same layout, see ``FSDPState.assign_templates``) in a region compiled inside an
eager forward, so that identical blocks compiled one at a time trace the same graph; two units
in one graph are told apart by their shard inputs, and ``resolve`` (given the named id and the
shard nodes) names the unit the graph was traced with.

After (the gather sits where the unit's first marker was; repeated reads share one result)::

    full = fsdp_compile.ops.gather_unit(3, GradMode.SYNC, None, s0, s1, s2)
    w1 = full[0]
    b1 = full[1]
    y  = linear(x, w1, ...)

``gather_unit`` is an autograd.Function: when AOTAutograd traces this graph, its forward becomes
copy-in -> all_gather_into_tensor -> wait_tensor -> copy-out and its backward becomes copy-in ->
reduce_scatter_tensor -> wait_tensor -> shard views (all-reduce for NO_SHARD). Called from the
backend before AOTAutograd; entry point ``insert_collectives``.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.fx

from fsdp_compile.ops import GradMode, gather_unit


@dataclass(frozen=True)
class UnitGather:
    """One inserted gather: which unit, in which gradient mode, how many distinct params read."""

    unit_id: int
    mode: GradMode
    indices: tuple[int, ...]


def is_param_use(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.fsdp_compile.param_use.default


def insert_collectives(
    gm: torch.fx.GraphModule, resolve: Optional[Callable[[int, tuple], int]] = None
) -> list[UnitGather]:
    """Rewrite ``gm`` in place; return the inserted gathers in program order. ``resolve(template,
    shard_nodes)`` gives the unit id for a group of markers (default: the template)."""
    graph = gm.graph
    markers: dict[tuple, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if is_param_use(node):
            markers.setdefault((node.args[2], tuple(node.args[0])), []).append(node)
    inserted = []
    seen: dict[int, tuple] = {}
    for (template, shard_nodes), nodes in markers.items():
        unit_id = template if resolve is None else resolve(template, shard_nodes)
        if seen.setdefault(unit_id, shard_nodes) != shard_nodes:
            raise RuntimeError(
                f"fsdp_compile: two different shard lists of unit {unit_id} in one graph; "
                "cannot tell which unit each gather belongs to"
            )
        first = nodes[0]
        shards, extra, _, _, marked_mode = first.args
        mode = GradMode(marked_mode)
        with graph.inserting_before(first):
            gathered = graph.call_function(gather_unit, (unit_id, int(mode), extra, *shards))
            gathered.meta["fsdp_unit"] = unit_id
            by_index: dict[int, torch.fx.Node] = {}
            for node in nodes:
                index = node.args[3]
                if index not in by_index:
                    by_index[index] = graph.call_function(operator.getitem, (gathered, index))
                    by_index[index].meta.update(node.meta)
        for node in nodes:
            node.replace_all_uses_with(by_index[node.args[3]])
            graph.erase_node(node)
        inserted.append(UnitGather(unit_id, mode, tuple(sorted(by_index))))
    graph.lint()
    gm.recompile()
    return inserted
