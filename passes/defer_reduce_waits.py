"""Overlap each unit's gradient reduction with the next unit's backward: its wait moves from
right after the issue to right before the next unit's reduction is issued (backward graphs,
after partitioning, before the inner compiler).

Before (the reduce-scatter of unit 2 blocks before unit 1's backward starts)::

    packed2 = rs_copy_in(grads2); rs2 = reduce_scatter(packed2); w2 = wait(rs2)
    g2 = w2 / world; ...shard views of g2...                              # outputs
    ...backward compute of unit 1...
    packed1 = rs_copy_in(grads1); rs1 = reduce_scatter(packed1); w1 = wait(rs1)

After (unit 2's reduction is in flight while unit 1's backward computes)::

    packed2 = rs_copy_in(grads2); rs2 = reduce_scatter(packed2)
    ...backward compute of unit 1...
    packed1 = rs_copy_in(grads1)
    w2 = wait(rs2); g2 = w2 / world; ...shard views of g2...
    rs1 = reduce_scatter(packed1); w1 = wait(rs1)

What moves is the wait and everything computed from it that sits before the new place (the
division, casts, the shard views; with hybrid sharding also the replicate-group all-reduce and
its wait), in their order. They depend only on the wait and on nodes already computed, so
moving them later is always valid. At most one reduction per unit is in flight besides the one
being issued, so the extra memory is one packed gradient buffer. The order of the collectives
is unchanged and the move is a pure function of the graph: every rank issues the same schedule.
A reduction is a ``reduce_scatter_tensor``, the ``all_to_all_single`` that stands for it on gloo
groups (``collectives.py``), or an ``all_reduce``. Entry point ``defer_reduce_waits``.

On by default (``fsdp_compile.backend(overlap_reductions=False)`` turns it off); what it buys
is in benchmarks/README.md ("What each default buys"). With two collectives in flight, gloo's
two worker threads could finish at the same time and race; our collectives run on one-worker
twins of gloo groups (``fsdp_compile/gloo_worker.py``).
"""
from __future__ import annotations

import torch
import torch.fx

from fsdp_compile import torch_private
from fsdp_compile.passes.reshard import is_wait_tensor, unit_of

_c10d = torch_private.c10d_functional
_REDUCTIONS = (_c10d.reduce_scatter_tensor.default, _c10d.all_to_all_single.default, _c10d.all_reduce.default)


def _is_reduction(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in _REDUCTIONS and unit_of(node) is not None


def _descendants_before(node: torch.fx.Node, stop: int, order: dict) -> set[torch.fx.Node]:
    """``node`` and every node computed from it that sits before position ``stop``."""
    found, frontier = set(), [node]
    while frontier:
        current = frontier.pop()
        if current in found or current.op == "output" or order[current] >= stop:
            continue
        found.add(current)
        frontier.extend(current.users)
    return found


def defer_reduce_waits(gm: torch.fx.GraphModule) -> int:
    """Move each unit's reduction wait in ``gm`` (in place) to right before the next unit's
    first reduction; returns how many moved."""
    reductions = [n for n in gm.graph.nodes if _is_reduction(n)]
    moved = 0
    for i, reduction in enumerate(reductions):
        unit = unit_of(reduction)
        if i > 0 and unit_of(reductions[i - 1]) == unit:
            continue  # the unit's replicate-group all-reduce: moves with its first reduction
        later = next((r for r in reductions[i + 1:] if unit_of(r) != unit), None)
        wait = next((u for u in reduction.users if is_wait_tensor(u)), None)
        if later is None or wait is None:
            continue
        order = {node: j for j, node in enumerate(gm.graph.nodes)}
        if order[wait] > order[later]:
            continue
        to_move = _descendants_before(wait, order[later], order)
        if later in to_move:
            continue  # the next reduction needs this one's result: nothing to overlap
        for node in sorted(to_move, key=order.__getitem__):
            later.prepend(node)
        moved += 1
    gm.graph.lint()
    gm.recompile()
    return moved
