"""Parameters that tensor parallelism already made ``DTensor``s: what a unit holds of them and
what a read returns.

``parallelize_module(model, mesh["tp"], plan)`` turns a parameter into a ``DTensor`` on the TP
mesh (``Shard(d)`` or ``Replicate()``) whose local tensor is this TP rank's part. ``fully_shard``
treats that *TP-local* tensor as the parameter: the unit lays it out, shards its dim 0 over the
data-parallel ranks and all-gathers it back, exactly as a plain parameter (``layout.py``). The
registered parameter stays the same ``DTensor`` object; its local tensor becomes the shard (its
own tensor: ``install_local``) and its spec the combined ``(dp..., tp)`` mesh with FSDP2's
placements: ``_StridedShard(0, split_factor=tp)`` on the dp dim when TP also shards dim 0, else
``Shard(0)`` (HSDP: ``Replicate()`` first). So the parameter, its gradient, optimizer state and
state-dict values are DTensors of the original global shape, as FSDP2's.

A read inside forward returns ``DTensor.from_local(gathered local, tp mesh, tp placements)``:
the TP module code runs unchanged and its TP collectives come from DTensor. Its gradient comes
back as a ``DTensor``; ``to_local`` hands our reduce-scatter the local gradient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import torch_private


@dataclass(frozen=True)
class TPSpec:
    """How one TP ``DTensor`` parameter is laid out before and after ``fully_shard``."""

    mesh: object  # the TP DeviceMesh (1-D)
    placements: tuple  # on ``mesh``: Shard(d) or Replicate()
    shape: torch.Size  # global
    stride: tuple[int, ...]  # global, contiguous
    sharded_mesh: object  # (dp dims..., tp)
    sharded_placements: tuple

    def wrap(self, local: torch.Tensor) -> torch.Tensor:
        """The gathered TP-local tensor as the DTensor TP module code expects."""
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            local, self.mesh, self.placements, run_check=False, shape=self.shape, stride=self.stride
        )

    def tp_local_of_full(self, full: torch.Tensor) -> torch.Tensor:
        """This TP rank's part of a full (global) tensor: what ``distribute_tensor`` keeps."""
        from torch.distributed.tensor import Shard

        out = full
        for dim, placement in enumerate(self.placements):
            if isinstance(placement, Shard):
                chunks = torch.chunk(out, self.mesh.size(dim), dim=placement.dim)
                rank = self.mesh.get_local_rank(dim)
                if rank < len(chunks):
                    out = chunks[rank]
                else:
                    shape = list(out.shape)
                    shape[placement.dim] = 0
                    out = out.new_empty(shape)
        return out


def is_dtensor(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local_of(tensor: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor (differentiable, traceable), a plain tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def tp_spec_of(param, fqn: str, dp_mesh, hybrid: bool, shard_dim: int = 0) -> TPSpec:
    """The ``TPSpec`` of DTensor parameter ``param`` sharded over ``dp_mesh`` (``None``: a
    process group was passed) on dim ``shard_dim`` of its TP-local tensor. Raises
    ``ValueError`` naming ``fqn`` and the fix."""
    from torch.distributed.tensor import Replicate, Shard

    tp_mesh, placements = param.device_mesh, tuple(param.placements)
    if dp_mesh is None:
        raise ValueError(
            f"fully_shard: parameter {fqn!r} is a DTensor on mesh {tp_mesh} (tensor parallelism); "
            "pass the data-parallel dims of the same root mesh as device_mesh, e.g. "
            "mesh = init_device_mesh('cpu', (dp, tp), mesh_dim_names=('dp', 'tp')); "
            "parallelize_module(model, mesh['tp'], plan); fully_shard(model, device_mesh=mesh['dp'])"
        )
    for placement in placements:
        if not (type(placement) is Shard or isinstance(placement, Replicate)):
            raise ValueError(
                f"fully_shard: parameter {fqn!r} has placement {placement} on its mesh; fully_shard "
                "takes DTensor parameters placed Shard(dim) or Replicate() (a Partial parameter "
                "has no value of its own: redistribute it to Replicate() first)"
            )
    if tp_mesh.ndim != 1:
        raise ValueError(
            f"fully_shard: parameter {fqn!r} is a DTensor on a {tp_mesh.ndim}-D mesh "
            f"{tp_mesh.mesh_dim_names}; fully_shard takes parameters on one tensor-parallel mesh dim"
        )
    combined = _combined(dp_mesh, tp_mesh)
    if combined is None:
        raise ValueError(
            f"fully_shard: parameter {fqn!r} is a DTensor on mesh {tp_mesh.mesh_dim_names} that does "
            f"not come from the same root mesh as device_mesh {dp_mesh.mesh_dim_names}; slice both "
            "from one mesh: mesh = init_device_mesh(dev, (dp, tp), mesh_dim_names=('dp', 'tp')); "
            "parallelize_module(model, mesh['tp'], plan); fully_shard(model, device_mesh=mesh['dp'])"
        )
    if set(dp_mesh.mesh_dim_names) & set(tp_mesh.mesh_dim_names):
        raise ValueError(
            f"fully_shard: parameter {fqn!r} is sharded on mesh dim {tp_mesh.mesh_dim_names} which "
            f"device_mesh {dp_mesh.mesh_dim_names} also shards over; pass the other dims"
        )
    split = math.prod(
        tp_mesh.size(i) for i, p in enumerate(placements) if isinstance(p, Shard) and p.dim == shard_dim
    )
    dp_shard = torch_private.strided_shard(shard_dim, split_factor=split) if split > 1 else Shard(shard_dim)
    dp_placements = (Replicate(), dp_shard) if hybrid else (dp_shard,)
    shape = torch.Size(param.shape)
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return TPSpec(tp_mesh, placements, shape, stride, combined, dp_placements + placements)


def _combined(dp_mesh, tp_mesh):
    """The (dp..., tp) mesh, or None when the two do not come from one root mesh (torch may
    hand out one cached slice for equal dims of two roots, so the test is the concatenation:
    it must exist and hold every rank once)."""
    if not dp_mesh.mesh_dim_names or not tp_mesh.mesh_dim_names:
        return None
    # the meshes' rank tables are real tensors, also when the model is sharded under a
    # FakeTensorMode (fsdp_compile.estimate)
    with torch_private.unset_fake_temporarily():
        try:
            combined = torch_private.concatenate_meshes([dp_mesh, tp_mesh])
        except (RuntimeError, ValueError, AssertionError):
            return None
        ranks = combined.mesh.flatten().tolist()
    return combined if len(set(ranks)) == len(ranks) else None


def install_local(param, local: torch.Tensor, spec: TPSpec) -> None:
    """Make DTensor parameter ``param`` (the same object) the dp shard ``local`` on the combined
    mesh, as FSDP2 does with its sharded parameters' ``_local_tensor``. ``local`` must start at
    offset 0 of its own storage: Dynamo's fake-tensor conversion fails on a DTensor whose inner
    tensor sits at a nonzero storage offset (a view into a flat buffer), so a TP parameter's
    shard is its own tensor and not a view of the unit's flat buffer."""
    torch_private.set_local_tensor(param, local)
    torch_private.set_dtensor_placement(param, spec.sharded_mesh, spec.sharded_placements)

