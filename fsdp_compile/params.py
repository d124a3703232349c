"""The original-parameter accessor: how ``module.weight`` becomes "the shard outside forward, the
full tensor inside it" while ``module._parameters['weight']`` stays the shard.

Each module of a sharded tree gets its class swapped for a cached subclass that adds
- a property per sharded attribute name, returning ``FSDPState.read`` (``runtime.py``): the full
  tensor inside a forward, a recompute or ``summon_full_params``, the shard otherwise;
- ``named_parameters`` that, in those same two situations, yields full tensors under the
  original names (module code that iterates its own parameters sees full shapes).

Why not ``nn.utils.parametrize``: it moves the tensor to ``module.parametrizations.weight.original``,
which changes ``state_dict`` / ``named_parameters`` names; we want the original FQNs untouched.
State dicts read ``_parameters``, so they see shards; ``_save_to_state_dict`` /
``_load_from_state_dict`` present each as a ``DTensor`` of the full shape (``state_dict.py``).
"""
from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn as nn

from . import state_dict as _state_dict
from .runtime import in_recompute, skip_as_frame
from .tensor_parallel import is_dtensor

if TYPE_CHECKING:
    from .unit import Unit

# (class, sharded attribute names) -> its swapped subclass, shared by every module of that kind (so
# Dynamo sees one class for identical blocks); weak: a class goes with its last sharded module.
_SWAPPED: "weakref.WeakValueDictionary[tuple[type, frozenset[str]], type]" = weakref.WeakValueDictionary()
_ACCESSORS = "_fsdp_accessors"
_TREE_STATE = "_fsdp_tree_state"


def _make_property(name: str) -> property:
    @skip_as_frame
    def fget(self):
        param = self._parameters[name]
        entry = self.__dict__[_ACCESSORS].get(name)
        if entry is None:
            return param
        unit, index, runtime = entry
        return self.__dict__[_TREE_STATE].read(runtime, index, param)

    def fset(self, value):
        nn.Module.__setattr__(self, name, value)

    def fdel(self):
        nn.Module.__delattr__(self, name)

    return property(fget, fset, fdel, doc=f"sharded parameter {name!r} (see fsdp_compile.params)")


def _named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
    plain = nn.Module.named_parameters(self, prefix, recurse, remove_duplicate)
    state = self.__dict__[_TREE_STATE]
    if not (state.in_forward or state.summoned is not None or in_recompute()):
        yield from plain
        return
    if recurse:
        modules = dict(self.named_modules(prefix=prefix, remove_duplicate=remove_duplicate))
    else:
        modules = {prefix: self}
    for fqn, _ in plain:
        owner_fqn, _, attr = fqn.rpartition(".")
        yield fqn, getattr(modules[owner_fqn], attr)


def _apply(self, fn, recurse: bool = True):
    """``nn.Module._apply`` (``.to``, ``.half``, ``.double``, ``.cuda``, ...) on a sharded tree:
    the conversion runs as usual, then every unit's shards become views of one flat buffer of
    the new dtype/device again (the outermost call does this once for the whole tree)."""
    state = self.__dict__[_TREE_STATE]
    base = type(self)._fsdp_base_class
    if state.applying:
        return base._apply(self, fn, recurse)
    state.applying = True
    try:
        base._apply(self, fn, recurse)
    finally:
        state.applying = False
    for unit in state.units:
        if unit.rebuild_flat():
            state.runtime[unit.id].after_rebuild(unit.local_flat.device)
            state.flat_positions = None
    state.assign_templates()
    return self


def _save_to_state_dict(self, destination, prefix, keep_vars):
    type(self)._fsdp_base_class._save_to_state_dict(self, destination, prefix, keep_vars)
    _state_dict.save_sharded(self, self.__dict__[_TREE_STATE], list(iter_accessors(self)), destination, prefix, keep_vars)


def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    taken = _state_dict.take_sharded(list(iter_accessors(self)), state_dict, prefix)
    type(self)._fsdp_base_class._load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    )
    _state_dict.load_sharded(self, self.__dict__[_TREE_STATE], taken, prefix, missing_keys, error_msgs)


def _register_parameter(self, name: str, param) -> None:
    """``nn.Module.register_parameter`` (and ``module.<name> = nn.Parameter(...)``): a DTensor
    replacing a sharded plain parameter means a tensor-parallel plan applied after
    ``fully_shard`` (it would split the shard, not the parameter)."""
    entry = self.__dict__[_ACCESSORS].get(name)
    if entry is not None and is_dtensor(param):
        unit, index, _ = entry
        if unit.tp_specs[index] is None:
            raise RuntimeError(
                f"fsdp_compile: parameter {unit.layout.params[index].fqn!r} is being replaced by a "
                "DTensor after fully_shard (a tensor-parallel plan applied to a sharded model "
                "would split this rank's shard). Apply parallelize_module(model, mesh['tp'], plan) "
                "before fully_shard(model, device_mesh=mesh['dp'])"
            )
    type(self)._fsdp_base_class.register_parameter(self, name, param)


def _to_empty(self, *, device, recurse: bool = True):
    state = self.__dict__[_TREE_STATE]
    if state.materializing is not None:  # inside fully_shard's meta init, FSDP1's param_init_fn
        want, got = state.materializing, torch.device(device)
        if got.type != want.type or (got.index is not None and want.index is not None and got.index != want.index):
            raise ValueError(
                f"fsdp_compile: param_init_fn called {type(self)._fsdp_base_class.__name__}"
                f".to_empty(device={got}), but fully_shard materializes this model on {want}; "
                f"pass device={want} (or drop the to_empty call: fully_shard does it)"
            )
        return self  # its own tensors are already empty on that device; children come later
    raise RuntimeError(
        f"fsdp_compile: {type(self)._fsdp_base_class.__name__}.to_empty() after fully_shard would "
        "replace this rank's shards by uninitialized memory. Build the model on the meta device "
        "and call fully_shard(model, ..., param_init_fn=fn) (or give its modules "
        "reset_parameters()): fully_shard materializes and shards it one module at a time"
    )


def _swapped_class(base: type, names: frozenset[str]) -> type:
    key = (base, names)
    swapped = _SWAPPED.get(key)
    if swapped is None:
        attrs = {name: _make_property(name) for name in sorted(names)}
        attrs["named_parameters"] = _named_parameters
        attrs["_apply"] = _apply
        attrs["to_empty"] = _to_empty
        attrs["register_parameter"] = _register_parameter
        attrs["_save_to_state_dict"] = _save_to_state_dict
        attrs["_load_from_state_dict"] = _load_from_state_dict
        attrs["_fsdp_base_class"] = base
        attrs["__module__"] = base.__module__
        swapped = _SWAPPED[key] = type(f"Sharded{base.__name__}", (base,), attrs)
    return swapped


def _swap(module: nn.Module) -> None:
    base = getattr(type(module), "_fsdp_base_class", type(module))
    module.__class__ = _swapped_class(base, frozenset(module.__dict__[_ACCESSORS]))


def attach_module(module: nn.Module, state) -> None:
    """Mark ``module`` as part of the sharded tree of ``state`` (no sharded attributes yet)."""
    module.__dict__[_TREE_STATE] = state
    module.__dict__.setdefault(_ACCESSORS, {})
    _swap(module)


def install_accessor(module: nn.Module, attr: str, unit: "Unit", index: int) -> None:
    """Make ``module.<attr>`` the sharded parameter ``index`` of ``unit`` (whose runtime record the
    module's tree state already holds: ``FSDPState.add_unit``)."""
    module.__dict__[_ACCESSORS][attr] = (unit, index, module.__dict__[_TREE_STATE].runtime[unit.id])
    _swap(module)


def rebind_accessors(module: nn.Module) -> None:
    """Point every sharded attribute of ``module`` at the runtime record its tree state now holds
    for the attribute's unit (after an outer ``fully_shard`` adopted the unit: ``nested.adopt``)."""
    accessors = module.__dict__.get(_ACCESSORS, {})
    state = module.__dict__[_TREE_STATE]
    for attr, (unit, index, _) in list(accessors.items()):
        accessors[attr] = (unit, index, state.runtime[unit.id])


def is_sharded(module: nn.Module) -> bool:
    return _TREE_STATE in module.__dict__


def tree_state(module: nn.Module):
    return module.__dict__.get(_TREE_STATE)


def iter_accessors(module: nn.Module) -> Iterator[tuple[str, "Unit", int]]:
    for attr, (unit, index, _) in module.__dict__.get(_ACCESSORS, {}).items():
        yield attr, unit, index
