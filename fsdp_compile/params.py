"""The original-parameter accessor: how ``module.weight`` becomes "the shard outside forward, the
full tensor inside it" while ``module._parameters['weight']`` stays the shard.

Each module of a sharded tree gets its class swapped for a cached subclass that adds
- a property per sharded attribute name, returning ``unit.full_param(index)`` while the root is
  in its forward (under ``torch.compile`` that is the ``param_use`` marker), the summoned full
  tensor inside ``summon_full_params``, and the shard otherwise;
- ``named_parameters`` that, in those same two situations, yields full tensors under the
  original names (module code that iterates its own parameters sees full shapes).

Why not ``nn.utils.parametrize``: it moves the tensor to ``module.parametrizations.weight.original``,
which changes ``state_dict`` / ``named_parameters`` names; we want the original FQNs untouched.
State dicts read ``_parameters`` directly, so they always see shards.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import torch.nn as nn

if TYPE_CHECKING:
    from .unit import Unit

_SWAPPED: dict[tuple[type, frozenset[str]], type] = {}
_ACCESSORS = "_fsdp_accessors"
_TREE_STATE = "_fsdp_tree_state"


def _make_property(name: str) -> property:
    def fget(self):
        param = self._parameters[name]
        entry = self.__dict__[_ACCESSORS].get(name)
        if entry is None:
            return param
        unit, index = entry
        state = unit.state
        if state.summoned is not None:
            return state.summoned[unit.id][index]
        if not state.in_forward:
            return param
        return unit.full_param(index)

    def fset(self, value):
        nn.Module.__setattr__(self, name, value)

    def fdel(self):
        nn.Module.__delattr__(self, name)

    return property(fget, fset, fdel, doc=f"sharded parameter {name!r} (see fsdp_compile.params)")


def _named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
    plain = nn.Module.named_parameters(self, prefix, recurse, remove_duplicate)
    state = self.__dict__[_TREE_STATE]
    if not (state.in_forward or state.summoned is not None):
        yield from plain
        return
    if recurse:
        modules = dict(self.named_modules(prefix=prefix, remove_duplicate=remove_duplicate))
    else:
        modules = {prefix: self}
    for fqn, _ in plain:
        owner_fqn, _, attr = fqn.rpartition(".")
        yield fqn, getattr(modules[owner_fqn], attr)


def _swapped_class(base: type, names: frozenset[str]) -> type:
    key = (base, names)
    if key not in _SWAPPED:
        attrs = {name: _make_property(name) for name in sorted(names)}
        attrs["named_parameters"] = _named_parameters
        attrs["_fsdp_base_class"] = base
        attrs["__module__"] = base.__module__
        _SWAPPED[key] = type(f"Sharded{base.__name__}", (base,), attrs)
    return _SWAPPED[key]


def _swap(module: nn.Module) -> None:
    base = getattr(type(module), "_fsdp_base_class", type(module))
    module.__class__ = _swapped_class(base, frozenset(module.__dict__[_ACCESSORS]))


def attach_module(module: nn.Module, state) -> None:
    """Mark ``module`` as part of the sharded tree of ``state`` (no sharded attributes yet)."""
    module.__dict__[_TREE_STATE] = state
    module.__dict__.setdefault(_ACCESSORS, {})
    _swap(module)


def install_accessor(module: nn.Module, attr: str, unit: "Unit", index: int) -> None:
    """Make ``module.<attr>`` the sharded parameter ``index`` of ``unit``."""
    module.__dict__[_ACCESSORS][attr] = (unit, index)
    _swap(module)


def is_sharded(module: nn.Module) -> bool:
    return _TREE_STATE in module.__dict__


def tree_state(module: nn.Module):
    return module.__dict__.get(_TREE_STATE)


def iter_accessors(module: nn.Module) -> Iterator[tuple[str, "Unit", int]]:
    for attr, (unit, index) in module.__dict__.get(_ACCESSORS, {}).items():
        yield attr, unit, index
