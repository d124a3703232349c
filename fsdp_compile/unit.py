"""One unit: the parameters gathered and freed together -- its data and its collectives.

A ``Unit`` owns the local flat buffer that its shards are views of, the ``UnitLayout`` and the
``CommSpec`` of its collectives. It knows where each shard is registered (``holders``: every
``(module, attr)`` that holds the parameter, the first one canonical), so a shard replaced by
the user (``m.weight = nn.Parameter(t)``) is picked up at the next gather.

It holds no runtime state: what it is gathered for and its ``no_sync`` gradients live in its
``UnitRuntime`` (unit_runtime.py), owned by ``runtime.FSDPState``, which decides when a unit
gathers. ``Unit`` imports nothing above ``collectives`` (``ops`` calls into it through the
registry, never the reverse).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn as nn

from . import collectives, torch_private
from .config import ShardingStrategy
from .failures import naming_collective_failures
from .layout import UnitLayout, make_unit_layout
from .registry import register_unit
from .tensor_parallel import TPSpec, install_local, local_of


class Unit:
    def __init__(
        self,
        name: str,
        module: nn.Module,
        holders: list[list[tuple[nn.Module, str]]],
        layout: UnitLayout,
        orig_shapes: list[torch.Size],
        strategy: ShardingStrategy,
        spec: collectives.CommSpec,
        compute_device: torch.device,
    ):
        self.name = name
        self.module = module
        self.holders = holders
        self.layout = layout
        self.orig_shapes = orig_shapes
        self.strategy = strategy
        self.spec = spec
        self.compute_device = compute_device
        self.id = register_unit(self)
        self.local_flat: Optional[torch.Tensor] = None
        self.is_bucket = False  # a merge of other units' gathers (passes/bucketing.py)
        # per parameter: its TPSpec when it is a tensor-parallel DTensor (tensor_parallel.py;
        # the layout then describes its TP-local tensor), else None
        self.tp_specs: list[Optional[TPSpec]] = [None] * len(holders)
        # per parameter: the dim its shards split (``fully_shard(shard_placement_fn=)``). The
        # layout describes the parameter with that dim moved first, so the flat-buffer
        # arithmetic stays dim-0 (layout.py); ``_to_layout`` / ``_from_layout`` move it.
        self.shard_dims: list[int] = [0] * len(holders)
        self.groups = None  # the mesh.Groups it was built with (state dicts), or None: the state's

        # the first unit of its tree with the same ``signature()`` (FSDPState.assign_templates)
        self.template: int = self.id

    def __repr__(self) -> str:
        return f"Unit({self.name or '<root>'!r}, {len(self.layout.params)} params, {self.strategy.name})"

    # ---- what the unit holds -------------------------------------------------------------
    @property
    def fqns(self) -> list[str]:
        return [p.fqn for p in self.layout.params]

    @property
    def shard_dtype(self) -> torch.dtype:
        return self.local_flat.dtype

    @property
    def gather_dtype(self) -> torch.dtype:
        return self.spec.param_dtype or self.shard_dtype

    @property
    def reduce_dtype(self) -> torch.dtype:
        return self.spec.reduce_dtype or self.gather_dtype

    def shards(self) -> list[torch.Tensor]:
        """The registered parameters (a TP parameter: its DTensor on the combined mesh)."""
        return [holders[0][0]._parameters[holders[0][1]] for holders in self.holders]

    def local_shards(self, shards: Optional[list[torch.Tensor]] = None) -> list[torch.Tensor]:
        """What the collectives move: each shard, a TP parameter's local tensor (differentiable)."""
        return [local_of(s) for s in (self.shards() if shards is None else shards)]

    def wrap_full(self, index: int, full: torch.Tensor) -> torch.Tensor:
        """What a read of parameter ``index`` returns for its gathered tensor ``full``: a TP
        parameter's as a DTensor on its TP mesh (``TPSpec.wrap``), others as they are."""
        spec = self.tp_specs[index]
        return full if spec is None else spec.wrap(full)

    def _to_layout(self, index: int, tensor: torch.Tensor) -> torch.Tensor:
        """Parameter ``index``'s tensor (full or shard, in its own dim order) as the layout sees
        it: its shard dim first (a view)."""
        dim = self.shard_dims[index]
        return tensor.movedim(dim, 0) if dim else tensor

    def _from_layout(self, index: int, tensor: torch.Tensor) -> torch.Tensor:
        """The inverse of ``_to_layout`` (a view)."""
        dim = self.shard_dims[index]
        return tensor.movedim(0, dim) if dim else tensor

    def shard_shapes(self) -> list[tuple[int, ...]]:
        """This rank's shard shape of each parameter, in the parameter's own dim order."""
        out = []
        for dim, shape in zip(self.shard_dims, self.layout.shard_shapes(self.spec.rank)):
            shape = list(shape)
            shape.insert(dim, shape.pop(0))
            out.append(tuple(shape))
        return out

    def signature(self) -> tuple:
        """Everything the unit's gather and reduction depend on except which tensors they move:
        units with equal signatures (identical blocks) run the same collectives and copies.
        The root unit is never like another (the backend keeps it gathered), nor is a unit with
        tensor-parallel parameters (their shards are tensors of their own, not views of the flat
        buffer by which the backend tells units that share a graph apart)."""
        params = tuple((p.full_shape, p.chunk_rows, p.offset) for p in self.layout.params)
        flat = None if self.local_flat is None else (self.local_flat.dtype, self.local_flat.device)
        return (
            self.name == "", params, self.layout.world_size, self.layout.replicated,
            tuple(tuple(s) for s in self.orig_shapes), self.strategy, self.spec, flat, self.compute_device,
            self.id if any(s is not None for s in self.tp_specs) else None, tuple(self.shard_dims),
        )

    def full_shape(self, index: int) -> torch.Size:
        return self.orig_shapes[index]

    def check_shards(self, shards: list[torch.Tensor]) -> None:
        """Raise if a shard was replaced by a tensor of the wrong shape (nothing is modified)."""
        want = self.shard_shapes()
        for param, shard, shape, orig in zip(self.layout.params, map(local_of, shards), want, self.orig_shapes):
            if tuple(shard.shape) != tuple(shape):
                raise RuntimeError(
                    f"fsdp_compile: parameter {param.fqn!r} holds a tensor of shape "
                    f"{tuple(shard.shape)}, but its shard on rank {self.spec.rank} has shape "
                    f"{tuple(shape)} (full shape {tuple(orig) or param.full_shape}); assign a tensor of the "
                    "shard's shape, or edit full parameters inside fsdp_compile.summon_full_params"
                )

    # ---- communication (eager and traced) ------------------------------------------------
    def all_gather(self, shards: list[torch.Tensor], dtype: Optional[torch.dtype] = None) -> list[torch.Tensor]:
        spec = self.spec if dtype is None else _with_param_dtype(self.spec, dtype)
        shards = [
            self._to_layout(i, s.to(self.compute_device) if s.device != self.compute_device else s)
            for i, s in enumerate(shards)
        ]
        with naming_collective_failures(f"the all-gather of unit {self.name or '<root>'!r}"):
            fulls = collectives.all_gather_unit(shards, self.layout, spec)
        return [self._full_of(i, f) for i, f in enumerate(fulls)]

    def _full_of(self, index: int, gathered: torch.Tensor) -> torch.Tensor:
        """Parameter ``index``'s gathered tensor in its own shape and dim order: a parameter
        sharded on dim ``d > 0`` was gathered with ``d`` first, and is permuted back into a
        contiguous tensor (FSDP2's chunk-cat on copy-out), as a read of a plain one is."""
        if not self.shard_dims[index]:
            return _as_full(gathered, self.orig_shapes[index])
        return self._from_layout(index, gathered.view(self.layout.params[index].full_shape)).contiguous()

    def pack_grads(self, full_grads: list[Optional[torch.Tensor]]) -> torch.Tensor:
        return collectives.pack_unit_grads(self._flat_grads(full_grads), self.layout, self.spec)

    def reduce_grads(
        self,
        full_grads: list[Optional[torch.Tensor]],
        shard_dtypes: list[torch.dtype],
        pending: Optional[torch.Tensor],
    ) -> list[torch.Tensor]:
        with naming_collective_failures(f"the gradient reduction of unit {self.name or '<root>'!r}"):
            grads = collectives.reduce_unit_grads(
                self._flat_grads(full_grads), self.layout, self.spec, shard_dtypes, pending
            )
        return [self._from_layout(i, g) for i, g in enumerate(grads)]

    def _flat_grads(self, full_grads):
        # A 0-d parameter's gradient goes into every rank's slot (see layout.py).
        return [
            None if g is None else g.reshape(-1).expand(p.full_shape) if g.dim() == 0
            else self._to_layout(i, g).contiguous().reshape(p.full_shape) if self.shard_dims[i]
            else g.reshape(p.full_shape)
            for i, (g, p) in enumerate(zip(full_grads, self.layout.params))
        ]

    @classmethod
    def bucket(cls, units: list["Unit"]) -> "Unit":
        """One unit made of ``units`` (same strategy, group and dtypes): their layouts one after
        the other, so one collective moves all of them. Used by the bucketing pass only; the
        bucket owns no shards (its members do)."""
        first = units[0]
        params = [p for u in units for p in u.layout.params]
        layout = make_unit_layout(
            [p.fqn for p in params], [p.full_shape for p in params], first.layout.world_size,
            first.layout.replicated,
        )
        name = "bucket(" + ", ".join(u.name or "<root>" for u in units) + ")"
        merged = cls(
            name, first.module, [h for u in units for h in u.holders], layout,
            [s for u in units for s in u.orig_shapes], first.strategy, first.spec,
            first.compute_device,
        )
        merged.local_flat = first.local_flat  # dtype and device only
        merged.tp_specs = [s for u in units for s in u.tp_specs]
        merged.shard_dims = [d for u in units for d in u.shard_dims]
        merged.is_bucket = True
        return merged

    # ---- sharding ------------------------------------------------------------------------
    def local_rows(self, index: int, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of parameter ``index``'s full tensor ``full`` along its shard dim (a
        view, in the shard's shape; all of it for NO_SHARD / world size 1)."""
        param = self.layout.params[index]
        rank = self.spec.rank if self.spec.communicates and not self.spec.replicated else 0
        start, stop = param.shard_row_range(rank)
        if full.dim() == 0:  # every rank holds the scalar (layout.py)
            return full.reshape(1)
        if self.shard_dims[index]:
            return self._from_layout(index, self._to_layout(index, full.reshape(self.orig_shapes[index]))[start:stop])
        return full.reshape(param.full_shape)[start:stop]

    def shard_from(self, full_params: list[nn.Parameter]) -> list[nn.Parameter]:
        """Copy this rank's rows of ``full_params`` into a new local flat buffer and return the
        shards: the same ``nn.Parameter`` objects, whose data becomes a view into the buffer
        (padding stays zero). Keeping the objects means an optimizer built before
        ``fully_shard`` (and not stepped yet) steps the shards; a gradient already on a full
        parameter is dropped."""
        first = full_params[0]
        self.allocate_flat(first.dtype, first.device)
        for index, full in enumerate(full_params):
            self.install_shard(index, full)
        return list(full_params)

    def allocate_flat(self, dtype: torch.dtype, device: torch.device) -> None:
        """A zero local flat buffer (padding included) that ``install_shard`` fills."""
        self.local_flat = torch.zeros(self.layout.local_numel, dtype=dtype, device=device)

    def install_shard(self, index: int, full: nn.Parameter) -> None:
        """Copy this rank's rows of ``full`` into slot ``index`` of the local flat buffer and
        make ``full`` (the same object) a view of that slot: from here on it is the shard."""
        spec = self.tp_specs[index]
        full.grad = None
        if spec is not None:  # its own storage (tensor_parallel.install_local); its slot stays zero
            install_local(full, self.local_rows(index, torch_private.local_tensor(full).detach()).clone(), spec)
            return
        rows = self._to_layout(index, self.local_rows(index, full.detach()))
        view = self._slot(index, rows.shape)
        view.copy_(rows)
        full.data = self._from_layout(index, view)

    def _slot(self, index: int, shape: torch.Size) -> torch.Tensor:
        """The view of parameter ``index``'s shard (of ``shape``) in the local flat buffer."""
        return self.local_flat.narrow(0, self.layout.params[index].offset, math.prod(shape)).view(shape)

    def rebuild_flat(self) -> bool:
        """After ``model.to(dtype/device)`` (``nn.Module._apply``) replaced the shards' data:
        make them views of one new flat buffer again. Returns False when nothing changed (the
        caller then updates the unit's runtime state: ``UnitRuntime.after_rebuild``)."""
        shards = self.shards()
        flat = self.local_flat
        if all(s.device == flat.device and s.dtype == flat.dtype and _views_into(s, flat) for s in shards):
            return False
        kinds = {(s.dtype, s.device) for s in shards}
        if len(kinds) > 1:
            raise RuntimeError(
                f"fsdp_compile: after .to()/.half()/.cuda() the parameters of unit "
                f"{self.name or '<root>'!r} have different dtypes/devices {sorted(map(str, kinds))}; "
                "convert the whole sharded model (its root), not part of a unit"
            )
        dtype, device = kinds.pop()
        self.allocate_flat(dtype, device)
        with torch.no_grad():
            for index, shard in enumerate(shards):
                grad = shard.grad
                rows = self._to_layout(index, shard.detach())
                view = self._slot(index, rows.shape)
                view.copy_(rows)
                shard.data = self._from_layout(index, view)
                shard.grad = grad
        return True


def _as_full(gathered: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A gathered parameter in its original shape (a 0-d one is any of its identical slots)."""
    if len(shape) == 0:
        return gathered.reshape(-1)[0]
    return gathered.view(shape) if gathered.shape != shape else gathered


def _views_into(tensor: torch.Tensor, flat: torch.Tensor) -> bool:
    return tensor.numel() == 0 or tensor.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()


def _with_param_dtype(spec: collectives.CommSpec, dtype: torch.dtype) -> collectives.CommSpec:
    return dataclasses.replace(spec, param_dtype=dtype)
