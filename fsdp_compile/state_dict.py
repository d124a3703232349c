"""Sharded state dicts: what ``model.state_dict()`` and ``optimizer.state_dict()`` hold for a
sharded parameter, and how ``load_state_dict`` takes it back.

Invariant: a state dict never holds a local shard under a full name as if it were the whole
tensor. Each sharded parameter (and each optimizer state tensor shaped like its shard, e.g.
AdamW's ``exp_avg``) appears as a ``DTensor`` with ``Shard(0)`` placement on a 1-D
``DeviceMesh`` over the unit's process group (hybrid sharding: ``(Replicate(), Shard(0))`` on the
2-D ``("replicate", "shard")`` mesh); its local tensor is this rank's shard itself (no
copy) and its global shape the original one. Our row split (``ceil(D / world)`` rows per rank,
trailing ranks short or empty) is ``torch.chunk``'s, which is DTensor's, so uneven and empty
shards are described exactly. Hence ``torch.distributed.checkpoint`` saves, loads (into the
shards, in place) and reshards them like FSDP2's, and ``torch.distributed.checkpoint.state_dict``
(``get_state_dict``/``set_state_dict``, full or sharded) works unchanged.

Exceptions, still exact: NO_SHARD units, world size 1 and 0-d parameters are held whole by
every rank (layout.py), so they appear as plain tensors, the same on every rank, as DDP's. No
state dict call communicates (torch's helpers call them on some ranks only).

Loading accepts, per sharded parameter: such a DTensor (any mesh size: a different layout is
gathered first), a plain tensor of the full shape (this rank's rows are taken), or the shard
itself (nothing changes: what torch's full-state-dict helpers put under the keys a partial load
leaves out). Anything else -- in particular another tensor of the shard's shape where that
differs from the full shape -- is a size-mismatch error naming the key.

Optimizers: we do not construct them, so a global optimizer step pre-hook (the first ``step``,
which ``get/set_optimizer_state_dict`` also run) gives every optimizer that holds our shards a
``state_dict`` post-hook (shard-shaped state -> DTensor) and a ``load_state_dict`` pre-hook (the
reverse), and converts any DTensor state already loaded. The global hook is registered while
some sharded model is alive (``OptimizerHooks``, held by every ``FSDPState``) and removed with
the last one.
"""
from __future__ import annotations

import math
import weakref
from typing import Optional

import torch

from . import torch_private
from .mesh import mesh_for_state_dicts
from .tensor_parallel import local_of


# ---- one value --------------------------------------------------------------------------------
def _is_sharded(unit) -> bool:
    return unit.spec.communicates and not unit.spec.replicated


def _mesh(state, unit, device: torch.device, index: int):
    """(DeviceMesh, placements) of the DTensors of parameter ``index`` of ``unit`` (of
    ``FSDPState`` ``state``) on ``device`` (mesh.py): ``Shard(d)`` on the shard dim for a
    parameter sharded on dim ``d``."""
    from torch.distributed.tensor import Shard

    groups = unit.groups or state.groups  # a unit adopted from an inner fully_shard: its own
    meshes = state.device_meshes
    key = (device.type, id(groups))
    if key not in meshes:
        meshes[key] = mesh_for_state_dicts(groups, device)
    mesh, placements = meshes[key]
    dim = unit.shard_dims[index]
    return (mesh, placements[:-1] + (Shard(dim),)) if dim else (mesh, placements)


def to_state_value(state, unit, index: int, local: torch.Tensor) -> torch.Tensor:
    """This rank's ``local`` tensor (shard-shaped) of parameter ``index`` of ``unit`` (of
    ``FSDPState`` ``state``) -> what a state dict holds for it (see the module docstring)."""
    from torch.distributed.tensor import DTensor

    tp = unit.tp_specs[index]
    if tp is not None:  # a TP parameter: on the combined (dp..., tp) mesh, its global shape
        if isinstance(local, DTensor) and local.requires_grad:
            return local  # keep_vars=True: the parameter itself
        local = local_of(local)
        full_shape, stride = tp.shape, tp.stride
        mesh, placements = tp.sharded_mesh, tp.sharded_placements
    else:
        full_shape = torch.Size(unit.orig_shapes[index])
        if not _is_sharded(unit) or len(full_shape) == 0:  # held whole (a 0-d one as (1,): layout.py)
            return local if local.shape == full_shape else local.view(full_shape)
        stride = tuple(math.prod(full_shape[i + 1:]) for i in range(len(full_shape)))
        mesh, placements = _mesh(state, unit, local.device, index)
    if local.requires_grad:  # keep_vars=True: differentiable, built as usual
        return DTensor.from_local(local, mesh, placements, run_check=False, shape=full_shape, stride=stride)
    # A DTensor's wrapper copies its local tensor's storage offset, and DCP's async staging
    # (StateDictStager) takes a wrapper with a nonzero data_ptr for a plain tensor, failing
    # ("invalid python storage"). Our shards are views at offsets into the flat buffer: build
    # the wrapper from an offset-0 view of the same storage, then hold the shard itself.
    dtensor = DTensor.from_local(
        local.as_strided(local.shape, local.stride(), 0), mesh, placements, run_check=False,
        shape=full_shape, stride=stride,
    )
    torch_private.set_local_tensor(dtensor, local)
    return dtensor


def from_state_value(state, unit, index: int, value, key: str) -> torch.Tensor:
    """A state-dict value for parameter ``index`` of ``unit`` (of ``FSDPState`` ``state``) -> this rank's rows of it, in the
    shard's shape. Raises ``ValueError`` (naming ``key``) when it cannot be the parameter."""
    from torch.distributed.tensor import DTensor

    tp = unit.tp_specs[index]
    if tp is not None:
        return _tp_rows(unit, index, tp, value, key)
    full_shape = tuple(unit.orig_shapes[index])
    shard_shape = tuple(unit.shard_shapes()[index])
    if isinstance(value, DTensor):
        if tuple(value.shape) != full_shape:
            raise ValueError(_mismatch(key, value.shape, full_shape, "global shape"))
        if _is_sharded(unit) and tuple(value.to_local().shape) == shard_shape:
            mesh, placements = _mesh(state, unit, value.device, index)
            if value.placements == placements and value.device_mesh == mesh:
                return value.to_local()
        value = value.full_tensor()
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{key}: expected a tensor, got {type(value).__name__}")
    if tuple(value.shape) != full_shape:
        hint = ""
        if tuple(value.shape) == shard_shape:
            hint = (" (it has this rank's shard shape: a local shard saved as if it were the whole "
                    "tensor; save sharded state dicts as DTensors, e.g. with model.state_dict())")
        raise ValueError(_mismatch(key, value.shape, full_shape, "shape") + hint)
    return unit.local_rows(index, value).reshape(shard_shape)


def _tp_rows(unit, index: int, tp, value, key: str) -> torch.Tensor:
    """``from_state_value`` for a tensor-parallel parameter: the global value (a DTensor on any
    mesh, or a plain tensor of the global shape) -> this rank's dp rows of its TP-local part."""
    from torch.distributed.tensor import DTensor

    shard_shape = tuple(unit.shard_shapes()[index])
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{key}: expected a tensor, got {type(value).__name__}")
    if tuple(value.shape) != tuple(tp.shape):
        raise ValueError(_mismatch(key, value.shape, tp.shape, "global shape"))
    if isinstance(value, DTensor):
        if (value.device_mesh == tp.sharded_mesh and tuple(value.placements) == tp.sharded_placements
                and tuple(value.to_local().shape) == shard_shape):
            return value.to_local()
        value = value.full_tensor()
    return unit.local_rows(index, tp.tp_local_of_full(value)).reshape(shard_shape)


def _mismatch(key, got, want, what) -> str:
    return (f"size mismatch for {key}: copying a param with {what} {tuple(got)} from checkpoint, "
            f"the shape in current model is {tuple(want)} (sharded by fsdp_compile)")


# ---- modules (called by the accessor classes of params.py) -----------------------------------
def save_sharded(module, state, accessors, destination, prefix: str, keep_vars: bool) -> None:
    for attr, unit, index in accessors:
        key = prefix + attr
        if key in destination:
            param = module._parameters[attr]
            destination[key] = to_state_value(state, unit, index, param if keep_vars else param.detach())


def take_sharded(accessors, state_dict, prefix: str) -> dict:
    """Remove our keys from ``state_dict`` before ``nn.Module`` compares shapes (it would compare
    full shapes with shards); returns them for ``load_sharded``."""
    return {attr: (unit, index, state_dict.pop(prefix + attr))
            for attr, unit, index in accessors if prefix + attr in state_dict}


def load_sharded(module, state, taken: dict, prefix: str, missing_keys: list, error_msgs: list) -> None:
    for attr, (unit, index, value) in taken.items():
        key = prefix + attr
        if key in missing_keys:
            missing_keys.remove(key)
        if _is_the_shard(value, module._parameters[attr]):
            continue
        try:
            rows = from_state_value(state, unit, index, value, key)
        except ValueError as e:
            error_msgs.append(str(e))
            continue
        param = local_of(module._parameters[attr])
        if param.numel() and rows.data_ptr() != param.data_ptr():
            with torch.no_grad():
                param.copy_(rows)


def _is_the_shard(value, param) -> bool:
    """``value`` is the parameter's shard itself (or a view of exactly its memory): loading it
    changes nothing. ``torch.distributed.checkpoint.state_dict``'s full-state-dict load fills the
    keys a partial state dict leaves out (``strict=False``) with ``named_parameters()``'s values,
    our shards, so those parameters stay untouched; any other shard-shaped tensor is still an
    error (a local shard saved under a full name)."""
    if value is param:
        return True
    return (
        type(value) in (torch.Tensor, torch.nn.Parameter) and param.numel() > 0
        and value.device == param.device and value.dtype == param.dtype
        and value.shape == param.shape and value.stride() == param.stride()
        and value.data_ptr() == param.data_ptr()
    )


# ---- optimizers --------------------------------------------------------------------------------
class OptimizerHooks:
    """The process-wide optimizer step pre-hook, alive exactly while some sharded model is.

    Every ``FSDPState`` holds this one object (``install_optimizer_hooks``); this module keeps
    only a weak reference, so when the last sharded model is freed the object goes and takes
    torch's global hook with it (``weakref.finalize``). What it remembers of optimizers is
    weak too: ``hooked`` (those holding our shards, given state-dict hooks) and ``examined``
    (the others, with what had changed when they were last looked at)."""

    def __init__(self):
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        self.states: "weakref.WeakSet" = weakref.WeakSet()  # the live FSDPStates
        self.shardings = 0  # fully_shard calls while this object lives
        self.hooked: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()
        self.examined: "weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple]" = weakref.WeakKeyDictionary()
        handle = register_optimizer_step_pre_hook(_on_step)
        weakref.finalize(self, handle.remove)

    def shard_positions(self) -> dict[int, tuple]:
        """id(shard parameter) -> (state, unit, index), over every unit of every live model."""
        return {
            id(shard): (state, unit, index)
            for state in list(self.states)
            for unit in state.units
            for index, shard in enumerate(unit.shards())
        }


_hooks: "Optional[weakref.ReferenceType[OptimizerHooks]]" = None  # weak: FSDPStates own it


def _live_hooks() -> Optional[OptimizerHooks]:
    return None if _hooks is None else _hooks()


def install_optimizer_hooks(state) -> OptimizerHooks:
    """Called by every fully_shard: the global step pre-hook that hooks optimizers holding our
    shards, made when no sharded model has it alive. ``state`` keeps it alive (the caller
    stores the result on it)."""
    global _hooks
    hooks = _live_hooks()
    if hooks is None:
        hooks = OptimizerHooks()
        _hooks = weakref.ref(hooks)
    hooks.shardings += 1
    hooks.states.add(state)
    return hooks


def _shard_positions() -> dict[int, tuple]:
    hooks = _live_hooks()
    return {} if hooks is None else hooks.shard_positions()


def _indexed_params(optimizer) -> list:
    seen, params = set(), []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def _on_step(optimizer, args, kwargs) -> None:
    hooks = _live_hooks()
    if hooks is None or optimizer in hooks.hooked:
        return
    # An optimizer holding none of our shards is looked at again only when something changed
    # (a fully_shard since, or a new parameter group): two integer comparisons per step.
    seen = (hooks.shardings, len(optimizer.param_groups))
    if hooks.examined.get(optimizer) == seen:
        return
    hooks.examined[optimizer] = seen
    positions = hooks.shard_positions()
    if not any(id(p) in positions for p in _indexed_params(optimizer)):
        return
    hooks.hooked.add(optimizer)
    optimizer.register_state_dict_post_hook(_optimizer_state_dict_post)
    optimizer.register_load_state_dict_pre_hook(_optimizer_load_pre)
    for p, state in list(optimizer.state.items()):  # DTensors loaded before this first step
        if id(p) in positions:
            optimizer.state[p] = _local_state(positions[id(p)], state, "optimizer state")


def _is_shard_state(value, param) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == param.shape


def _optimizer_state_dict_post(optimizer, state_dict):
    positions = _shard_positions()
    params = _indexed_params(optimizer)
    state = dict(state_dict["state"])  # the per-parameter dicts are the optimizer's own: copy
    for i, per_param in state.items():
        param = params[i]
        if id(param) not in positions:
            continue
        owner, unit, index = positions[id(param)]
        state[i] = {
            k: to_state_value(owner, unit, index, v) if _is_shard_state(v, param) else v
            for k, v in per_param.items()
        }
    return {**state_dict, "state": state}


def _local_state(position, per_param: dict, where: str, current: Optional[dict] = None) -> dict:
    """A loaded per-parameter optimizer state -> this rank's. A value is per-element state (to
    be cut to this rank's rows) if it is a DTensor, or a plain tensor of the parameter's full
    shape where that differs from the shard's -- except a 0-d value whose current counterpart
    is 0-d too (Adam's ``step``; without a current state, the key ``step``)."""
    from torch.distributed.tensor import DTensor

    owner, unit, index = position
    tp = unit.tp_specs[index]
    full_shape = tuple(unit.orig_shapes[index] if tp is None else tp.shape)
    shard_shape = tuple(unit.shard_shapes()[index])
    out = {}
    for k, v in per_param.items():
        per_element = isinstance(v, DTensor) or (
            isinstance(v, torch.Tensor) and tuple(v.shape) == full_shape and full_shape != shard_shape
        )
        if per_element and not full_shape and not isinstance(v, DTensor):
            now = (current or {}).get(k)
            per_element = now.dim() > 0 if isinstance(now, torch.Tensor) else k != "step"
        if per_element:
            v = from_state_value(owner, unit, index, v, f"{where} {unit.layout.params[index].fqn}.{k}")
            if tp is not None:  # a DTensor parameter's state is a DTensor like it
                v = DTensor.from_local(
                    v, tp.sharded_mesh, tp.sharded_placements, run_check=False, shape=tp.shape, stride=tp.stride
                )
        out[k] = v
    return out


def _optimizer_load_pre(optimizer, state_dict) -> Optional[dict]:
    positions = _shard_positions()
    # As Optimizer.load_state_dict pairs them: saved ids (ints, or FQNs from
    # torch.distributed.checkpoint.state_dict) with the current groups' parameters, in order.
    saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    param_of = dict(zip(saved_ids, params))
    state = dict(state_dict["state"])
    for key, per_param in state.items():
        param = param_of.get(key)
        if param is not None and id(param) in positions:
            state[key] = _local_state(positions[id(param)], per_param, "optimizer state", optimizer.state.get(param))
    return {**state_dict, "state": state}
