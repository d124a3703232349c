"""Every check that the ranks agree, in one place: each is a collective that every rank runs
at the same point and that raises on every rank, naming what differs, before a mismatch could
hang a collective or silently mix the ranks' data.

- ``fully_shard`` (once): the units and the tensors' shapes (``check_units_and_starting_values``,
  ``check_same_tensors_before_broadcast``) and every parameter's and buffer's starting value
  (``StartingValues``, ``bitwise_checksum``).
- Before every forward, ``summon_full_params``, the full state dicts, ``clip_grad_norm_`` (whose
  norm rides in the same exchange, ``reduce_norm``), each eager unit all-gather and each
  compiled graph's call and backward: the lockstep record (``check_lockstep``, the
  ``Phase``s). A compiled call's record names its graph (``graph_id``: a CRC of its collective
  schedule) and the units it gathers this call (``call_units``: positions of the units whose
  flat buffers feed it), so ranks calling graphs with equal schedules in a different order, or
  one graph for different blocks, fail too.
- At the first call of a compiled graph on any rank: its collective schedules
  (``verify_schedule_across_ranks``; ``passes/schedule_check`` computes them).

Not here: ``failures.py`` names a collective that already failed (which rank is gone or
abandoned its collectives, through the store); it compares nothing and runs only after a
failure.
"""
from __future__ import annotations

import enum
import zlib
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from . import torch_private
from .failures import naming_collective_failures


class Phase(enum.IntEnum):
    """What a rank is about to do, as exchanged by ``check_lockstep``."""

    FORWARD = 1
    SUMMON = 2
    GATHER = 3  # an eager forward all-gather of one unit
    FULL_STATE_DICT = 4
    FULL_OPTIM_STATE_DICT = 5
    CLIP_GRAD_NORM = 6  # the record carries this rank's partial norm (float64 bits)
    BACKWARD = 7  # the backward of a compiled graph, before its collectives


# What ``describe`` calls a phase that is one of our functions.
_CALLS = {
    Phase.SUMMON: "summon_full_params",
    Phase.FULL_STATE_DICT: "full_state_dict",
    Phase.FULL_OPTIM_STATE_DICT: "full_optim_state_dict",
    Phase.CLIP_GRAD_NORM: "clip_grad_norm_",
}


def graph_id(fingerprint) -> int:
    """A compiled graph's identity across ranks: a CRC of its collective schedule (Python's
    ``hash`` differs between processes)."""
    return zlib.crc32(repr(fingerprint).encode()) + 1  # 0 means "eager"


def first_mismatch_across_ranks(value: Any, group=None) -> Optional[tuple[int, Any]]:
    """``(rank, their_value)`` for the first rank of ``group`` whose picklable ``value`` differs
    from this rank's, or ``None`` when all agree. A collective: every rank must call it."""
    everyone = values_of_every_rank(value, group)
    return next(((rank, theirs) for rank, theirs in enumerate(everyone) if theirs != value), None)


def values_of_every_rank(value: Any, group=None) -> list:
    """Every rank's picklable ``value``, in rank order (one ``all_gather_object``). A collective."""
    everyone = [None] * dist.get_world_size(group)
    with _real_tensors():
        dist.all_gather_object(everyone, value, group=group)
    return everyone


def exchange_records(record: Sequence[int], group, device: torch.device) -> list[tuple[int, ...]]:
    """Every rank's ``record`` (a few ints), in rank order: one all-gather of a tiny int64 tensor.
    A collective: every rank of ``group`` must call it."""
    world = dist.get_world_size(group)
    with _real_tensors():
        mine = torch.tensor(list(record), dtype=torch.int64, device=device)
        everyone = torch.empty(world * mine.numel(), dtype=torch.int64, device=device)
        dist.all_gather_single(everyone, mine, group=group)
        return [tuple(row) for row in everyone.view(world, -1).tolist()]


def _real_tensors():
    """These checks exchange Python values: under a ``FakeTensorMode`` (``fsdp_compile.estimate``
    traces a step under one) their few tensors must still be real to be read back."""
    return torch_private.unset_fake_temporarily()


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bitwise_checksum(tensor: torch.Tensor) -> torch.Tensor:
    """Two int64s that identify ``tensor``'s bits. Each dim-0 row's elements, read as integers of
    their width, give the XOR of their bit patterns (``torch.hash_tensor``) and their wrapping
    sum; the checksum is the XOR over rows and the rows' mix weighted by row position. Any one
    changed bit changes the XOR; rows in another order change the weighted sum; a float sum
    would hide any pair of elements that trade value. Exact bits, not values: ``-0.0`` differs
    from ``0.0``. One pass over the data with temporaries of a few integers per row (no copy of
    a contiguous tensor: ``fully_shard`` of a meta model holds one module's tensors at a time)."""
    t = tensor.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.numel() == 0:
        return torch.zeros(2, dtype=torch.int64, device=t.device)
    rows = t.contiguous().reshape(t.shape[0] if t.dim() else 1, -1)
    words = rows.view(_INT_OF_SIZE[t.element_size()])
    row_xor = torch.hash_tensor(words, dim=1).view(torch.int64)
    row_sum = words.sum(dim=1, dtype=words.dtype).to(torch.int64)  # native width: no copy
    weights = torch.arange(1, 2 * len(row_xor), 2, dtype=torch.int64, device=t.device)
    mixed = (row_xor + row_sum * 0x9E3779B1) * weights
    return torch.stack([torch.hash_tensor(row_xor).view(torch.int64), mixed.sum()])


class StartingValues:
    """Every rank starts from the same parameters and buffers (``fully_shard``).

    ``sync=True`` (``sync_module_states``): each full tensor is broadcast from rank 0 of
    ``group`` as it is shown (before it is sharded). Else, with ``check``, each one's
    :func:`bitwise_checksum` is kept, and :meth:`finish` compares them across ranks in one small
    collective (its fingerprint goes with the units' fingerprint). Tensors must be shown in the
    same order on every rank; ``fully_shard`` compares the units first, so a rank whose model
    differs in structure fails there, not here."""

    def __init__(self, group, sync: bool, check: bool):
        on = group is not None and dist.get_world_size(group) > 1
        self.group = group if on else None
        self.sync = on and sync
        self.check = on and check and not sync
        self.names: list[str] = []
        self._sums: list[torch.Tensor] = []

    def show(self, what: str, name: str, tensor: torch.Tensor) -> None:
        """``what`` ("parameter" / "buffer") ``name``'s full value, before it is sharded. A
        ``DTensor`` (a tensor-parallel parameter) is neither broadcast nor checked: its local
        tensor legitimately differs across the ranks of its TP mesh, and torch's TP plan placed
        it (``distribute_tensor``)."""
        from torch.distributed.tensor import DTensor

        if isinstance(tensor, DTensor):
            return
        if self.sync:
            with torch.no_grad():
                dist.broadcast(tensor.detach(), src=dist.get_global_rank(self.group, 0), group=self.group)
        elif self.check:
            self.names.append(f"{what} {name!r}")
            self._sums.append(bitwise_checksum(tensor).cpu())

    def checksums(self) -> list[tuple[int, int]]:
        return [tuple(row) for row in torch.stack(self._sums).tolist()] if self._sums else []

    def first_difference(self, mine: list, everyone: list[list]) -> Optional[str]:
        """The error text for the first tensor whose checksum differs between ranks, or None."""
        for i, name in enumerate(self.names):
            ranks = [r for r, theirs in enumerate(everyone) if i < len(theirs) and theirs[i] != mine[i]]
            if ranks:
                return (
                    f"fully_shard: {name} holds different values on different ranks (this rank's "
                    f"differ from rank {ranks[0]}'s; bitwise checksums {mine[i]} vs "
                    f"{everyone[ranks[0]][i]}). Sharding it would silently train a mixture of "
                    "the ranks' initializations; pass fully_shard(..., sync_module_states=True) to "
                    "start every rank from rank 0's values, or seed every rank identically "
                    "(torch.manual_seed(0) before building the model)"
                )
        return None


# ---- fully_shard ------------------------------------------------------------------------------
def check_same_tensors_before_broadcast(mine: list, group) -> None:
    """``sync_module_states``: the ranks must hold the same tensors (``mine``: names, shapes,
    dtypes) before they broadcast them, or the broadcasts would pair different tensors."""
    mismatch = first_mismatch_across_ranks(mine, group)
    if mismatch is not None:
        rank, theirs = mismatch
        diff = next((f"{a} vs {b}" for a, b in zip(mine, theirs) if a != b), f"{len(mine)} tensors vs {len(theirs)}")
        raise RuntimeError(
            f"fully_shard(sync_module_states=True): this rank's parameters and buffers differ from "
            f"rank {rank}'s ({diff}); every rank must build the same model"
        )


def check_units_and_starting_values(units: list, group, starting: StartingValues) -> None:
    """Every rank must build the same units and start from the same values: compare the units'
    fingerprint and the tensors' checksums with every other rank's, in one collective."""
    mine = [  # a TP parameter's global shape: its local one may differ between TP ranks
        (u.name, u.strategy.name,
         [(p.fqn, p.full_shape if s is None else tuple(s.shape)) for p, s in zip(u.layout.params, u.tp_specs)],
         str(u.shard_dtype))
        for u in units
    ]
    sums = starting.checksums()
    with naming_collective_failures("fully_shard's comparison of the ranks' units"):
        everyone = values_of_every_rank((mine, sums), group)
    mismatch = next(((r, theirs) for r, (theirs, _) in enumerate(everyone) if theirs != mine), None)
    if mismatch is not None:
        rank, theirs = mismatch
        diff = next(
            (f"{a} vs {b}" for a, b in zip(mine, theirs) if a != b),
            f"{len(mine)} units vs {len(theirs)}",
        )
        raise RuntimeError(
            f"fully_shard: this rank's units differ from rank {rank}'s ({diff}); every rank "
            "must build the same model and call fully_shard with the same arguments"
        )
    difference = starting.first_difference(sums, [theirs for _, theirs in everyone])
    if difference is not None:
        raise RuntimeError(difference)


# ---- the lockstep record ----------------------------------------------------------------------
# A record is five ints: (phase, gradients synced, graph, first call, call units). ``graph`` is a
# compiled graph's ``graph_id`` (0: eager), a unit's position + 1 (GATHER) or a partial norm's
# bits (CLIP_GRAD_NORM); ``call units`` identifies the units a compiled call gathers (0: none).
def check_lockstep(state, phase: Phase, what: str, graph: int = 0, first_call: bool = False, units: int = 0) -> bool:
    """Before a forward (eager, or each compiled graph), ``summon_full_params`` and the full
    state dicts: every rank exchanges its record -- one all-gather of five integers -- and
    raises on every rank, naming both sides, if another rank is about to do something else:
    one rank inside ``no_sync`` or ``summon_full_params`` while another is not, running another
    compiled graph (a recompile for other shapes that changes the collectives, a graph break on
    one rank), or a compiled graph for other units (graphs called in another order). Such ranks
    would otherwise issue mismatched collectives: a hang until the process group's timeout, an
    abort on mismatched sizes, or silently wrong data. Returns True when some rank runs a
    compiled graph for the first time, or the ranks run different compiled graphs (the caller
    then compares the graphs' collective schedules on every rank, which names what differs).
    ``state`` is the ``FSDPState``. Off with ``fully_shard(check_ranks=False)``."""
    state.raise_if_abandoned()
    everyone = None if state.groups is None else state.groups.everyone
    if not state.check_ranks or everyone is None:
        return first_call
    mine = (int(phase), int(state.sync_grads), graph, int(first_call), units)
    records = _exchange(state, mine, what, compare_graphs=True)
    # Different compiled graphs on every rank: the caller's schedule comparison names the
    # collectives that differ, or finds none (then the ranks go on).
    return any(rec[3] for rec in records) or len({rec[2] for rec in records}) > 1


def _exchange(state, mine: tuple[int, ...], what: str, compare_graphs: bool, doing: str = "") -> list[tuple[int, ...]]:
    """Every rank's lockstep record; raises on every rank when one differs in phase, gradient
    mode, the units the same compiled graph gathers (graphs with equal schedules called in
    another order, or one graph for other blocks), or, with ``compare_graphs``, in graph id
    unless all run compiled forwards (different graphs: the caller compares their schedules)."""
    with naming_collective_failures(doing or f"the lockstep check before {what}"):
        records = exchange_records(mine, state.groups.everyone, state.units[0].compute_device)
    compiled_forwards = mine[0] == Phase.FORWARD and all(rec[0] == Phase.FORWARD and rec[2] for rec in records)
    other = next(
        (
            (rank, rec)
            for rank, rec in enumerate(records)
            if rec[:2] != mine[:2] or (rec[2] == mine[2] and rec[4] != mine[4])
            or (compare_graphs and rec[2] != mine[2] and not compiled_forwards)
        ),
        None,
    )
    if other is not None:
        rank, theirs = other
        raise RuntimeError(
            f"fsdp_compile: ranks are out of step: this rank is about to run "
            f"{describe(mine, what, state)}, but rank {rank} is about to run "
            f"{describe(theirs, state=state)}. Every rank must make the same "
            "calls in the same order (forward, backward, no_sync, summon_full_params, full_state_dict, "
            "full_optim_state_dict, clip_grad_norm_), compile the same graphs and call them the same "
            "number of times, in the same order; see the README's Troubleshooting"
        )
    return records


def reduce_norm(state, part: torch.Tensor, maximum: bool) -> torch.Tensor:
    """``clip_grad_norm_``'s sum (``maximum``: max) of the ranks' partial norms over the shard
    group. With ``check_ranks`` the partial norm travels in this rank's lockstep record (its
    float64 bits in the graph-id slot), so the exchange that keeps ranks in lockstep is the
    reduction itself: no collective beyond the one the norm needs. The sum runs in float64
    in shard-rank order, the same on every rank, and returns in ``part``'s dtype."""
    state.raise_if_abandoned()
    shard = state.groups.shard
    if not state.check_ranks:
        with naming_collective_failures("clip_grad_norm_'s all-reduce of the gradient norm"):
            dist.all_reduce(part, op=dist.ReduceOp.MAX if maximum else dist.ReduceOp.SUM, group=shard)
        return part
    bits = part.detach().to(torch.float64).reshape(1).view(torch.int64).item()
    records = _exchange(state, (int(Phase.CLIP_GRAD_NORM), int(state.sync_grads), bits, 0, 0), "clip_grad_norm_",
                        False, "clip_grad_norm_'s exchange of the gradient norm (and lockstep check)")
    order = dist.get_process_group_ranks(state.groups.everyone)
    members = [order.index(r) for r in dist.get_process_group_ranks(shard)]
    norms = torch.tensor([records[i][2] for i in members], dtype=torch.int64).view(torch.float64)
    total = norms.max() if maximum else norms.sum()
    return total.to(device=part.device, dtype=part.dtype)


def call_units(state, inputs: Sequence, indices: Optional[list[int]]) -> tuple[int, list[int]]:
    """``(key, indices)``: the record's ``call units`` of a compiled call with ``inputs``: a CRC
    of the positions (in ``state.units``, the same on every rank) of the units whose flat
    buffers hold an input, in the order they first appear among the inputs, + 1 (0: none). ``indices`` (None at a graph's first call, then what
    that call returned) are the inputs to look at: a graph's shard inputs stay at the same
    places when identical blocks share it. The names of each key's units are kept in
    ``state.call_names`` for error messages. (A tensor-parallel unit's shards have storage of
    their own and are not seen.)"""
    flats = state.flat_positions
    if flats is None:  # rebuilt after the flat buffers move (params._apply)
        flats = state.flat_positions = {
            torch_private.storage_id(u.local_flat): i for i, u in enumerate(state.units) if u.local_flat is not None
        }
    if indices is None:  # the first input of each unit's (a unit's shards stay together)
        first: dict[int, int] = {}
        for i, a in enumerate(inputs):
            if isinstance(a, torch.Tensor) and not a.is_meta:
                position = flats.get(torch_private.storage_id(a))
                if position is not None:
                    first.setdefault(position, i)
        indices = list(first.values())
    found = (flats.get(torch_private.storage_id(inputs[i])) for i in indices)
    positions = tuple(dict.fromkeys(p for p in found if p is not None))
    if not positions:
        return 0, indices
    key = state.call_keys.get(positions)
    if key is None:
        key = state.call_keys[positions] = graph_id(positions)
        state.call_names[key] = ", ".join(repr(state.units[i].name or "<root>") for i in positions)
    return key, indices


def describe(record: tuple[int, ...], what: str = "", state=None) -> str:
    phase, synced, graph, _, units = record
    names = {} if state is None else state.graph_names
    if phase in _CALLS:
        return _CALLS[Phase(phase)] + ("" if synced else " inside no_sync")
    if phase == Phase.GATHER:
        all_units = [] if state is None else state.units
        name = all_units[graph - 1].name if 0 < graph <= len(all_units) else f"#{graph - 1}"
        return f"the all-gather of unit {name or '<root>'!r}" + ("" if synced else " inside no_sync")
    body = f"compiled graph {graph - 1:08x}" if graph else "an eager forward"
    gathering = state.call_names.get(units) if state is not None and units else None
    if graph and (gathering or graph in names):
        body += f" (gathering {gathering or names[graph] or 'nothing'})"
    if phase == Phase.BACKWARD:
        body = "the backward of " + body
    if what and not graph:
        body += f" ({what})"
    return body + ("" if synced else " inside no_sync")


# ---- compiled graphs' collective schedules ------------------------------------------------------
def verify_schedule_across_ranks(schedule: list, group, what: str) -> None:
    """Every rank's compiled ``what`` graph issues the same collectives (``schedule``: the
    ``passes.schedule_check.Collective``s in program order); else raise on every rank."""
    fingerprint = [c.fingerprint for c in schedule]
    mismatch = first_mismatch_across_ranks(fingerprint, group)
    if mismatch is not None:
        rank, theirs = mismatch
        raise RuntimeError(
            f"fsdp_compile: the compiled {what} graph on this rank issues collectives "
            f"{fingerprint} but rank {rank}'s issues {theirs}; ranks must compile the same "
            "model with the same inputs (shapes, dtypes) or the job would hang"
            + _no_grad_hint(fingerprint, theirs)
        )


def _no_grad_hint(mine: list[tuple], theirs: list[tuple]) -> str:
    """When the schedules differ only in which parameters got no gradient: say so."""
    if len(mine) != len(theirs) or any(a[:-1] != b[:-1] for a, b in zip(mine, theirs)):
        return ""
    at = next(i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b)
    return (
        f". They differ only in the parameters that got no gradient (the last field, indices in "
        f"the unit) in collective {at}: {list(mine[at][-1])} here, {list(theirs[at][-1])} there. A "
        "parameter that takes part in the loss on some ranks only would leave .grad None on some "
        "ranks and not others; use it on every rank (e.g. add 0 * its output to the loss)"
    )
