"""A ``fully_shard`` call over modules that earlier ``fully_shard`` calls already sharded.

The experts of a MoE block live on their own mesh (expert parallelism: split over the "ep"
ranks, sharded over the remaining data-parallel ones), so they are sharded by their own call,
``fully_shard(block.moe.experts, device_mesh=mesh["efsdp"], ...)``, before the model's
``fully_shard(model, device_mesh=dp_mesh, policy=...)``. The outer call *adopts* each inner
root: its units (with their own groups, strategy and options) join the outer tree under their
full names, the inner root's unit is reshared after its module's forward like a policy unit,
and the inner tree's hooks give way to the outer's. From then on there is one tree, one forward
scope, one lockstep check and one set of compiled graphs, as if one call had built every unit.
"""
from __future__ import annotations

import dataclasses

import torch.distributed as dist
import torch.nn as nn

from . import torch_private
from .params import rebind_accessors
from .runtime import UNIT_OF_MODULE, FSDPState

ROOT_STATE = "_fsdp_root_state"  # module.__dict__ key: the FSDPState of a tree's root


def inner_roots(module: nn.Module) -> dict[str, nn.Module]:
    """Path -> submodule of ``module`` that an earlier ``fully_shard`` call made a root."""
    return {name: sub for name, sub in module.named_modules() if name and ROOT_STATE in sub.__dict__}


def adopted_param_ids(inner: dict[str, nn.Module]) -> set[int]:
    """The ids of the shards the inner roots' units hold (the outer call leaves them alone)."""
    return {id(s) for sub in inner.values() for u in sub.__dict__[ROOT_STATE].units for s in u.shards()}


def adopt(state: FSDPState, root: nn.Module, inner: dict[str, nn.Module]) -> None:
    """Move the units of every inner root into ``state`` (``root``'s tree); see the module
    docstring. Raises ``ValueError`` when an inner root's mesh cannot be used beside ``root``'s."""
    roles = dict(state.groups.other_roles)
    for path, sub in inner.items():
        inner_state: FSDPState = sub.__dict__[ROOT_STATE]
        _check_groups(path, inner_state.groups, state.groups)
        del sub.__dict__[ROOT_STATE]
        _remove_hooks(sub, inner_state.hook_ids)
        for unit in inner_state.units:
            unit.name = f"{path}.{unit.name}" if unit.name else path
            unit.layout = dataclasses.replace(
                unit.layout,
                params=tuple(dataclasses.replace(p, fqn=f"{path}.{p.fqn}") for p in unit.layout.params),
            )
            unit.groups = unit.groups or inner_state.groups
            unit.module.__dict__[UNIT_OF_MODULE] = state.add_unit(unit)
        for module in sub.modules():  # their reads now go to this state's records of the units
            rebind_accessors(module)
        roles.update(_roles(path, inner_state.groups))
    state.groups = dataclasses.replace(state.groups, other_roles=tuple(sorted(roles.items())))


def _roles(path: str, groups) -> dict[str, str]:
    """The inner tree's group names -> roles for schedules: its shard group is named after its
    mesh dim (e.g. "efsdp"), else after the module; the ranks of every group agree on both."""
    mesh = groups.mesh
    dims = tuple(mesh.mesh_dim_names or ()) if mesh is not None else ()
    names = {"shard": dims[-1] if dims else f"shard of {path}", "replicate": f"replicate of {path}"}
    if mesh is not None and mesh.ndim == 2 and dims:
        names["replicate"] = dims[0]
    return {name: names.get(role, role) for name, role in groups.roles.items()}


def _check_groups(path: str, inner, outer) -> None:
    if inner is None or outer is None or inner.everyone is None or outer.everyone is None:
        return
    if inner.mesh is not None and outer.mesh is not None:
        if torch_private.root_mesh(inner.mesh) is not torch_private.root_mesh(outer.mesh):
            raise ValueError(
                f"fully_shard: submodule {path!r} is sharded on mesh {inner.mesh.mesh_dim_names} that "
                f"does not come from the same root mesh as device_mesh {outer.mesh.mesh_dim_names}; "
                "slice both from one mesh, e.g. mesh = init_device_mesh(dev, (efsdp, ep), "
                "mesh_dim_names=('efsdp', 'ep')); fully_shard(experts, device_mesh=mesh['efsdp']); "
                "fully_shard(model, device_mesh=mesh['efsdp', 'ep']._flatten('dp'))"
            )
    mine, theirs = set(dist.get_process_group_ranks(outer.everyone)), set(dist.get_process_group_ranks(inner.everyone))
    if not theirs <= mine:
        raise ValueError(
            f"fully_shard: submodule {path!r} is sharded over ranks {sorted(theirs)}, not all of "
            f"which are among this call's ranks {sorted(mine)}; shard the outer module over every "
            "rank the inner one uses"
        )


def _remove_hooks(module: nn.Module, hook_ids: tuple[int, int]) -> None:
    """Drop an inner tree's shared forward hooks (api._register_shared_hooks) from its modules."""
    for sub in module.modules():
        torch_private.remove_shared_forward_hooks(sub, hook_ids)
