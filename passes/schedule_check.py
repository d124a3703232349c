"""Read the collective schedule of a compiled graph, and check that every rank has the same one.

An analysis pass (it never rewrites). Given a forward or backward graph::

    ag  = _c10d_functional.all_gather_into_tensor(slot, 2, "0")        # 4 KiB in
    w   = _c10d_functional.wait_tensor(ag)
    ...
    rs  = _c10d_functional.reduce_scatter_tensor(packed, "sum", 2, "0")

``collective_schedule`` returns ``[Collective("all_gather_into_tensor", 4096, ...),
Collective("reduce_scatter_tensor", ...)]`` in program order. Ranks compile independently, so a
rank-dependent decision anywhere in the compiler would reorder collectives and hang the job;
``verify_schedule_across_ranks`` compares the fingerprints once per graph and raises instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from fsdp_compile.consistency import first_mismatch_across_ranks

_COLLECTIVES = {
    "all_gather_into_tensor": 0,
    "reduce_scatter_tensor": 0,
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

    def __str__(self) -> str:
        return f"{self.kind}({self.input_bytes} B {self.dtype})"


def collective_kind(node: torch.fx.Node):
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return None
    if target.namespace != "_c10d_functional":
        return None
    name = target._schema.name.split("::")[-1]
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


def collective_schedule(gm: torch.fx.GraphModule) -> list[Collective]:
    schedule = []
    for node in gm.graph.nodes:
        kind = collective_kind(node)
        if kind is not None:
            schedule.append(Collective(kind, *_input_bytes(node)))
    return schedule


def verify_schedule_across_ranks(schedule: list[Collective], group, what: str) -> None:
    fingerprint = [(c.kind, c.input_bytes, c.dtype) for c in schedule]
    mismatch = first_mismatch_across_ranks(fingerprint, group)
    if mismatch is not None:
        rank, theirs = mismatch
        raise RuntimeError(
            f"fsdp_compile: the compiled {what} graph on this rank issues collectives "
            f"{fingerprint} but rank {rank}'s issues {theirs}; ranks must compile the same "
            "model with the same inputs (shapes, dtypes) or the job would hang"
        )
