"""Decide reshard-after-forward on the joint graph, per unit, with recompute tags.

Runs as ``torch._functorch.config.joint_custom_pass`` (before the partitioner) so the decision
is made by tags, identically on every rank, never by the partitioner's cost model.

Before (joint graph, forward part of one unit's gather)::

    slot = fsdp_compile.all_gather_copy_in([primals_1, primals_2], ...)
    ag   = _c10d_functional.all_gather_into_tensor(slot, 2, group)
    buf  = _c10d_functional.wait_tensor(ag)
    out  = fsdp_compile.all_gather_copy_out(buf, ...)
    w    = out[0]; wv = view(w, ...)          # used by forward and (saved) by backward

After: the same nodes, with ``meta["recompute"]`` set on the whole chain (copy-in, all-gather,
wait, copy-out, its getitems and the single-user views after them)::

    FULL_SHARD     -> MUST_RECOMPUTE: the partitioner saves only the shards (primals) and the
                      backward graph gathers again; the forward frees the full tensors after
                      their last use.
    SHARD_GRAD_OP  -> MUST_SAVE: the full tensors are saved; the backward has no all-gather.

NO_SHARD units have no all-gather and are left alone. Tagging the whole chain matters: a saved
view after an untagged node would keep the gathered buffer alive (see ARCHITECTURE.md, lessons).
"""
from __future__ import annotations

import operator
from typing import Callable, Optional

import torch
import torch.fx
from torch.utils.checkpoint import CheckpointPolicy

from fsdp_compile.config import ShardingStrategy

_AC_GRAPH_ID = 100000  # far from any user activation-checkpoint region id


def is_all_gather(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.ops._c10d_functional.all_gather_into_tensor.default


def is_wait_tensor(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.ops._c10d_functional.wait_tensor.default


def is_copy_in(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.fsdp_compile.all_gather_copy_in.default


def is_copy_out(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.fsdp_compile.all_gather_copy_out.default


def is_view(node: torch.fx.Node) -> bool:
    return (
        node.op == "call_function"
        and isinstance(node.target, torch._ops.OpOverload)
        and node.target.is_view
    ) or (node.op == "call_function" and node.target is operator.getitem)


def unit_of(node: torch.fx.Node) -> Optional[int]:
    return node.meta.get("custom", {}).get("fsdp_unit")


def gather_chain(wait: torch.fx.Node) -> list[torch.fx.Node]:
    """The all-gather feeding ``wait``, its copy-in, and everything between ``wait`` and the
    views of the full parameters (copy-out, getitems, single-user view chains)."""
    ag = wait.args[0]
    chain = [ag, wait]
    if is_copy_in(ag.args[0]):
        chain.insert(0, ag.args[0])
    frontier = list(wait.users)
    while frontier:
        node = frontier.pop()
        if node in chain:
            continue
        if is_copy_out(node) or is_view(node):
            chain.append(node)
            frontier.extend(node.users)
    return chain


def tag_reshard(gm: torch.fx.GraphModule, strategy_of: Callable[[Optional[int]], ShardingStrategy]) -> torch.fx.GraphModule:
    """Tag every unit gather in joint graph ``gm``; ``strategy_of(unit_id)`` gives its strategy."""
    for node in list(gm.graph.nodes):
        if not (is_wait_tensor(node) and is_all_gather(node.args[0])):
            continue
        chain = gather_chain(node)
        strategy = strategy_of(unit_of(node) if unit_of(node) is not None else unit_of(chain[0]))
        policy = (
            CheckpointPolicy.MUST_RECOMPUTE
            if strategy == ShardingStrategy.FULL_SHARD
            else CheckpointPolicy.MUST_SAVE
        )
        for member in chain:
            member.meta["recompute"] = policy
            member.meta["ac_graph_id"] = _AC_GRAPH_ID
    return gm
