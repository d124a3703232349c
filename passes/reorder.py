"""Prefetch: issue each all-gather ``prefetch`` gathers early, so it overlaps compute
(forward and backward graphs, after partitioning, before the inner compiler).

Before (prefetch=0: every gather waits for the compute before it)::

    slot1 = copy_in(p1); ag1 = all_gather(slot1); w1 = wait(ag1); ...compute unit 1...
    slot2 = copy_in(p2); ag2 = all_gather(slot2); w2 = wait(ag2); ...compute unit 2...

After (prefetch=1: unit 2's gather is in flight while unit 1 computes)::

    slot1 = copy_in(p1); ag1 = all_gather(slot1); w1 = wait(ag1)
    slot2 = copy_in(p2); ag2 = all_gather(slot2)
    ...compute unit 1...
    w2 = wait(ag2); ...compute unit 2...

Only the copy-in (one op, or its decomposition) and the all-gather move (to right after the
wait of the gather ``prefetch`` places earlier), never a wait; the order of all-gathers among
themselves is unchanged, and the move is a pure function of the graph, so every rank issues the
same schedule. A node moves only if all its inputs are already computed at its new place
(shards are graph inputs).
Entry point ``prefetch_all_gathers``.
"""
from __future__ import annotations

import torch.fx

from fsdp_compile.passes.reshard import copy_in_nodes, is_all_gather, is_wait_tensor, unit_of


def _wait_of(all_gather: torch.fx.Node):
    return next((u for u in all_gather.users if is_wait_tensor(u)), None)


def prefetch_all_gathers(gm: torch.fx.GraphModule, prefetch: int) -> int:
    """Move all-gathers earlier in ``gm`` in place; returns how many moved."""
    if prefetch <= 0:
        return 0
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    gathers = [n for n in gm.graph.nodes if is_all_gather(n) and unit_of(n) is not None]  # ours only
    moved = 0
    for i in range(prefetch, len(gathers)):
        anchor = _wait_of(gathers[i - prefetch])
        ag = gathers[i]
        if anchor is None or order[ag] < order[anchor]:
            continue
        to_move = [n for n in copy_in_nodes(ag) if order[n] > order[anchor]] + [ag]
        inputs = {x for node in to_move for x in node.all_input_nodes if x not in to_move}
        if any(order[x] > order[anchor] for x in inputs):
            continue
        for node in reversed(to_move):
            anchor.append(node)
        moved += 1
        order = {node: j for j, node in enumerate(gm.graph.nodes)}
    gm.graph.lint()
    gm.recompile()
    return moved
