"""Which ranks a sharded model's collectives span: ``fully_shard``'s ``process_group`` /
``device_mesh`` / strategy -> one ``Groups``.

Every unit of a model uses the same ``Groups``:

- the *shard* group: parameters are split over its ranks (all-gathers and reduce-scatters);
- the *replicate* group (hybrid sharding only): ranks holding the same shard (one all-reduce
  of each reduced gradient shard);
- *everyone*: every rank of the two together, where the lockstep and schedule checks run.

A 1-D mesh or a process group is plain sharding (no replicate group). A 2-D mesh must
name its dims ``("replicate", "shard")``, as FSDP2's HSDP meshes do; on it FULL_SHARD becomes
HYBRID_SHARD and SHARD_GRAD_OP becomes HYBRID_SHARD_ZERO2.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from . import torch_private
from .config import ShardingStrategy
from .gloo_worker import one_worker_group_name, served_by_gloo

HSDP_DIM_NAMES = ("replicate", "shard")


@dataclass(frozen=True)
class Groups:
    shard: Optional[dist.ProcessGroup]  # None: no process group (a single process)
    shard_name: Optional[str]  # our collectives' group (None: one rank, no collective runs)
    shard_size: int
    shard_rank: int
    replicate: Optional[dist.ProcessGroup]
    replicate_name: Optional[str]  # None unless hybrid with more than one replica
    replicate_size: int
    everyone: Optional[dist.ProcessGroup]  # lockstep and schedule checks
    mesh: Optional[object]  # the user's DeviceMesh (state dicts place DTensors on it), or None
    strategy: ShardingStrategy
    # (group name, role) of the mesh dims beside ours that parameters are DTensors on (tensor
    # parallelism, tensor_parallel.py): their collectives come from DTensor, named by role
    other_roles: tuple[tuple[str, str], ...] = ()

    @property
    def roles(self) -> dict[str, str]:
        """Process group name -> its role, ``"shard"`` or ``"replicate"`` (names differ between
        ranks of different shard groups; roles are what ranks can compare)."""
        roles = {}
        for group, name, role in (
            (self.shard, self.shard_name, "shard"), (self.replicate, self.replicate_name, "replicate")
        ):
            if group is not None:
                roles[group.group_name] = role
            if name is not None:  # our collectives' group: the user's, or its one-worker twin
                roles[name] = role
        roles.update(self.other_roles)
        return roles

    def ranks(self, role: str) -> list[int]:
        """Global ranks of this rank's group of ``role``."""
        group = self.shard if role == "shard" else self.replicate
        return [] if group is None else dist.get_process_group_ranks(group)


def resolve_groups(process_group, device_mesh, strategy: ShardingStrategy, device_type: str) -> Groups:
    """The groups of ``fully_shard(process_group=, device_mesh=, strategy=)`` (see module
    docstring). Raises ``ValueError`` naming the argument for a combination that cannot work."""
    if process_group is not None and device_mesh is not None:
        raise ValueError(
            "fully_shard: pass process_group or device_mesh, not both (a 1-D device_mesh is the "
            "same as its process group)"
        )
    if device_mesh is None and strategy.hybrid:
        if process_group is not None:
            raise ValueError(
                f"fully_shard: strategy={strategy.name} needs a 2-D device_mesh with dims "
                f"{HSDP_DIM_NAMES}, not a process_group; e.g. device_mesh=init_device_mesh("
                "'cpu', (replicas, ranks_per_replica), mesh_dim_names=('replicate', 'shard'))"
            )
        device_mesh = _mesh_per_node(strategy, device_type)
    if device_mesh is None:
        groups = _one_group(process_group, strategy)
    else:
        groups = _from_mesh(device_mesh, strategy)
    return _through_one_worker_gloo(groups, torch.device(device_type))


def _through_one_worker_gloo(groups: Groups, device: torch.device) -> Groups:
    """Our collectives on a gloo group run through its one-worker twin (``gloo_worker.py``:
    gloo's two workers corrupt the heap when they finish collectives at the same time)."""
    swap = {}
    for field, group in (("shard_name", groups.shard), ("replicate_name", groups.replicate)):
        if getattr(groups, field) is not None and served_by_gloo(group, device):
            swap[field] = one_worker_group_name(group)
    return dataclasses.replace(groups, **swap) if swap else groups


def _one_group(group, strategy: ShardingStrategy) -> Groups:
    if group is None and not dist.is_initialized():
        return Groups(None, None, 1, 0, None, None, 1, None, None, strategy)
    if group is None:
        group = dist.group.WORLD
    if dist.get_rank(group) < 0:
        raise ValueError(
            f"fully_shard: this process (global rank {dist.get_rank()}) is not a member of "
            f"process_group (ranks {dist.get_process_group_ranks(group)}); pass a group that "
            "contains every rank sharding this model, on every one of those ranks"
        )
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    name = group.group_name if world > 1 else None
    return Groups(group, name, world, rank, None, None, 1, group, None, strategy)


def _from_mesh(mesh, strategy: ShardingStrategy) -> Groups:
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"fully_shard: device_mesh must be a torch DeviceMesh, got {type(mesh).__name__}")
    if mesh.get_coordinate() is None:
        raise ValueError(
            f"fully_shard: this process (global rank {dist.get_rank()}) is not in device_mesh "
            f"{mesh.mesh.tolist()}; every rank sharding the model must be in the mesh"
        )
    if mesh.ndim == 1:
        if strategy.hybrid:
            raise ValueError(
                f"fully_shard: strategy={strategy.name} needs a 2-D device_mesh with dims "
                f"{HSDP_DIM_NAMES}; this one is 1-D (use FULL_SHARD on a 1-D mesh)"
            )
        return dataclasses.replace(_one_group(mesh.get_group(), strategy), mesh=mesh)
    if mesh.ndim != 2 or tuple(mesh.mesh_dim_names or ()) != HSDP_DIM_NAMES:
        raise ValueError(
            f"fully_shard: device_mesh has {mesh.ndim} dims named {mesh.mesh_dim_names}; hybrid "
            f"sharding takes a 2-D mesh with dims named {HSDP_DIM_NAMES} (replicas x ranks per "
            "replica), e.g. init_device_mesh('cpu', (2, 4), mesh_dim_names=('replicate', 'shard'))"
        )
    if strategy == ShardingStrategy.NO_SHARD:
        raise ValueError(
            "fully_shard: strategy=NO_SHARD replicates over every rank; pass a 1-D device_mesh "
            "or a process_group, not a 2-D (replicate, shard) mesh"
        )
    shard, replicate = mesh.get_group("shard"), mesh.get_group("replicate")
    shard_size, replicate_size = mesh.size(1), mesh.size(0)
    if mesh.size() == dist.get_world_size():
        everyone = dist.group.WORLD
    else:
        everyone = torch_private.flatten_mesh(mesh).get_group()
    return Groups(
        shard, shard.group_name if shard_size > 1 else None, shard_size, mesh.get_local_rank("shard"),
        replicate, replicate.group_name if replicate_size > 1 else None, replicate_size,
        everyone, mesh, strategy.as_hybrid(),
    )


def _mesh_per_node(strategy: ShardingStrategy, device_type: str):
    """FSDP1's default for hybrid sharding without groups: shard within each node, replicate
    across nodes. A node is torchrun's ``LOCAL_WORLD_SIZE`` ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    local = os.environ.get("LOCAL_WORLD_SIZE")
    if not dist.is_initialized() or local is None:
        raise ValueError(
            f"fully_shard: strategy={strategy.name} without device_mesh shards within each node "
            "and needs torchrun (LOCAL_WORLD_SIZE) and an initialized process group; else pass "
            "device_mesh=init_device_mesh(device, (replicas, ranks_per_replica), "
            "mesh_dim_names=('replicate', 'shard'))"
        )
    world, per_node = dist.get_world_size(), int(local)
    if world % per_node:
        raise ValueError(
            f"fully_shard: strategy={strategy.name}: world size {world} is not a multiple of "
            f"LOCAL_WORLD_SIZE {per_node}; pass device_mesh= explicitly"
        )
    return init_device_mesh(device_type, (world // per_node, per_node), mesh_dim_names=HSDP_DIM_NAMES)


def mesh_for_state_dicts(groups: Groups, device: torch.device):
    """The DeviceMesh (and DTensor placements) a sharded state-dict value lives on, for tensors
    on ``device``: the user's mesh when its device type matches, else one over the same groups."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Replicate, Shard

    mesh = groups.mesh
    if mesh is not None and mesh.device_type != device.type:
        if mesh.ndim == 1:
            mesh = DeviceMesh.from_group(groups.shard, device_type=device.type)
        else:
            mesh = DeviceMesh.from_group(
                [groups.replicate, groups.shard], device.type, mesh=mesh.mesh, mesh_dim_names=HSDP_DIM_NAMES
            )
    elif mesh is None:
        mesh = DeviceMesh.from_group(groups.shard, device_type=device.type)
    placements = (Shard(0),) if mesh.ndim == 1 else (Replicate(), Shard(0))
    return mesh, placements


def with_tensor_parallel(groups: Groups, tp_specs) -> Groups:
    """``groups`` once some parameters are DTensors on other mesh dims (``TPSpec``s): those
    dims' groups get their role (the dim's name), and the checks run over every rank of the
    combined mesh (FSDP's groups and the TP groups together)."""
    if not tp_specs:
        return groups
    roles = dict(groups.other_roles)
    for spec in tp_specs:
        for dim, name in enumerate(spec.mesh.mesh_dim_names):
            roles[torch_private.mesh_dim_group_name(spec.mesh, dim)] = name
    combined = max((s.sharded_mesh for s in tp_specs), key=lambda m: m.size())
    everyone = dist.group.WORLD if combined.size() == dist.get_world_size() else torch_private.flatten_mesh(combined).get_group()
    return dataclasses.replace(groups, other_roles=tuple(sorted(roles.items())), everyone=everyone)
