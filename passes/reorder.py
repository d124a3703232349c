"""Prefetch: issue each all-gather ``prefetch`` gathers early, so it overlaps compute
(forward and backward graphs, after partitioning, before the inner compiler).

Before (prefetch=0: every gather waits for the compute before it)::

    slot1 = copy_in(p1); ag1 = all_gather(slot1); w1 = wait(ag1); full1 = copy_out(w1)
    ...compute unit 1...
    slot2 = copy_in(p2); ag2 = all_gather(slot2); w2 = wait(ag2); full2 = copy_out(w2)
    ...compute unit 2...

After (prefetch=1: unit 2's gather is in flight while unit 1 computes)::

    slot1 = copy_in(p1); ag1 = all_gather(slot1); w1 = wait(ag1); full1 = copy_out(w1)
    slot2 = copy_in(p2); ag2 = all_gather(slot2)
    ...compute unit 1...
    w2 = wait(ag2); full2 = copy_out(w2); ...compute unit 2...

Unit 2's gather is issued after unit 1's copy-out, the last reader of unit 1's gathered buffer,
so that buffer is freed before unit 2's copy-in, output and gloo's temporary are allocated: one
gathered unit less at each boundary (12 MiB on the 8x512 GPT), for the copy-out's time of delay
on a gather that overlaps a whole unit's compute.

The first ``prefetch`` gathers have no earlier gather to follow: they move as early as their
inputs allow (after the graph's inputs and the gather before them). That matters in backward
graphs whose first gather comes after compute, e.g. the last block's regather behind the output
head's backward when the root stays gathered::

    ...head backward...; slot8 = copy_in(p8); ag8 = all_gather(slot8); w8 = wait(ag8)
    -> slot8 = copy_in(p8); ag8 = all_gather(slot8); ...head backward...; w8 = wait(ag8)

Only the copy-in (one op, or its decomposition) and the all-gather move (to right after the
copy-out of the gather ``prefetch`` places earlier -- its wait when the copy-out is decomposed --
or as above), never a wait; the order of all-gathers among themselves is unchanged, and the move
is a pure function of the graph, so every rank issues the same schedule. Inductor keeps this
placement only with its peak-memory reordering off, which is the backend's default
(``compiler.INDUCTOR_DEFAULTS``). A node moves only if all its inputs are already computed at
its new place (shards are graph inputs).
Entry point ``prefetch_all_gathers``.
"""
from __future__ import annotations

import torch.fx

from fsdp_compile.torch_private import triton_kernel_wrapper_functional
from fsdp_compile.passes.reshard import copy_in_nodes, is_all_gather, is_copy_out, is_wait_tensor, unit_of


def _wait_of(all_gather: torch.fx.Node):
    return next((u for u in all_gather.users if is_wait_tensor(u)), None)


def _unpacked(all_gather: torch.fx.Node, order: dict):
    """Where the gathered buffer of ``all_gather`` has been unpacked: its copy-out, one op that
    reads the whole buffer (our ``*_fused`` op on CPU, a ``wrap_triton`` launch on CUDA); the
    wait when the copy-out is decomposed into slices and copies (``copies="aten"``), which the
    partitioner may place apart; None without a wait."""
    wait = _wait_of(all_gather)
    if wait is None:
        return None
    readers = [u for u in wait.users if is_copy_out(u) or u.target is triton_kernel_wrapper_functional]
    return max(readers, key=order.__getitem__, default=wait)


def prefetch_all_gathers(gm: torch.fx.GraphModule, prefetch: int) -> int:
    """Move all-gathers earlier in ``gm`` in place; returns how many moved."""
    if prefetch <= 0:
        return 0
    gathers = [n for n in gm.graph.nodes if is_all_gather(n) and unit_of(n) is not None]  # ours only
    last_placeholder = next((n for n in reversed(gm.graph.nodes) if n.op == "placeholder"), None)
    moved = 0
    order = {node: j for j, node in enumerate(gm.graph.nodes)}
    for i, ag in enumerate(gathers):
        chain = copy_in_nodes(ag) + [ag]
        if i >= prefetch:
            anchor = _unpacked(gathers[i - prefetch], order)
        else:  # nothing of ours in flight yet: as early as the inputs allow, after the gather before it
            inputs = [x for node in chain for x in node.all_input_nodes if x not in chain]
            earliest = [n for n in (last_placeholder, gathers[i - 1] if i else None) if n is not None]
            anchor = max(earliest + inputs, key=order.__getitem__, default=None)
        if anchor is None or order[ag] < order[anchor]:
            continue
        if _issue_after(anchor, chain, order):
            moved += 1
            order = {node: j for j, node in enumerate(gm.graph.nodes)}  # positions changed
    gm.graph.lint()
    gm.recompile()
    return moved


def _issue_after(anchor: torch.fx.Node, chain: list[torch.fx.Node], order: dict) -> bool:
    """Move ``chain`` (a gather's copy-in nodes and the all-gather, in graph order) to right
    after ``anchor`` if every input is computed by then; False if it cannot move or is there."""
    to_move = [n for n in chain if order[n] > order[anchor]]
    inputs = {x for node in to_move for x in node.all_input_nodes if x not in to_move}
    if any(order[x] > order[anchor] for x in inputs):
        return False
    if [order[n] for n in to_move] == list(range(order[anchor] + 1, order[anchor] + 1 + len(to_move))):
        return False  # already right after the anchor
    for node in reversed(to_move):
        anchor.append(node)
    return True
