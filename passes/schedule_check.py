"""Read the collective schedule of a compiled graph (what every rank must issue alike).

An analysis pass (it never rewrites). Given a forward or backward graph::

    ag  = _c10d_functional.all_gather_into_tensor(slot, 2, "1")        # 4 KiB in
    w   = _c10d_functional.wait_tensor(ag)
    ...
    rs  = _c10d_functional.reduce_scatter_tensor(packed, "sum", 2, "1")
    ar  = _c10d_functional.all_reduce(rs_waited, "sum", "2")             # hybrid sharding

``collective_schedule(gm, roles={"1": "shard", "2": "replicate"})`` returns
``[Collective("all_gather_into_tensor", 4096, "float32", "shard"), Collective("reduce_scatter_tensor",
..., "shard"), Collective("all_reduce", ..., "replicate")]`` in program order. A group is named by
its role: the shard groups of a 2-D mesh are different groups with different names on different
ranks, but the same role. Ranks compile independently, so a rank-dependent decision anywhere in
the compiler would reorder collectives and hang the job; ``consistency.verify_schedule_across_ranks``
compares the fingerprints (kind, bytes, dtype, group role, and for a gradient reduction which
of the unit's parameters got no gradient) across ranks once per graph and raises instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx

from fsdp_compile import torch_private

_COLLECTIVES = {
    "all_gather_into_tensor": 0,
    "reduce_scatter_tensor": 0,
    "all_to_all_single": 0,  # the reduce-scatter on gloo groups (collectives.py)
    "all_reduce": 0,
    "all_gather_into_tensor_coalesced": 0,
    "reduce_scatter_tensor_coalesced": 0,
    "all_reduce_coalesced": 0,
}


@dataclass(frozen=True)
class Collective:
    kind: str  # the _c10d_functional op name
    input_bytes: int  # bytes this rank hands to the collective
    dtype: str
    group: str = ""  # the group's role ("shard", "replicate"), else its name
    # A gradient reduction: the unit's parameters that got no gradient on this rank (their
    # shards' .grad stays None, ops._has_grad), so ranks that disagree differ here.
    no_grad: tuple = ()

    def __str__(self) -> str:
        without = f", no gradient for parameters {list(self.no_grad)}" if self.no_grad else ""
        return f"{self.kind}({self.input_bytes} B {self.dtype} on {self.group}{without})"

    @property
    def fingerprint(self) -> tuple:
        return (self.kind, self.input_bytes, self.dtype, self.group, self.no_grad)


def collective_kind(node: torch.fx.Node):
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch_private.OpOverload):
        return None
    if target.namespace != "_c10d_functional":
        return None
    name = torch_private.op_schema_name(target).split("::")[-1]
    return name if name in _COLLECTIVES else None


def _input_bytes(node: torch.fx.Node) -> tuple[int, str]:
    first = node.args[0]
    values = first if isinstance(first, (list, tuple)) else [first]
    total, dtype = 0, ""
    for value in values:
        val = value.meta.get("val") if isinstance(value, torch.fx.Node) else None
        if isinstance(val, torch.Tensor):
            total += val.numel() * val.element_size()
            dtype = str(val.dtype).replace("torch.", "")
    return total, dtype


def _group_name(node: torch.fx.Node) -> str:
    """Every ``_c10d_functional`` collective takes its group name last."""
    return str(node.kwargs.get("group_name", node.args[-1]))


def collective_schedule(gm: torch.fx.GraphModule, roles: Optional[dict[str, str]] = None) -> list[Collective]:
    """The collectives of ``gm`` in program order; ``roles`` maps group names to roles."""
    schedule = []
    for node in gm.graph.nodes:
        kind = collective_kind(node)
        if kind is not None:
            name = _group_name(node)
            no_grad = tuple(node.meta.get("custom", {}).get("fsdp_no_grad", ()))
            schedule.append(Collective(kind, *_input_bytes(node), (roles or {}).get(name, name), no_grad))
    return schedule
