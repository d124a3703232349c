"""One unit's communication: copy-in -> collective -> wait -> copy-out, as plain tensor functions.

Takes tensors, a ``UnitLayout`` and a ``CommSpec``; knows nothing about modules. The same
functions run eagerly and under AOTAutograd tracing (fake tensors), so the compiled graph and
the eager runtime issue identical collectives: functional collectives (``_c10d_functional``)
followed by ``wait_tensor``. Gradients are averaged over ranks (DDP semantics): summed by the
collectives in ``reduce_dtype`` and divided by the number of ranks before the cast back.

Hybrid sharding (a 2-D mesh): parameters are sharded over the *shard* group and replicated over
the *replicate* group. Gathers use the shard group only; gradients are reduce-scattered on the
shard group, then this rank's reduced shard is all-reduced on the replicate group.

gloo has no reduce-scatter of its own: ``reduce_scatter_tensor`` on a gloo group all-reduces the
whole input (every byte travels twice) and keeps a slice. On such groups (``CommSpec.
reduce_scatter == "all_to_all"``) the reduce-scatter is an ``all_to_all_single`` (rank r receives
every rank's slot r: each byte travels once) and a sum of the received slots in rank order, the
same order on every rank (faster than gloo's; benchmarks/README.md, "What do the collectives
cost").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from . import kernels, torch_private
from .gloo_worker import served_by_gloo
from .layout import UnitLayout

_c10d = torch_private.c10d_functional


@dataclass(frozen=True)
class CommSpec:
    """What a unit's collectives need: the group and the dtypes on the wire."""

    group_name: Optional[str]  # None: no process group (world size 1), collectives are skipped
    world_size: int
    rank: int
    replicated: bool  # NO_SHARD: all-reduce gradients, never all-gather
    param_dtype: Optional[torch.dtype]  # dtype of gathered parameters; None keeps the shard dtype
    reduce_dtype: Optional[torch.dtype]  # dtype of the gradient reduction; None: the grad dtype
    # Hybrid sharding: the group this rank's shard is replicated over (None: not replicated)
    replicate_group_name: Optional[str] = None
    replicate_size: int = 1
    # How the shard group reduce-scatters: "native" (reduce_scatter_tensor) or "all_to_all"
    # (all_to_all_single + a local sum; for gloo, see the module docstring)
    reduce_scatter: str = "native"
    # What the reduced gradients are divided by (FSDP2's ``set_gradient_divide_factor``); None:
    # the number of ranks they were summed over. Expert parallelism sums an expert's gradient
    # over the expert-parallel ranks in its all-to-all's backward before this reduction.
    divide_factor: Optional[float] = None

    @property
    def communicates(self) -> bool:
        """Parameters are split over more than one rank of the shard group."""
        return self.group_name is not None and self.world_size > 1

    @property
    def replicates(self) -> bool:
        """Each shard is also held by other ranks: reduced gradients are all-reduced over them."""
        return self.replicate_group_name is not None and self.replicate_size > 1


def all_gather_unit(
    shards: list[torch.Tensor], layout: UnitLayout, spec: CommSpec
) -> list[torch.Tensor]:
    """This rank's shards -> every parameter's full tensor (in ``param_dtype``), one all-gather."""
    dtype = spec.param_dtype or shards[0].dtype
    if spec.replicated or not spec.communicates:
        # NO_SHARD / world 1: the shard is the whole parameter; only the dtype may change.
        return [s.to(dtype) if s.dtype != dtype else s.view_as(s) for s in shards]
    slot = kernels.all_gather_copy_in(shards, layout.padded_numels, dtype)
    gathered = _c10d.all_gather_into_tensor(slot, spec.world_size, spec.group_name)
    gathered = _c10d.wait_tensor(gathered)
    return kernels.all_gather_copy_out(gathered, layout.full_shapes, spec.world_size)


def pack_unit_grads(
    grads: list[Optional[torch.Tensor]], layout: UnitLayout, spec: CommSpec
) -> torch.Tensor:
    """Full gradients -> the reduction input in ``reduce_dtype``: rank-major padded slots
    (``torch._chunk_cat`` layout), or the plain concatenation for NO_SHARD / world 1.
    ``None`` gradients count as zeros."""
    like = next(g for g in grads if g is not None)
    reduce_dtype = spec.reduce_dtype or like.dtype
    full = [
        g if g is not None else like.new_zeros(p.full_shape)
        for g, p in zip(grads, layout.params)
    ]
    if spec.replicated or not spec.communicates:
        return torch.cat([g.reshape(-1).to(reduce_dtype) for g in full])
    return kernels.reduce_scatter_copy_in(full, spec.world_size, reduce_dtype)


def reduce_unit_grads(
    grads: list[Optional[torch.Tensor]],
    layout: UnitLayout,
    spec: CommSpec,
    grad_dtypes: list[torch.dtype],
    pending: Optional[torch.Tensor] = None,
) -> list[torch.Tensor]:
    """Full gradients (+ ``pending`` packed gradients held back by ``no_sync``) -> this rank's
    shard of their rank average: one reduce-scatter (one all-reduce for NO_SHARD) on the shard
    group, then, for hybrid sharding, one all-reduce of the reduced shard on the replicate group.
    Returns shard-shaped tensors in ``grad_dtypes`` (the shards' dtypes), views into one flat
    buffer."""
    packed = pack_unit_grads(grads, layout, spec)
    if pending is not None:
        packed = packed + pending
    flat, ranks = packed, 1
    if spec.communicates and spec.replicated:
        flat = _c10d.wait_tensor(_c10d.all_reduce(flat, "sum", spec.group_name))
    elif spec.communicates:
        flat = _reduce_scatter(flat, spec)
    if spec.communicates:
        ranks *= spec.world_size
    if spec.replicates:
        flat = _c10d.wait_tensor(_c10d.all_reduce(flat, "sum", spec.replicate_group_name))
        ranks *= spec.replicate_size
    if spec.divide_factor is not None:
        flat = flat / spec.divide_factor
    elif ranks > 1:
        flat = flat / ranks
    return _split_shards(flat, layout, spec, grad_dtypes)


def _reduce_scatter(packed: torch.Tensor, spec: CommSpec) -> torch.Tensor:
    """Rank-major packed slots -> the sum over ranks of this rank's slot."""
    if spec.reduce_scatter == "all_to_all":
        sizes = [packed.numel() // spec.world_size] * spec.world_size
        received = _c10d.wait_tensor(_c10d.all_to_all_single(packed, sizes, sizes, spec.group_name))
        return received.view(spec.world_size, -1).sum(0)
    return _c10d.wait_tensor(_c10d.reduce_scatter_tensor(packed, "sum", spec.world_size, spec.group_name))


def reduce_scatter_kind(group, device: torch.device) -> str:
    """``CommSpec.reduce_scatter`` for ``group`` on ``device``: "all_to_all" where the backend
    serving ``device`` is gloo (no native reduce-scatter), else "native"."""
    return "all_to_all" if served_by_gloo(group, device) else "native"


def _split_shards(
    flat: torch.Tensor, layout: UnitLayout, spec: CommSpec, dtypes: list[torch.dtype]
) -> list[torch.Tensor]:
    """Shard-shaped views of this rank's local flat buffer (cast to each shard's dtype)."""
    out = []
    for param, shape, dtype in zip(layout.params, layout.shard_shapes(spec.rank), dtypes):
        numel = param.row_numel * shape[0]
        piece = flat.narrow(0, param.offset, numel).view(shape)
        out.append(piece.to(dtype) if piece.dtype != dtype else piece)
    return out
