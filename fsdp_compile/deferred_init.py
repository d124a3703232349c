"""Deferred (meta-device) initialization: materialize a model built under ``torch.device("meta")``
and shard it, one module at a time.

``fully_shard`` builds every unit's layout from the meta shapes and a zero local flat buffer.
Then, for each module in ``root.modules()`` order that holds meta parameters or buffers:

1. its meta parameters become full-size tensors on the compute device (new ``nn.Parameter``
   objects registered under every name that held the meta one; the meta object's attributes are
   kept), its meta buffers too;
2. ``param_init_fn(module)`` runs, else ``module.reset_parameters()`` (FSDP1's rule). FSDP1's
   form ``module.to_empty(device=..., recurse=False); module.reset_parameters()`` works: while
   this runs, a sharded module's ``to_empty`` onto the compute device is a no-op (its own
   tensors are already empty there; ``params.py``);
3. every parameter whose last holder (in that order) is this module is sharded: its rows go
   into the unit's flat buffer and the parameter becomes the view of its shard. Just before,
   its full value is broadcast from rank 0 (``sync_module_states``) or checksummed for the
   ranks' comparison at the end of ``fully_shard`` (``consistency.StartingValues``).

So at most one module's full parameters exist at a time (a parameter held by several modules,
e.g. tied embeddings, lives until its last holder is initialized, and keeps the value its first
holder's init gave it, as tying after construction does; later holders' inits still run, so
the random draws stay in construction order). With the same seed on every
rank, the random draws happen in the same order as when the model is built on the CPU by
modules whose ``__init__`` calls ``reset_parameters()``, so the shards equal that model's rows.

Invariant: nothing stays uninitialized without an error. A parameter or buffer that no init
wrote (its version counter did not move and its data was not replaced) raises, naming it and
saying which initializer ran.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn
from torch.multiprocessing.reductions import StorageWeakRef


class _Pending(NamedTuple):
    """A materialized parameter waiting to be sharded (by its last holder)."""

    full: nn.Parameter
    version: int  # its version counter right after materializing
    storage: StorageWeakRef  # and its data's storage (a fake tensor has no address to compare)
    offset: int  # and where in it the data starts
    fqn: str
    meta_id: int  # id of the meta parameter it replaced
    init: str  # what initializes its first holder, for errors (_init_name)

    def written(self) -> bool:
        """Whether an init wrote it: in place (its version counter moved) or by assigning new
        data (``param.data = ...``)."""
        if self.full._version != self.version or self.full.storage_offset() != self.offset:
            return True
        return self.storage.expired() or StorageWeakRef(self.full.untyped_storage()) != self.storage


def _is_meta(t: Optional[torch.Tensor]) -> bool:
    return t is not None and t.device.type == "meta"


def materialize_and_shard(
    root: nn.Module, state, device: torch.device, param_init_fn: Optional[Callable[[nn.Module], None]],
    starting=None,
) -> None:
    modules = list(dict.fromkeys(root.modules()))  # dedupe shared modules, keep first position
    names = {id(m): name for name, m in root.named_modules(remove_duplicate=False)}
    where = {}  # id(param) -> (unit, index), for the sharded parameters
    for unit in state.units:
        for index, holders in enumerate(unit.holders):
            for owner, attr in holders:
                where[id(owner._parameters[attr])] = (unit, index)
    last_holder = {}
    for position, sub in enumerate(modules):
        for param in sub._parameters.values():
            if param is not None:
                last_holder[id(param)] = position

    state.materializing = device  # a module's to_empty() in param_init_fn is accepted (params.py)
    try:
        _materialize_all(modules, names, where, last_holder, device, param_init_fn, starting)
    finally:
        state.materializing = None


def _materialize_all(modules, names, where, last_holder, device, param_init_fn, starting) -> None:
    replaced: dict[int, nn.Parameter] = {}  # id(meta param) -> its materialized parameter
    pending: dict[int, _Pending] = {}  # id(materialized param) -> it
    for position, sub in enumerate(modules):
        prefix = names[id(sub)]
        init = _init_name(param_init_fn, sub)
        fresh = _materialize_module(sub, device, replaced, pending, where, prefix, init)
        if not fresh:
            continue
        buffers = {
            n: (b, b._version) for n, b in sub._buffers.items() if b is not None and id(b) in fresh
        }
        own = {attr: p for attr, p in sub._parameters.items() if p is not None and id(p) in fresh}
        # A shared parameter keeps its first holder's init (as tying after construction does);
        # later holders' inits still run, so the random draws stay in construction order.
        kept = {attr: p.detach().clone() for attr, p in own.items() if pending[id(p)].written()}
        with torch.no_grad():
            if param_init_fn is not None:
                param_init_fn(sub)
            elif hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
            for attr, param in own.items():  # an init that assigned a new Parameter: take its values
                now = sub._parameters.get(attr)
                if now is not None and now is not param:
                    param.copy_(now.detach().to(param.device, param.dtype))
                    sub._parameters[attr] = param
            for attr, value in kept.items():
                own[attr].copy_(value)
        for name, (buf, version) in buffers.items():
            if sub._buffers.get(name) is buf and buf._version == version:
                raise RuntimeError(
                    f"fully_shard: buffer {_fqn(prefix, name)!r} was on the meta device and no "
                    f"initializer wrote it ({init}); compute it in param_init_fn (e.g. HF models: "
                    "param_init_fn=model._init_weights)"
                )
        _shard_finished(position, sub, last_holder, pending, where, starting)
    leftover = [entry.fqn for entry in pending.values()]
    if leftover:  # only possible for parameters whose holders vanished during init
        raise RuntimeError(f"fully_shard: parameters {leftover} were materialized but never sharded")


def _materialize_module(sub, device, replaced, pending, where, prefix, init) -> set[int]:
    """Replace ``sub``'s own meta parameters and buffers by empty full-size tensors on
    ``device``; returns the ids of the new tensors (empty if ``sub`` had nothing on meta)."""
    fresh = set()
    for attr, param in list(sub._parameters.items()):
        if param is None:
            continue
        if id(param) in pending:  # shared, materialized (and initialized) by an earlier holder
            fresh.add(id(param))
            continue
        if not _is_meta(param):
            continue
        if id(param) not in where:
            raise RuntimeError(
                f"fully_shard: parameter {_fqn(prefix, attr)!r} is on the meta device but is not "
                "sharded (ignored_params); materialize it before fully_shard"
            )
        full = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device=device), requires_grad=param.requires_grad)
        full.__dict__.update(param.__dict__)
        replaced[id(param)] = full
        where[id(full)] = where[id(param)]
        unit, index = where[id(param)]
        for owner, owner_attr in unit.holders[index]:
            owner._parameters[owner_attr] = full
        storage = StorageWeakRef(full.untyped_storage())
        pending[id(full)] = _Pending(
            full, full._version, storage, full.storage_offset(), _fqn(prefix, attr), id(param), init
        )
        fresh.add(id(full))
    for name, buf in list(sub._buffers.items()):
        if _is_meta(buf):
            new = torch.empty(buf.shape, dtype=buf.dtype, device=device)
            sub._buffers[name] = new
            fresh.add(id(new))
    return fresh


def _shard_finished(position, sub, last_holder, pending, where, starting=None) -> None:
    """Shard every materialized parameter of ``sub`` whose last holder is ``sub`` (at ``position``)."""
    for attr, param in list(sub._parameters.items()):
        if param is None or id(param) not in pending:
            continue
        entry = pending[id(param)]
        full, fqn = entry.full, entry.fqn
        if last_holder.get(entry.meta_id, -1) > position:
            continue  # another module holds it too and comes later
        del pending[id(param)]
        if not entry.written():
            raise RuntimeError(
                f"fully_shard: parameter {fqn!r} was on the meta device and no initializer wrote "
                f"it ({entry.init}); pass fully_shard(..., param_init_fn=fn) where fn(module) writes the "
                "module's own parameters (fully_shard has already materialized them, empty, on the "
                "compute device; module.to_empty(device=..., recurse=False) in fn is accepted)"
            )
        if starting is not None:  # broadcast from rank 0, or checksummed (consistency.StartingValues)
            starting.show("parameter", fqn, full)
        unit, index = where[id(full)]
        with torch.no_grad():
            unit.install_shard(index, full)


def _init_name(param_init_fn, sub: nn.Module) -> str:
    """What initializes ``sub``, for error messages: what ran, and that it left a tensor alone."""
    cls = type(sub)._fsdp_base_class.__name__ if hasattr(type(sub), "_fsdp_base_class") else type(sub).__name__
    if param_init_fn is not None:
        name = getattr(param_init_fn, "__name__", repr(param_init_fn))
        return f"param_init_fn {name!r} ran on this {cls} and left it alone"
    if hasattr(sub, "reset_parameters"):
        return f"{cls}.reset_parameters() ran and left it alone"
    return f"{cls} has no reset_parameters() and no param_init_fn was given"


def _fqn(prefix: str, attr: str) -> str:
    return f"{prefix}.{attr}" if prefix else attr
