"""The public API: ``fully_shard``, ``@sharded`` and the context managers around a sharded model.

``fully_shard`` decides the units, replaces every original parameter by this rank's shard (a
view into its unit's local flat buffer) under the original name, swaps classes so that reads
inside the forward return full tensors (``params``), and installs the forward hooks
(``runtime``). Everything here runs eagerly, outside any compiled region.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from . import params as _params
from . import torch_private
from .collectives import CommSpec, reduce_scatter_kind
from .consistency import StartingValues, check_same_tensors_before_broadcast, check_units_and_starting_values
from .deferred_init import materialize_and_shard
from .state_dict import install_optimizer_hooks
from .config import CPUOffload, MixedPrecision, ShardingStrategy
from .layout import make_unit_layout
from .log import get_logger
from .mesh import resolve_groups, with_tensor_parallel
from .nested import ROOT_STATE, adopt, adopted_param_ids, inner_roots
from .runtime import UNIT_OF_MODULE, FSDPState
from .tensor_parallel import is_dtensor, tp_spec_of
from .unit import Unit

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard

Policy = Union[None, Iterable[type], Callable[[nn.Module], bool]]

log = get_logger("api")


def fully_shard(
    module: nn.Module,
    *,
    process_group: Optional[dist.ProcessGroup] = None,
    device_mesh: Optional["DeviceMesh"] = None,
    policy: Policy = None,
    strategy: ShardingStrategy = ShardingStrategy.FULL_SHARD,
    mixed_precision: Optional[MixedPrecision] = None,
    cpu_offload: Optional[CPUOffload] = None,
    ignored_params: Optional[Iterable[nn.Parameter]] = None,
    param_init_fn: Optional[Callable[[nn.Module], None]] = None,
    check_ranks: bool = True,
    sync_module_states: bool = False,
    shard_placement_fn: Optional[Callable[[nn.Parameter], Optional["Shard"]]] = None,
    gradient_divide_factor: Optional[float] = None,
) -> nn.Module:
    """Shard ``module``'s parameters across ``process_group`` in place and return ``module``.

    ``device_mesh``: instead of ``process_group``, a 1-D ``DeviceMesh`` (the same as its group)
    or a 2-D one with dims named ``("replicate", "shard")`` for hybrid sharding: parameters are
    sharded over "shard" and replicated over "replicate" (``mesh.py``); on it FULL_SHARD means
    HYBRID_SHARD and SHARD_GRAD_OP means HYBRID_SHARD_ZERO2. ``strategy=HYBRID_SHARD`` without a
    mesh shards within each torchrun node (``LOCAL_WORLD_SIZE`` ranks) and replicates across.

    ``policy`` picks the units: ``None`` (one unit), a set of module classes (each instance is
    a unit), or a callable ``module -> bool``; the root unit keeps every other parameter. A
    parameter held by several modules belongs to the unit of their lowest common ancestor.

    A model built on the ``meta`` device is materialized here, one module at a time in
    ``module.modules()`` order (``deferred_init``): ``param_init_fn(submodule)`` when given,
    else ``submodule.reset_parameters()``, initializes it at full size on the compute device,
    and its parameters are sharded right after (see ``deferred_init``).

    ``check_ranks`` (default on): before each forward, ``summon_full_params``, the full state
    dicts and ``clip_grad_norm_`` (whose norm rides in the same exchange), the ranks exchange
    five integers (one tiny all-gather) and all raise a clear error if they are out of step
    (``FSDPState.check_lockstep``) instead of hanging on mismatched collectives. And here,
    once: every rank must start from the same parameters and buffers (a bitwise checksum of
    each, compared in the one collective that compares the units), else every rank raises,
    naming the first that differs.

    ``shard_placement_fn`` (FSDP2's): called with each (full) parameter, returns
    ``torch.distributed.tensor.Shard(dim)`` to split that parameter over the ranks on ``dim``
    instead of dim 0 (e.g. stacked expert weights ``[E, d, h]`` on dim 1 when there are fewer
    experts than ranks), or None for dim 0. Uneven sizes are padded like dim 0's; its shard,
    gradient and optimizer state are this rank's ``torch.chunk`` of that dim, its state-dict
    value a DTensor placed ``Shard(dim)``.

    ``gradient_divide_factor`` (FSDP2's ``set_gradient_divide_factor``): divide the reduced
    gradients by this instead of the number of ranks they were summed over. Expert parallelism
    needs it: an expert's gradient is already summed over the expert-parallel ranks (its
    all-to-all's backward) before this reduction sums it over the expert-data-parallel ones,
    so the mean over every data-parallel rank divides by both.

    A submodule already sharded by its own ``fully_shard`` call (e.g. the experts of a MoE
    block on their own mesh, ``expert_parallel.py``) keeps its units, groups and options: this
    call adopts them into its tree instead of sharding those parameters again.

    ``sync_module_states`` (FSDP1's option): broadcast the parameters and buffers of rank 0 of
    the group (of the mesh, for hybrid sharding) to every rank before sharding them (a meta
    model: each module's, once initialized), so ranks whose inits differ start alike.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"fully_shard: expected an nn.Module, got {type(module).__name__}")
    if _params.is_sharded(module):
        cls = getattr(type(module), "_fsdp_base_class", type(module))
        raise ValueError(
            f"fully_shard: module {cls.__name__} is already sharded by an earlier fully_shard call; "
            "call fully_shard once on it (an outer module's fully_shard adopts it)"
        )
    inner = inner_roots(module)
    strategy = ShardingStrategy.parse(strategy)
    is_unit_module = _policy_predicate(policy)
    mixed_precision = _check_type("mixed_precision", mixed_precision, MixedPrecision)
    cpu_offload = _check_type("cpu_offload", cpu_offload, CPUOffload)
    if shard_placement_fn is not None and not callable(shard_placement_fn):
        raise TypeError(
            f"fully_shard: shard_placement_fn must be callable (parameter) -> Shard(dim) or None, "
            f"got {shard_placement_fn!r}"
        )
    if param_init_fn is not None and not callable(param_init_fn):
        raise TypeError(f"fully_shard: param_init_fn must be callable (module) -> None, got {param_init_fn!r}")
    holders = _collect_holders(module, {id(p) for p in (ignored_params or ())} | adopted_param_ids(inner))
    device = _common_device(holders)
    deferred = device is not None and device.type == "meta"
    compute_device = _compute_device(device, cpu_offload)
    groups = resolve_groups(process_group, device_mesh, strategy, compute_device.type)
    strategy = groups.strategy
    starting = StartingValues(groups.everyone, bool(sync_module_states), bool(check_ranks))
    if starting.sync:
        _check_same_tensors_before_broadcast(module, holders, groups.everyone)
    if not deferred:  # a meta model's full values exist module by module (deferred_init)
        for entries in holders.values():
            path, _, param, attr = entries[0]
            starting.show("parameter", _fqn(path, attr), param)
    unit_paths = [p for p, m in module.named_modules() if p and is_unit_module(m)]
    assignment = _assign_units(holders, unit_paths)

    state = FSDPState(module, [], mixed_precision.param_dtype)
    state.groups = groups
    state.check_ranks = bool(check_ranks)
    for _, sub in module.named_modules():
        _params.attach_module(sub, state)
    modules = dict(module.named_modules())
    for unit_path in ["", *unit_paths]:
        members = [h for h in holders.values() if assignment[id(h[0][2])] == unit_path]
        if not members:
            continue
        unit = _build_unit(
            unit_path, modules[unit_path], members, strategy, mixed_precision,
            groups, compute_device, state, deferred, cpu_offload, shard_placement_fn, gradient_divide_factor,
        )
        if unit_path:
            modules[unit_path].__dict__[UNIT_OF_MODULE] = state.runtime[unit.id]
    if deferred:
        materialize_and_shard(module, state, compute_device, param_init_fn, starting)
    elif param_init_fn is not None:
        raise ValueError(
            "fully_shard: param_init_fn is for a model built on the meta device, but its "
            f"parameters are on {device}; drop param_init_fn or build the model under "
            "torch.device('meta')"
        )
    adopt(state, module, inner)
    groups = state.groups = with_tensor_parallel(state.groups, [s for u in state.units for s in u.tp_specs if s is not None])
    state.fqn_to_param = {
        fqn: (unit, index)
        for unit in state.units
        for index, unit_holders in enumerate(unit.holders)
        for fqn in _holder_fqns(unit_holders, modules)
    }
    scope_modules = {id(module): module}
    scope_modules.update((id(modules[p]), modules[p]) for p in unit_paths)
    scope_modules.update((id(m), m) for m in modules.values() if any(True for _ in _params.iter_accessors(m)))
    scope_modules.update((id(u.module), u.module) for u in state.units)
    _register_shared_hooks(list(scope_modules.values()), state)  # the root, units and parameter holders
    state.assign_templates()
    module.__dict__[ROOT_STATE] = state
    state.optimizer_hooks = install_optimizer_hooks(state)
    _log_units(module, state)
    for name, buf in module.named_buffers():
        starting.show("buffer", name, buf)
    _check_same_on_all_ranks(state, groups.everyone, starting)
    return module


def _log_units(module: nn.Module, state: FSDPState) -> None:
    """What fully_shard built: one INFO line per model, one DEBUG line per unit."""
    if not log.isEnabledFor(logging.INFO):
        return
    log.info("fully_shard: %s in %d units", type(module).__name__, len(state.units))
    for unit in state.units:
        log.debug(
            "fully_shard: unit %r: %d params, %s, world %d, %d of %d elements on this rank",
            unit.name or "<root>", len(unit.layout.params), unit.strategy.name, unit.spec.world_size,
            unit.layout.local_numel, sum(p.full_numel for p in unit.layout.params),
        )


def sharded(**fully_shard_kwargs) -> Callable[[type], type]:
    """Class decorator: every instance of the class is ``fully_shard``-ed (default process
    group) at the end of its ``__init__``, with these keyword arguments."""

    def decorate(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"fsdp_compile.sharded decorates nn.Module classes, not {cls!r}")
        original_init = cls.__init__

        @functools.wraps(original_init)
        def __init__(self, *args, **kwargs):
            original_init(self, *args, **kwargs)
            if type(self) is cls:  # a subclass shards itself at the end of its own __init__
                fully_shard(self, **fully_shard_kwargs)

        cls.__init__ = __init__
        return cls

    return decorate


def root_state(module: nn.Module) -> FSDPState:
    state = _params.tree_state(module)
    if state is None:
        raise ValueError(
            f"fsdp_compile: {type(module).__name__} is not sharded; call fully_shard(module) first"
        )
    return state


def no_sync(module: nn.Module) -> contextlib.AbstractContextManager:
    """Inside: backward passes accumulate gradients locally, with no communication. The first
    backward after it reduces the accumulated total (FSDP's ``no_sync``)."""
    return root_state(module).no_sync()


# ---- helpers of fully_shard ---------------------------------------------------------------
def _register_shared_hooks(modules: list[nn.Module], state: FSDPState) -> None:
    """``state.pre_forward`` / ``state.post_forward`` (always called) on every module, under ONE
    hook id per kind shared by all of them. Dynamo, tracing a module's ``_call_impl``, guards on
    ``<hook id> in module._forward_hooks_always_called``; with an id per module (what
    ``register_forward_hook`` gives), identical blocks compiled one by one
    (``block.compile()``) never share a graph -- each recompiles, up to ``recompile_limit``.
    With one id, one graph serves every block. The handles' ``remove()`` would only reach the
    first module; nothing removes these hooks."""
    pre_id = torch.utils.hooks.RemovableHandle(OrderedDict()).id
    post_id = torch.utils.hooks.RemovableHandle(OrderedDict()).id
    for sub in modules:
        torch_private.add_shared_forward_hooks(sub, pre_id, state.pre_forward, post_id, state.post_forward)
    state.hook_ids = (pre_id, post_id)


def _policy_predicate(policy: Policy) -> Callable[[nn.Module], bool]:
    if policy is None:
        return lambda m: False
    if isinstance(policy, type) and issubclass(policy, nn.Module):
        return lambda m: isinstance(m, policy)
    if isinstance(policy, (set, frozenset, list, tuple)):
        bad = [c for c in policy if not (isinstance(c, type) and issubclass(c, nn.Module))]
        if bad:
            raise TypeError(
                f"fully_shard: policy holds {bad[0]!r}, which is not an nn.Module class; "
                "pass a set of module classes, e.g. policy={TransformerBlock}"
            )
        classes = tuple(policy)
        return lambda m: isinstance(m, classes)
    if callable(policy):
        return policy
    raise TypeError(
        f"fully_shard: policy must be None, a set of nn.Module classes, or a callable "
        f"(module) -> bool; got {type(policy).__name__} {policy!r}"
    )


def _check_type(name, value, cls):
    if value is None:
        return cls()
    if not isinstance(value, cls):
        raise TypeError(f"fully_shard: {name} must be a fsdp_compile.{cls.__name__}, got {value!r}")
    return value


def _collect_holders(module, ignored_ids):
    """id(param) -> [(module_path, module, attr, param), ...] for every registration of it."""
    holders: dict[int, list] = {}
    for path, sub in module.named_modules():
        for attr, param in sub._parameters.items():
            if param is None or id(param) in ignored_ids:
                continue
            holders.setdefault(id(param), []).append((path, sub, param, attr))
    return holders


def _fqn(path: str, attr: str) -> str:
    return f"{path}.{attr}" if path else attr


def _common_device(holders) -> Optional[torch.device]:
    device, first = None, None
    for entries in holders.values():
        path, _, param, attr = entries[0]
        if device is None:
            device, first = param.device, _fqn(path, attr)
        elif param.device != device:
            raise ValueError(
                f"fully_shard: parameter {_fqn(path, attr)!r} is on {param.device}, but "
                f"{first!r} is on {device}; move the model to one device first"
            )
    return device


def _compute_device(device, cpu_offload: CPUOffload) -> torch.device:
    if device is None:
        return torch.device("cpu")
    if device.type == "meta":  # deferred init: materialize where the model will run
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if cpu_offload.offload_params and device.type == "cpu" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _assign_units(holders, unit_paths: list[str]) -> dict[int, str]:
    """id(param) -> path of its unit: the nearest unit module above the holders' common ancestor."""
    units = set(unit_paths)
    assignment = {}
    for entries in holders.values():
        paths = [e[0].split(".") if e[0] else [] for e in entries]
        common = paths[0]
        for other in paths[1:]:
            n = 0
            while n < min(len(common), len(other)) and common[n] == other[n]:
                n += 1
            common = common[:n]
        while common and ".".join(common) not in units:
            common = common[:-1]
        assignment[id(entries[0][2])] = ".".join(common)
    return assignment


def _build_unit(path, module, members, strategy, mp, groups, compute_device, state,
                deferred=False, cpu_offload=None, shard_placement_fn=None, gradient_divide_factor=None):
    fqns = [_fqn(m[0][0], m[0][3]) for m in members]
    params = [m[0][2] for m in members]
    dtypes = {p.dtype for p in params}
    if len(dtypes) > 1:
        odd = next(f for f, p in zip(fqns, params) if p.dtype != params[0].dtype)
        raise ValueError(
            f"fully_shard: unit {path or '<root>'!r} mixes dtypes {sorted(map(str, dtypes))} "
            f"({fqns[0]!r} is {params[0].dtype}, {odd!r} is not); cast the model to one dtype "
            "and use MixedPrecision for lower-precision compute"
        )
    dims = _shard_dims(fqns, params, shard_placement_fn)
    tp_specs = _tp_specs(path, fqns, params, groups, dims)
    replicated = strategy == ShardingStrategy.NO_SHARD
    shapes = [tuple(p.shape if s is None else torch_private.local_tensor(p).shape) for p, s in zip(params, tp_specs)]
    layout = make_unit_layout(fqns, [_dim_first(s, d) for s, d in zip(shapes, dims)], groups.shard_size, replicated)
    spec = CommSpec(
        groups.shard_name, groups.shard_size, groups.shard_rank, replicated, mp.param_dtype, mp.reduce_dtype,
        groups.replicate_name, groups.replicate_size,
        reduce_scatter_kind(groups.shard, torch.device(compute_device)), gradient_divide_factor,
    )
    holders = [[(m, attr) for _, m, _, attr in entries] for entries in members]
    unit = Unit(path, module, holders, layout, [torch.Size(s) for s in shapes], strategy, spec, compute_device)
    state.add_unit(unit)
    unit.tp_specs = tp_specs
    unit.shard_dims = dims
    unit.groups = groups
    if deferred:  # a zero buffer now; deferred_init fills it module by module
        offload = cpu_offload is not None and cpu_offload.offload_params
        unit.allocate_flat(params[0].dtype, torch.device("cpu") if offload else compute_device)
        shards = params
    else:
        shards = unit.shard_from(params)
    for index, (entries, shard) in enumerate(zip(members, shards)):
        for _, owner, _, attr in entries:
            owner._parameters[attr] = shard
            _params.install_accessor(owner, attr, unit, index)
    return unit


def _shard_dims(fqns, params, shard_placement_fn) -> list[int]:
    """The dim each parameter's shards split: ``shard_placement_fn(param)``'s ``Shard(dim)``
    (a negative dim counts from the end), or 0. Raises naming the parameter for any other
    return value or a dim the parameter does not have."""
    if shard_placement_fn is None:
        return [0] * len(params)
    from torch.distributed.tensor import Shard

    dims = []
    for fqn, param in zip(fqns, params):
        placement = shard_placement_fn(param)
        if placement is None:
            dims.append(0)
            continue
        if type(placement) is not Shard:  # not a subclass either (FSDP2's _StridedShard)
            raise TypeError(
                f"fully_shard: shard_placement_fn returned {placement!r} for parameter {fqn!r}; "
                "it must return torch.distributed.tensor.Shard(dim) or None (dim 0)"
            )
        ndim = param.dim()
        dim = placement.dim + ndim if placement.dim < 0 else placement.dim
        if ndim == 0 and dim in (0, -1):  # a 0-d parameter is held whole (layout.py)
            dims.append(0)
            continue
        if not 0 <= dim < ndim:
            raise ValueError(
                f"fully_shard: shard_placement_fn returned Shard({placement.dim}) for parameter "
                f"{fqn!r} of shape {tuple(param.shape)}, which has no dim {placement.dim}; return "
                f"Shard(d) with -{ndim} <= d < {ndim}, or None"
            )
        dims.append(dim)
    return dims


def _dim_first(shape: tuple, dim: int) -> tuple:
    """``shape`` with ``dim`` moved first: how the layout sees a parameter sharded on ``dim``."""
    if not dim:
        return shape
    return (shape[dim], *shape[:dim], *shape[dim + 1:])


def _tp_specs(path, fqns, params, groups, dims) -> list:
    """Each parameter's ``TPSpec`` (a tensor-parallel DTensor) or None (tensor_parallel.py)."""
    specs = [
        tp_spec_of(p, fqn, groups.mesh, groups.replicate is not None, dim) if is_dtensor(p) else None
        for fqn, p, dim in zip(fqns, params, dims)
    ]
    meshes: dict = {}
    for fqn, s in zip(fqns, specs):
        if s is not None:
            meshes.setdefault(s.mesh, (fqn, s.mesh))  # equal slices of one mesh are one mesh
    if len(meshes) > 1:
        (a, mesh_a), (b, mesh_b) = list(meshes.values())[:2]
        raise ValueError(
            f"fully_shard: unit {path or '<root>'!r} mixes parameters on different tensor-parallel "
            f"meshes ({a!r} on {mesh_a.mesh_dim_names}, {b!r} on {mesh_b.mesh_dim_names}); put "
            "them in different units (policy=) or apply the TP plan with one mesh"
        )
    return specs


def _holder_fqns(unit_holders, modules):
    paths = {id(m): p for p, m in modules.items()}
    return [_fqn(paths[id(m)], attr) for m, attr in unit_holders]


def _check_same_tensors_before_broadcast(module, holders, group) -> None:
    """``sync_module_states``: the ranks hold the same tensors before they broadcast them."""
    mine = [(_fqn(e[0][0], e[0][3]), tuple(e[0][2].shape), str(e[0][2].dtype)) for e in holders.values()]
    mine += [(name, tuple(b.shape), str(b.dtype)) for name, b in module.named_buffers()]
    check_same_tensors_before_broadcast(mine, group)


def _check_same_on_all_ranks(state: FSDPState, group, starting: StartingValues) -> None:
    """Every rank must build the same units and start from the same values (consistency.py)."""
    if group is None or dist.get_world_size(group) <= 1:
        return
    check_units_and_starting_values(state.units, group, starting)
    log.debug("fully_shard: the units and starting values are the same on all %d ranks", dist.get_world_size(group))
