"""Decide reshard-after-forward on the joint graph, per unit, with recompute tags.

Runs as ``torch._functorch.config.joint_custom_pass`` (before the partitioner) so the decision
is made by tags, identically on every rank, never by the partitioner's cost model.

Before (joint graph, forward part of one unit's gather)::

    slot = fsdp_compile.all_gather_copy_in_fused([primals_1, primals_2], ...)
    ag   = _c10d_functional.all_gather_into_tensor(slot, 2, group)
    buf  = _c10d_functional.wait_tensor(ag)
    out  = fsdp_compile.all_gather_copy_out_fused(buf, ...)
    w    = out[0]; wv = view(w, ...)          # used by forward and (saved) by backward

(On CUDA each copy arrives as a ``triton_kernel_wrapper_functional`` launch, with views, a
segment-table constant and getitems around it; with ``fsdp_compile.backend(copies="aten")`` as
``_to_copy``/``constant_pad_nd``/``cat`` and slicing. Both are found the same way, through the
unit annotation every node traced inside the gather carries.)

After: the same nodes, with ``meta["recompute"]`` set on the whole chain (copy-in, all-gather,
wait, copy-out, its getitems and the single-user views after them)::

    FULL_SHARD, HYBRID_SHARD         -> MUST_RECOMPUTE: the partitioner saves only the shards
                                        (primals) and the backward graph gathers again; the
                                        forward frees the full tensors after their last use.
    SHARD_GRAD_OP, HYBRID_SHARD_ZERO2 -> MUST_SAVE: the full tensors are saved; the backward
                                        has no all-gather.

NO_SHARD units have no all-gather and are left alone. Tagging the whole chain matters: a saved
view after an untagged node would keep the gathered buffer alive (see ARCHITECTURE.md, lessons).
"""
from __future__ import annotations

import operator
from typing import Callable, Optional

import torch
import torch.fx
from torch.utils.checkpoint import CheckpointPolicy

from fsdp_compile import torch_private
from fsdp_compile.config import ShardingStrategy

_AC_GRAPH_ID = 100000  # far from any user activation-checkpoint region id


def is_all_gather(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch_private.c10d_functional.all_gather_into_tensor.default


def is_wait_tensor(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch_private.c10d_functional.wait_tensor.default


_COPY_IN_OPS = ("all_gather_copy_in", "all_gather_copy_in_fused")
_COPY_OUT_OPS = ("all_gather_copy_out", "all_gather_copy_out_fused")


def _is_fsdp_op(node: torch.fx.Node, names: tuple[str, ...]) -> bool:
    return node.op == "call_function" and any(
        node.target is getattr(torch.ops.fsdp_compile, name).default for name in names
    )


def is_copy_in(node: torch.fx.Node) -> bool:
    return _is_fsdp_op(node, _COPY_IN_OPS)


def is_copy_out(node: torch.fx.Node) -> bool:
    return _is_fsdp_op(node, _COPY_OUT_OPS)


def is_view(node: torch.fx.Node) -> bool:
    return (
        node.op == "call_function"
        and isinstance(node.target, torch_private.OpOverload)
        and node.target.is_view
    ) or (node.op == "call_function" and node.target is operator.getitem)


def unit_of(node: torch.fx.Node) -> Optional[int]:
    return node.meta.get("custom", {}).get("fsdp_unit")


def _is_constant(node: torch.fx.Node, memo: dict) -> bool:
    """True if ``node`` depends on no graph input (a table or an empty buffer built in place)."""
    if node not in memo:
        memo[node] = node.op == "get_attr" or (
            node.op == "call_function" and all(_is_constant(x, memo) for x in node.all_input_nodes)
        )
    return memo[node]


def _belongs(node: torch.fx.Node, unit: Optional[int]) -> bool:
    """Part of a unit's packing/unpacking: one of our copy ops, a view, a node traced inside the
    unit's gather (``torch.fx.traceback.annotate``), which is how decomposed copies and
    ``wrap_triton`` launches show, or a constant it reads (a launch's segment table)."""
    return node.op == "get_attr" or node.op == "call_function" and (
        is_copy_in(node) or is_copy_out(node) or is_view(node) or (unit is not None and unit_of(node) == unit)
    )


def copy_in_nodes(all_gather: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes that pack the all-gather's input from the shards (graph inputs), in graph order:
    one ``all_gather_copy_in_fused`` call, or its decomposition (casts, pads, a ``cat``)."""
    unit = unit_of(all_gather)
    found: set[torch.fx.Node] = set()
    frontier = [all_gather.args[0]]
    while frontier:
        node = frontier.pop()
        if node in found or not _belongs(node, unit):
            continue
        found.add(node)
        frontier.extend(node.all_input_nodes)
    return [n for n in all_gather.graph.nodes if n in found]


def gather_chain(wait: torch.fx.Node) -> list[torch.fx.Node]:
    """The all-gather feeding ``wait``, its copy-in, and everything between ``wait`` and the
    views of the full parameters: the copy-out (one op, a ``wrap_triton`` launch, or ATen
    slicing), its getitems and single-input view chains. A node joins only if every input it
    has is already in the chain or is a constant, so user compute never does."""
    ag = wait.args[0]
    unit = unit_of(wait) if unit_of(wait) is not None else unit_of(ag)
    chain = copy_in_nodes(ag) + [ag, wait]
    members, memo = set(chain), {}
    frontier = list(wait.users)
    while frontier:
        node = frontier.pop()
        if node in members or not _belongs(node, unit):
            continue
        if not all(x in members or _is_constant(x, memo) for x in node.all_input_nodes):
            continue
        constants = [x for x in node.all_input_nodes if x not in members and x.op == "call_function"]
        chain.extend(constants + [node])
        members.update(constants + [node])
        frontier.extend(node.users)
    return chain


def tag_reshard(gm: torch.fx.GraphModule, strategy_of: Callable[[Optional[int]], ShardingStrategy]) -> torch.fx.GraphModule:
    """Tag every unit gather in joint graph ``gm`` (an all-gather traced inside ``gather_unit``,
    which carries the unit annotation; other all-gathers are left alone); ``strategy_of(unit_id)``
    gives its strategy."""
    for node in list(gm.graph.nodes):
        if not (is_wait_tensor(node) and is_all_gather(node.args[0])):
            continue
        unit = unit_of(node) if unit_of(node) is not None else unit_of(node.args[0])
        if unit is None:
            continue  # not traced inside one of our gathers: a user's own collective
        chain = gather_chain(node)
        strategy = strategy_of(unit)
        policy = (
            CheckpointPolicy.MUST_RECOMPUTE
            if strategy.reshards_after_forward
            else CheckpointPolicy.MUST_SAVE
        )
        for member in chain:
            if member.op == "get_attr":
                continue  # a constant table: nothing to save or recompute
            torch_private.tag_recompute(member, policy, _AC_GRAPH_ID)
    return gm
