"""Full (unsharded) views of a sharded model outside the training step: ``summon_full_params``,
``full_state_dict`` / ``load_full_state_dict`` and their optimizer counterparts.

Full parameters are gathered in the shards' own dtype (never the mixed-precision one). Writing
back copies this rank's dim-0 rows of each full parameter into its shard, in place, so
optimizers keep their references.
"""
from __future__ import annotations

import contextlib
import math
import functools

import torch
import torch.distributed as dist
import torch.nn as nn

from . import torch_private
from .api import root_state
from .failures import naming_collective_failures
from .consistency import Phase
from .tensor_parallel import local_of
from .unit import Unit


def _gather_full(unit: Unit, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    fulls = unit.all_gather(tensors, dtype=unit.shard_dtype)
    # NO_SHARD / world 1 gathers are views of the shards themselves: copy so edits stay local.
    return [f.clone() if f.data_ptr() == t.data_ptr() and f.numel() else f for f, t in zip(fulls, tensors)]


def _gather_unit_params(unit: Unit, with_grads: bool) -> list[nn.Parameter]:
    """Full parameters (a tensor-parallel one: a DTensor on its TP mesh, tensor_parallel.py)."""
    shards = unit.local_shards()
    unit.check_shards(shards)
    full = [
        nn.Parameter(unit.wrap_full(i, f), requires_grad=s.requires_grad)
        for i, (f, s) in enumerate(zip(_gather_full(unit, shards), shards))
    ]
    if with_grads:
        grads = [None if s.grad is None else local_of(s.grad) for s in unit.shards()]
        if any(g is not None for g in grads):
            zeros = [torch.zeros_like(s) if g is None else g for s, g in zip(shards, grads)]
            for i, (p, g, had) in enumerate(zip(full, _gather_full(unit, zeros), grads)):
                p.grad = unit.wrap_full(i, g) if had is not None else None
    return full


def _write_back(unit: Unit, full: list[torch.Tensor]) -> None:
    for index, (shard, tensor) in enumerate(zip(unit.local_shards(), full)):
        rows = unit.local_rows(index, local_of(tensor)).reshape(shard.shape)
        # Unchanged shards are not written: an in-place copy bumps their version counter, which
        # breaks a pending backward that saved them (summon_full_params between forward and backward).
        if not torch.equal(rows, shard):
            shard.copy_(rows)


@contextlib.contextmanager
def summon_full_params(module: nn.Module, writeback: bool = True, with_grads: bool = False):
    """Inside, every sharded parameter read (``module.weight``, ``named_parameters()``) is the
    full parameter; with ``with_grads`` its ``.grad`` is the full gradient. On exit, edits of
    the full parameters are copied into the shards when ``writeback`` (else discarded)."""
    state = root_state(module)
    if state.in_forward or state.summoned is not None:
        raise RuntimeError(
            "fsdp_compile: summon_full_params cannot be entered during a forward or inside "
            "another summon_full_params"
        )
    state.check_lockstep(Phase.SUMMON, "summon_full_params")
    with torch.no_grad():
        summoned = {u.id: _gather_unit_params(u, with_grads) for u in state.units}
    state.summoned = summoned
    try:
        yield module
    finally:
        state.summoned = None
        if writeback:
            with torch.no_grad():
                for unit in state.units:
                    _write_back(unit, summoned[unit.id])


def full_state_dict(module: nn.Module, rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with every sharded parameter replaced by its full tensor, under
    the original names. Gathered one parameter at a time, so at most one full parameter beyond
    the result exists at once. With ``rank0_only`` every tensor is moved to the CPU and only
    rank 0 keeps them (other ranks return ``{}``), so a big model's full state is not
    materialized on every rank. A collective: every rank must call it (the lockstep check
    raises on every rank otherwise)."""
    from torch.distributed.tensor import DTensor

    state = root_state(module)
    state.check_lockstep(Phase.FULL_STATE_DICT, "full_state_dict")
    sharded = state.fqn_to_param
    keep = not rank0_only or not dist.is_initialized() or dist.get_rank() == 0
    result = {}
    for key, value in module.state_dict().items():
        if isinstance(value, DTensor):
            with naming_collective_failures(f"full_state_dict's all-gather of {key!r}"):
                value = value.full_tensor()
        elif key in sharded:
            value = value.clone()  # a whole (NO_SHARD / world 1) shard: a copy, not an alias
        if keep:
            result[key] = value.cpu() if rank0_only else value
    return result


def full_optim_state_dict(module: nn.Module, optimizer: torch.optim.Optimizer, rank0_only: bool = False) -> dict:
    """The optimizer's state dict with full (unsharded) state tensors, keyed by parameter FQN
    (``torch.distributed.checkpoint.state_dict``'s format). ``rank0_only``: on the CPU, on
    rank 0 only (other ranks return ``{}``). A collective, checked like ``full_state_dict``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    root_state(module).check_lockstep(Phase.FULL_OPTIM_STATE_DICT, "full_optim_state_dict")
    options = StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)
    with naming_collective_failures("full_optim_state_dict's all-gathers"):
        return get_optimizer_state_dict(module, optimizer, options=options)


def load_full_optim_state_dict(
    module: nn.Module, optimizer: torch.optim.Optimizer, optim_state_dict: dict, rank0_only: bool = False
) -> None:
    """Load a full optimizer state dict (as from ``full_optim_state_dict``) into the optimizer
    of a sharded model: each rank keeps its shard's rows. ``rank0_only``: only rank 0 passes
    the state (others pass ``{}``), and it is broadcast."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    root_state(module)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=rank0_only)
    set_optimizer_state_dict(module, optimizer, optim_state_dict, options=options)


def load_full_state_dict(module: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load full tensors (as from ``full_state_dict`` or an unsharded model) into the shards."""
    state = root_state(module)
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise RuntimeError(
            f"load_full_state_dict: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
        )
    with torch.no_grad():
        for fqn, (unit, index) in state.fqn_to_param.items():
            got = state_dict[fqn]
            tp = unit.tp_specs[index]
            want = tuple(unit.orig_shapes[index] if tp is None else tp.shape)
            if tuple(got.shape) != want:
                raise RuntimeError(
                    f"load_full_state_dict: {fqn!r} has shape {tuple(got.shape)}, the model's "
                    f"full parameter has shape {want}"
                )
            shard = unit.local_shards()[index]
            if tp is not None:  # this TP rank's part first (tensor_parallel.py)
                got = tp.tp_local_of_full(got)
            shard.copy_(unit.local_rows(index, got).reshape(shard.shape))
        rest = {k: v for k, v in state_dict.items() if k not in state.fqn_to_param}
        module.load_state_dict(rest, strict=False)


def clip_grad_norm_(module: nn.Module, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Clip the gradients of all of ``module``'s parameters by their *global* norm (over every
    rank's shards, as if unsharded); every rank returns the same total norm."""
    import torch.distributed as dist

    state = root_state(module)
    norm_type = float(norm_type)
    if any(s is not None for u in state.units for s in u.tp_specs):
        return _clip_over_tensor_parallel(module, state, max_norm, norm_type)
    sharded, replicated = [], []
    in_units = set()
    for unit in state.units:
        whole = unit.spec.replicated or not unit.spec.communicates
        for shard, shape in zip(unit.shards(), unit.orig_shapes):
            in_units.add(id(shard))
            if shard.grad is not None:  # a 0-d parameter is held whole by every rank (layout.py)
                (replicated if whole or len(shape) == 0 else sharded).append(shard.grad)
    replicated += [p.grad for p in module.parameters() if id(p) not in in_units and p.grad is not None]
    grads = sharded + replicated
    device = grads[0].device if grads else torch.device("cpu")
    # The norm's dtype: the gradients' own (float32 at least), as torch's clip_grad_norm_ does;
    # float64 gradients keep float64, so clipping in float64 equals DDP's to rounding.
    dtype = functools.reduce(torch.promote_types, [g.dtype for g in grads], torch.float32)

    def local(gs):
        if not gs:
            return torch.zeros((), device=device, dtype=dtype)
        norms = torch.stack([torch.linalg.vector_norm(g, norm_type, dtype=dtype) for g in gs])
        return norms.max() if norm_type == float("inf") else norms.pow(norm_type).sum()

    sharded_part, replicated_part = local(sharded), local(replicated)
    if any(u.spec.communicates and not u.spec.replicated for u in state.units):
        # one exchange that is both the sum and the lockstep check (FSDPState.reduce_norm)
        sharded_part = state.reduce_norm(sharded_part, maximum=norm_type == float("inf"))
    if norm_type == float("inf"):
        total = torch.maximum(sharded_part, replicated_part)
    else:
        total = (sharded_part + replicated_part).pow(1.0 / norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return total


def _clip_over_tensor_parallel(module: nn.Module, state, max_norm: float, norm_type: float) -> torch.Tensor:
    """``clip_grad_norm_`` when some parameters are tensor-parallel DTensors: one all-reduce over
    every rank of the combined mesh, each local contribution divided by the number of ranks
    holding the same elements (so the sum counts each element once); max needs no division."""
    from torch.distributed.tensor import Shard

    everyone = state.groups.everyone
    world = dist.get_world_size(everyone)
    inf = norm_type == float("inf")
    parts, locals_, in_units = [], [], set()
    for unit in state.units:
        sharded = unit.spec.communicates and not unit.spec.replicated
        for shard, shape, tp in zip(unit.shards(), unit.orig_shapes, unit.tp_specs):
            in_units.add(id(shard))
            if shard.grad is None:
                continue
            grad = local_of(shard.grad) if tp is None else torch_private.local_tensor(shard.grad)
            distinct = unit.spec.world_size if sharded and len(shape) else 1
            if tp is not None:
                distinct *= math.prod(
                    tp.mesh.size(d) for d, p in enumerate(tp.placements) if isinstance(p, Shard)
                )
            parts.append((grad, world / distinct))
    parts += [(p.grad, world) for p in module.parameters() if id(p) not in in_units and p.grad is not None]
    device = parts[0][0].device if parts else torch.device("cpu")
    total = torch.zeros((), device=device)
    for grad, copies in parts:
        norm = torch.linalg.vector_norm(grad.float() if grad.dtype != torch.float64 else grad, norm_type)
        total = torch.maximum(total, norm) if inf else total + norm.pow(norm_type) / copies
    if world > 1:
        dist.all_reduce(total, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=everyone)
    if not inf:
        total = total.pow(1.0 / norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for grad, _ in parts:
        grad.mul_(coef.to(grad.dtype))
    return total
