"""What a compiled graph pair does, as plain data the tests assert on: the collectives of the
forward and backward graphs and how many gathered parameters the forward saves for backward."""
from __future__ import annotations

import collections

import torch
import torch.fx

# The reduce-scatter's collective in graphs whose shard group is a gloo group (every test's):
# an ``all_to_all_single`` followed by a local sum (see fsdp_compile/collectives.py).
REDUCE_SCATTER = "all_to_all_single"


def graph_structure(record) -> dict:
    """``record``: a ``CompiledGraphs`` (``explain``'s source) -> collective counts per graph,
    ``saved_gathered``, the forward's outputs (saved for backward) that are gathered parameters,
    and ``saved_units``, the names of the units they belong to ("" for the root)."""

    def count(name):
        return dict(collections.Counter(c.kind for c in record.schedules.get(name, [])))

    outputs = next(n for n in record.forward.graph.nodes if n.op == "output").args[0]
    saved = [o for o in outputs if isinstance(o, torch.fx.Node)]
    return {
        "forward": count("forward"),
        "backward": count("backward"),
        "saved_gathered": sum(comes_from_gather(o) for o in saved),
        "saved_units": sorted({_unit_name(o) for o in saved if comes_from_gather(o)}),
    }


def _unit_name(node: torch.fx.Node) -> str:
    """The name of the unit a gathered node was traced in (its annotation, or its inputs')."""
    from fsdp_compile.passes.reshard import unit_of
    from fsdp_compile.registry import get_unit

    frontier, seen = [node], set()
    while frontier:
        current = frontier.pop()
        if current in seen:
            continue
        seen.add(current)
        if unit_of(current) is not None:
            return get_unit(unit_of(current)).name
        frontier.extend(current.all_input_nodes)
    return "?"


def comes_from_gather(node: torch.fx.Node) -> bool:
    """True if ``node`` is a gathered parameter: copy-out/wait output, a node of a decomposed
    copy-out (tagged by ``passes.reshard``, not by a user's checkpoint region), or a view chain
    of one."""
    from fsdp_compile.passes.reshard import _AC_GRAPH_ID
    from fsdp_compile.torch_private import AC_GRAPH_ID_KEY

    while node.op == "call_function":
        name = str(node.target)
        if "all_gather_copy_out" in name or "wait_tensor" in name or node.meta.get(AC_GRAPH_ID_KEY) == _AC_GRAPH_ID:
            return True
        if not (getattr(node.target, "is_view", False) or getattr(node.target, "__name__", "") == "getitem"):
            return False
        node = node.args[0]
    return False
