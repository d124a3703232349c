"""The two operations every original-parameter read turns into.

``fsdp_compile::param_use(shards, extra, unit, index, mode)`` is the *marker*: what a read of
``module.weight`` inside a compiled forward becomes in the Dynamo graph. Its fake result has the
full shape (and gathered dtype) of parameter ``index`` of ``unit``. The backend's
``passes.insert_collectives`` replaces all markers of a unit by one ``gather_unit`` call; a
marker that survives (another backend) still runs correctly, one parameter at a time.

``gather_unit(unit, mode, extra, *shards)`` is the autograd-aware gather of a whole unit: forward
is copy-in -> all-gather -> copy-out, backward is copy-in -> reduce-scatter -> shard views
(``collectives``). Eager forwards call it directly; compiled graphs call it through the pass, and
AOTAutograd traces both directions into the forward and backward graphs.

``mode`` (a :class:`GradMode`) says what the backward does with the full gradients; graph
nodes and the marker's schema carry it as a plain ``int``.
"""
from __future__ import annotations

import enum
from typing import Optional

import torch
import torch.fx.traceback

from .torch_private import is_fake
from .log import warn_once
from .registry import get_unit, runtime_of


class GradMode(enum.IntEnum):
    """What a unit's backward does with its full gradients."""

    SYNC = 0  # reduce them now (one reduce-scatter / all-reduce)
    # no communication: the packed full gradients become the gradient of ``extra``, the unit's
    # accumulator leaf, and wait in ``UnitRuntime.pending`` (``no_sync``)
    NO_SYNC = 1
    SYNC_PENDING = 2  # reduce the gradients plus ``extra`` (the pending packed gradients)


class _GatherUnit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, unit_id: int, mode: GradMode, extra: Optional[torch.Tensor], *shards):
        unit = get_unit(unit_id)
        ctx.unit_id, ctx.mode = unit_id, mode
        # An output that took no part in the loss gets no gradient (None, not zeros): its
        # parameter's .grad stays None, as in a plain model, DDP and FSDP2.
        ctx.set_materialize_grads(False)
        ctx.shard_dtypes = [s.dtype for s in shards]
        ctx.shard_devices = [s.device for s in shards]
        # Kept on ctx, not saved: a saved tensor would change what activation checkpointing
        # counts as saved between the forward and its recompute.
        ctx.pending = extra if mode == GradMode.SYNC_PENDING else None
        with torch.fx.traceback.annotate({"fsdp_unit": unit_id}):
            return tuple(unit.all_gather(list(shards)))

    @staticmethod
    def backward(ctx, *full_grads):
        # The parameters without a gradient are part of the compiled backward's collective
        # fingerprint (passes/schedule_check.py): ranks that disagree fail at the first call.
        no_grad = tuple(i for i, g in enumerate(full_grads) if g is None)
        with torch.fx.traceback.annotate({"fsdp_unit": ctx.unit_id, "fsdp_no_grad": no_grad}):
            return _GatherUnit._backward(ctx, full_grads)

    @staticmethod
    def _backward(ctx, full_grads):
        unit = get_unit(ctx.unit_id)
        none_for_shards = [None] * len(full_grads)
        runtime = runtime_of(ctx.unit_id)
        if runtime is not None:  # eagerly: drop what backward gathered (regather, recompute)
            runtime.after_backward_use()
        if all(g is None for g in full_grads):
            return (None, None, None, *none_for_shards)
        if ctx.mode == GradMode.NO_SYNC:
            return (None, None, unit.pack_grads(list(full_grads)), *none_for_shards)
        pending, ctx.pending = ctx.pending, None
        grads = unit.reduce_grads(list(full_grads), ctx.shard_dtypes, pending)
        grads = [
            g.to(dev) if needed and _has_grad(full, g, pending) else None
            for full, g, dev, needed in zip(full_grads, grads, ctx.shard_devices, ctx.needs_input_grad[3:])
        ]
        return (None, None, None, *grads)


def _has_grad(full_grad: Optional[torch.Tensor], reduced: torch.Tensor, pending: Optional[torch.Tensor]) -> bool:
    """Whether a shard gets the reduced gradient, or keeps ``.grad`` None: None where this rank's
    backward produced no gradient for the parameter (it took no part in the loss), unless
    ``no_sync`` gradients are pending (they may hold one). The reduction itself always counts
    such a parameter as zeros, so another rank's gradient still reaches every rank's rows; if
    eagerly some other rank did produce one (this rank's reduced rows are not all zero), the
    shard keeps it. Compiled, the decision is part of the graph (no data-dependent branch), and
    ranks that disagree fail the schedule check at the first call."""
    if full_grad is not None or pending is not None:
        return True
    return not is_fake(reduced) and bool(reduced.any())


def gather_unit(unit_id: int, mode: GradMode, extra: Optional[torch.Tensor], *shards) -> tuple:
    """Full tensors of every parameter of ``unit_id``, differentiable w.r.t. the shards."""
    return _GatherUnit.apply(unit_id, mode, extra, *shards)


@torch.library.custom_op("fsdp_compile::param_use", mutates_args=())
def param_use(
    shards: list[torch.Tensor], extra: Optional[torch.Tensor], unit: int, index: int, mode: int
) -> torch.Tensor:
    """Full tensor of parameter ``index`` of ``unit`` (a marker for the graph passes)."""
    _warn_surviving_marker(unit)
    with torch.no_grad():
        return get_unit(unit).all_gather(shards)[index].clone()


def _warn_surviving_marker(unit_id: int) -> None:
    """A marker runs only if no pass replaced it: the graph was compiled by another backend, or
    the read sits inside a higher-order op the passes cannot open. Correct, but one gather
    (and one reduction) per read: say so once per unit."""
    unit = get_unit(unit_id)
    warn_once(
        unit, "surviving marker",
        f"fsdp_compile: parameters of unit {unit.name or '<root>'!r} are gathered one "
        "read at a time in a compiled graph (a graph compiled with a backend other than "
        "'fsdp_compile', or a read inside a higher-order op other than activation checkpointing); "
        "compile with backend='fsdp_compile' for one gather per unit",
        stacklevel=2,
    )


@param_use.register_fake
def _param_use_fake(shards, extra, unit, index, mode):
    u = get_unit(unit)
    u.check_shards(shards)
    return shards[0].new_empty(u.full_shape(index), dtype=u.gather_dtype)


def _param_use_setup(ctx, inputs, output):
    shards, extra, unit, index, mode = inputs
    ctx.unit, ctx.index, ctx.mode, ctx.n = unit, index, mode, len(shards)
    ctx.dtypes = [s.dtype for s in shards]


def _param_use_backward(ctx, grad):
    """Unfused fallback: reduce this parameter's gradient alone (correct, one collective each)."""
    unit = get_unit(ctx.unit)
    grads = [grad if i == ctx.index else None for i in range(ctx.n)]
    if ctx.mode == GradMode.NO_SYNC:
        return None, unit.pack_grads(grads), None, None, None
    shard_grads = unit.reduce_grads(grads, ctx.dtypes, None)
    return [g if i == ctx.index else None for i, g in enumerate(shard_grads)], None, None, None, None


param_use.register_autograd(_param_use_backward, setup_context=_param_use_setup)
