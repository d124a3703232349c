"""What fully_shard and the backend did to a model: ``explain(model)`` as text, and
``sharding_info(model)`` as data (what tests and tools read instead of private state)."""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
import torch.nn as nn

from . import torch_private
from .api import root_state
from .unit import Unit


@dataclass(frozen=True)
class ShardingInfo:
    """A snapshot of a sharded model's runtime state.

    ``units``: every unit as fully_shard built it (``Unit.name``: its module path, "" for the root);
    ``param_units``: every parameter name (tied names included) -> ``(unit name, index in unit)``;
    ``compiled_graphs``: one record per Dynamo graph the backend compiled (``CompiledGraphs``);
    ``in_forward``: a forward scope is open; ``summoned``: inside ``summon_full_params``;
    ``gathered``: names of the units that hold gathered (full) parameters right now -- empty
    between steps, whatever the strategy."""

    units: tuple[Unit, ...]
    param_units: dict
    compiled_graphs: tuple
    in_forward: bool
    summoned: bool
    gathered: tuple[str, ...]


def sharding_info(model: nn.Module) -> ShardingInfo:
    """The runtime state of ``model`` (the sharded module or its ``torch.compile`` wrapper)."""
    state = root_state(getattr(model, "_orig_mod", model))
    return ShardingInfo(
        units=tuple(state.units),
        param_units={fqn: (unit.name, index) for fqn, (unit, index) in state.fqn_to_param.items()},
        compiled_graphs=tuple(state.compiled_graphs),
        in_forward=state.in_forward,
        summoned=state.summoned is not None,
        gathered=tuple(rt.unit.name for rt in state.runtime.values() if rt.held),
    )


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def explain(model: nn.Module) -> str:
    """Units (parameters, shard and full sizes, strategy, dtypes), every process group (shard,
    replicate for hybrid sharding, and the tensor-parallel mesh dims whose collectives come from
    DTensor) and, for every graph the ``fsdp_compile`` backend compiled, each group's count of
    each kind of collective, then the collectives in program order with the bytes each one hands
    to the backend and the group it runs on. Accepts the sharded module or its ``torch.compile``
    wrapper."""
    module = getattr(model, "_orig_mod", model)
    state = root_state(module)
    lines = [f"fsdp_compile: {type(module).__name__} in {len(state.units)} units"]
    for unit in state.units:
        spec = unit.spec
        elem = unit.local_flat.element_size()
        full = sum(p.full_numel for p in unit.layout.params)
        replicas = f" x {spec.replicate_size} replicas" if spec.replicates else ""
        lines.append(
            f"  unit {unit.name or '<root>'!r}: {len(unit.layout.params)} params, "
            f"{unit.strategy.name}, world {spec.world_size}{replicas}, shard {_fmt_bytes(unit.layout.local_numel * elem)} "
            f"of {_fmt_bytes(full * elem)} full, gather {str(unit.gather_dtype).replace('torch.', '')}, "
            f"reduce {str(unit.reduce_dtype).replace('torch.', '')}"
        )
        for param, shape, tp, dim in zip(unit.layout.params, unit.orig_shapes, unit.tp_specs, unit.shard_dims):
            held = "whole on every rank" if len(shape) == 0 else f"{param.chunk_rows} rows/rank"
            if dim:
                held = f"{param.chunk_rows} of dim {dim}/rank"
            if tp is not None:
                held += f" of its TP-local {tuple(shape)}, a DTensor {tuple(tp.placements)} on {tp.mesh.mesh_dim_names}"
                shape = tp.shape
            lines.append(f"    {param.fqn} {tuple(shape)} -> {held}")
    if not state.compiled_graphs:
        lines.append("no compiled graphs yet (run a compiled forward/backward first)")
    backend = dist.get_backend(state.group) if state.group is not None else "none (world size 1)"
    lines.append(f"process group backend: {backend}")
    groups = state.groups
    for role in ("shard", "replicate"):
        ranks = groups.ranks(role) if groups is not None else []
        if ranks:
            name = groups.shard_name if role == "shard" else groups.replicate_name
            user = groups.shard if role == "shard" else groups.replicate
            twin = "" if name in (None, user.group_name) else " (our collectives: its one-worker gloo twin)"
            dim = _mesh_dim_name(groups.mesh, role)
            lines.append(f"{role} group{dim}: global ranks {ranks}{twin}")
    for name, role in (groups.other_roles if groups is not None else ()):
        lines.append(f"{role} group (tensor parallel, its collectives from DTensor): global ranks "
                     f"{dist.get_process_group_ranks(_resolve_group(name))}")
    for number, record in enumerate(state.compiled_graphs):
        lines.append(f"compiled graph {number} ({record.inner}): {len(record.gathers)} unit gathers")
        if record.kept_gathered:
            kept = ", ".join(repr(name or "<root>") for name in record.kept_gathered)
            lines.append(f"  kept gathered from forward to backward (not gathered again): {kept}")
        for name in ("forward", "backward"):
            schedule = record.schedules.get(name)
            if schedule is None:
                lines.append(f"  {name}: not compiled yet")
                continue
            total = sum(c.input_bytes for c in schedule)
            lines.append(f"  {name}: {len(schedule)} collectives, {_fmt_bytes(total)} in")
            lines.append(f"    by group: {_by_group(schedule)}")
            for c in schedule:
                note = ""
                if backend == "gloo" and c.kind == "reduce_scatter_tensor":
                    # gloo has no native reduce-scatter: it all-reduces the whole input.
                    note = f"  (gloo: emulated by an all-reduce of all {_fmt_bytes(c.input_bytes)})"
                elif c.kind == "all_to_all_single":
                    note = ("  (the reduce-scatter: gloo has none, its reduce_scatter_tensor is an all-reduce"
                            " of the whole input; each slot goes to its rank and is summed there)")
                lines.append(f"    {c.kind:<24} {_fmt_bytes(c.input_bytes):>10} {c.dtype} on {c.group} group{note}")
    return "\n".join(lines)


_PLAIN = {
    "all_gather_into_tensor": "all-gather", "reduce_scatter_tensor": "reduce-scatter",
    "all_to_all_single": "all-to-all", "all_reduce": "all-reduce",
    "all_gather_into_tensor_coalesced": "coalesced all-gather",
    "reduce_scatter_tensor_coalesced": "coalesced reduce-scatter", "all_reduce_coalesced": "coalesced all-reduce",
}


def _mesh_dim_name(mesh, role: str) -> str:
    """`` (mesh dim 'dp')`` when the user's mesh names the dim of ``role`` other than the role."""
    names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
    if not names:
        return ""
    name = names[-1] if role == "shard" else names[0] if len(names) > 1 else None
    return f" (mesh dim {name!r})" if name not in (None, role) else ""


def _by_group(schedule) -> str:
    """``shard: 3 all-gather; tp: 4 all-reduce``: each group (in order of first use) with the
    count of each kind of collective on it (plain names: the op names are the lines below)."""
    counts: dict[str, dict[str, int]] = {}
    for c in schedule:
        kinds = counts.setdefault(c.group, {})
        kind = _PLAIN.get(c.kind, c.kind)
        kinds[kind] = kinds.get(kind, 0) + 1
    if not counts:
        return "none"
    return "; ".join(
        f"{group}: " + ", ".join(f"{n} {kind}" for kind, n in kinds.items()) for group, kinds in counts.items()
    )


def _resolve_group(name: str):

    return torch_private.resolve_process_group(name)
