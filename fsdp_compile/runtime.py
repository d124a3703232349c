"""Per-root runtime state: what a read of a sharded parameter returns, and when units gather.

``FSDPState`` belongs to the module passed to ``fully_shard``. :meth:`FSDPState.read` is what
``module.weight`` returns (``params.py`` calls it): the summoned full tensor inside
``summon_full_params``; inside a forward scope (``in_forward``) the unit's full tensor -- eagerly
gathered once per unit and forward, under ``torch.compile`` the ``param_use`` marker the graph
passes turn into one gather; during an activation-checkpointing recompute (``in_recompute``) the
unit gathered once per recompute; otherwise the shard. ``sync_grads`` (``no_sync``) picks each
gather's :class:`~fsdp_compile.ops.GradMode`.

Each unit's runtime state is a ``UnitRuntime`` (unit_runtime.py) in ``FSDPState.runtime``: the
decisions are here, the checked transitions there. Eagerly: SHARDED -> gathered for its forward
at the first read in its module's forward (``rt.full``) -> SHARDED after that forward
(``reshard``); FULL_SHARD units are re-gathered on demand in backward
(``UnitRuntime.regathered_for_backward``, through saved-tensor hooks that replace saved full
parameters by tokens) and freed by their reduce (``UnitRuntime.after_backward_use``). Under
``torch.compile`` the hooks only flip flags.

``check_lockstep``: before each forward, ``summon_full_params``, the full state dicts,
``clip_grad_norm_`` and (eagerly) each unit's all-gather the ranks exchange a few integers and
all raise when they are out of step, instead of issuing mismatched collectives (the check
itself is ``consistency.check_lockstep``; ARCHITECTURE.md, "Ranks in lockstep"). ``abandon``: a
compiled graph that raised between collectives tells the other ranks and closes this rank's
connections, so they fail at once instead of waiting.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from . import consistency, ops, torch_private
from .consistency import Phase
from .failures import first_line, report_failure
from .gloo_worker import abandon_twin
from .mesh import Groups
from .registry import register_runtime
from .unit import Unit
from .unit_runtime import UnitRuntime


UNIT_OF_MODULE = "_fsdp_unit"  # module.__dict__ key: the UnitRuntime of the unit a policy-chosen module owns


def in_recompute() -> bool:
    """True while autograd runs a forward again inside backward: activation checkpointing's
    recompute (reentrant or not), which runs module code under ``enable_grad`` inside a
    backward graph task. Backward hooks run with grad disabled, so they still see shards."""
    if torch.compiler.is_compiling():  # compiled regions recompute inside the compiled backward
        return False
    return torch.is_grad_enabled() and torch_private.current_graph_task_id() != -1


def _storage_key(tensor: torch.Tensor) -> int:
    """Which storage ``tensor`` views (its storage's identity, not an address: a fake tensor,
    as ``fsdp_compile.estimate`` runs the eager runtime, has none)."""
    return torch_private.storage_id(tensor)


@torch.compiler.assume_constant_result
def _keeps_traced_reads() -> bool:
    """Whether Dynamo traces the current read at the top level of its graph, where the read may
    keep the unit's markers in ``UnitRuntime.full``; False inside a higher-order op's body (a
    checkpointed region, ``cond``, ...), whose body may not mutate objects from outside it.
    Called while Dynamo traces ``FSDPState.read``: evaluated at trace time, its result a
    constant of the graph (no guard). It asks the question Dynamo's own side-effect check asks:
    is the tracer in its first scope."""
    return torch_private.dynamo_scope_id() == 1


def skip_as_frame(fn):
    """Dynamo never compiles ``fn`` (nor what it calls) as a frame of its own, yet still traces
    it inline from a compiled frame. A parameter read that eager code makes between graphs
    (e.g. a loop Dynamo runs eagerly after a graph break in it) then runs eagerly and returns
    the unit's kept tensors, instead of becoming a one-read graph that gathers the unit again
    and recompiles for every parameter it serves."""
    torch_private.skip_code_as_frame(fn.__code__)
    return fn


@dataclass(frozen=True)
class _SavedFull:
    """A full parameter (or a view of it) that autograd saved, by reference."""

    runtime: UnitRuntime
    index: int
    size: torch.Size
    stride: tuple[int, ...]
    storage_offset: int


class FSDPState:
    def __init__(self, root: nn.Module, units: list[Unit], param_dtype: Optional[torch.dtype]):
        self.root_ref = root
        self.units: list[Unit] = []
        # unit id -> its runtime state (the owner: a record lives as long as this state)
        self.runtime: dict[int, UnitRuntime] = {}
        self.param_dtype = param_dtype
        self.in_forward = False
        self.scope_owner: Optional[nn.Module] = None  # the module whose forward opened the scope
        self.sync_grads = True
        self.applying = False  # inside nn.Module._apply of the sharded tree (see params._apply)
        self.summoned: Optional[dict[int, list[torch.Tensor]]] = None
        # Under torch.compile, between root pre- and post-forward: unit id -> its shard list, so
        # Dynamo builds each unit's list once per trace instead of once per parameter read
        # (which made tracing quadratic in the parameters of a unit). None otherwise.
        self.traced_shards: Optional[dict[int, list[torch.Tensor]]] = None
        self._full_storages: dict[int, list[tuple[UnitRuntime, int, torch.Tensor]]] = {}
        self._saved_hooks: Optional[contextlib.AbstractContextManager] = None
        self.groups: Optional[Groups] = None  # the process groups of every unit (mesh.py)
        self.fqn_to_param: dict = {}  # every registered name -> (unit, index)
        self.compiled_graphs: list = []  # backend.CompiledGraphs, one per compiled Dynamo graph
        self.bucket_units: list[Unit] = []  # the bucket units its compiled graphs gather by (registry is weak)
        self.device_meshes: dict = {}  # (device type, id(Groups)) -> (DeviceMesh, placements) of state dicts
        self.check_ranks = True  # fully_shard(check_ranks=): one tiny all-gather per forward
        self.materializing: Optional[torch.device] = None  # the device, during meta-device init
        self._positions: dict[int, int] = {}  # unit id -> its index in ``units`` (same on every rank)
        # (where, what it raised) once a compiled graph of this rank raised between collectives
        self.abandoned: Optional[tuple[str, str]] = None
        self.graph_names: dict[int, str] = {}  # compiled graph id -> the units it gathers (errors)
        self.call_names: dict[int, str] = {}  # a compiled call's units key -> their names (errors)
        self.call_keys: dict[tuple, int] = {}  # unit positions -> their key (consistency.call_units)
        self.flat_positions: Optional[dict[int, int]] = None  # flat buffer storage -> unit position
        # state_dict.OptimizerHooks: the process-wide optimizer hook lives while some state holds it
        self.optimizer_hooks = None
        for unit in units:
            self.add_unit(unit)
        self.hook_ids: tuple[int, int] = (-1, -1)  # the shared pre- and post-forward hook ids (api.py)

    @property
    def group(self):
        """The shard group (what parameters are split over); None without a process group."""
        return None if self.groups is None else self.groups.shard

    def add_unit(self, unit: Unit) -> UnitRuntime:
        self._positions[unit.id] = len(self.units)
        self.units.append(unit)
        runtime = self.runtime[unit.id] = UnitRuntime(unit)
        register_runtime(unit.id, runtime)
        return runtime

    # ---- reads -----------------------------------------------------------------------------
    @skip_as_frame
    def read(self, rt: UnitRuntime, index: int, shard: torch.Tensor) -> torch.Tensor:
        """What ``module.<name>`` returns for parameter ``index`` of ``rt.unit`` (shard ``shard``);
        ``rt`` is the unit's ``UnitRuntime`` (reached from the module, not by the unit's id, a
        constant Dynamo would guard on).

        Inside a forward a unit is gathered once, at its first read, and ``rt.full`` holds the
        result until its module's forward ends; every later read returns it. That holds across
        graph boundaries, in a whole-model trace as in a region compiled inside an eager forward:
        the first traced read stores the unit's markers in ``rt.full`` (a Dynamo side effect),
        which the unit's post-forward hook clears in the same graph -- so a graph that holds the
        whole unit outputs nothing extra, and a graph break inside the unit makes the graph
        output the gathered tensors, which the resumed graph (or eager code) reads as inputs: no
        second gather, and autograd carries their gradients back into the first graph's one
        reduction. A read inside a higher-order op's body (a checkpointed region) may not mutate
        ``rt`` (Dynamo refuses), so there nothing is kept (``_keeps_traced_reads``): the body's
        markers are lifted out of the region and merged with the graph's other reads of the unit
        by the backend's passes. Neither this function nor the accessor calling it is ever a
        compiled frame of its own (``skip_as_frame``): eager code between graphs reads eagerly."""
        unit = rt.unit
        if self.summoned is not None:
            return self.summoned[unit.id][index]
        if self.in_forward:
            if rt.full is not None:
                return unit.wrap_full(index, rt.full[index])
            if torch.compiler.is_compiling():
                mode, extra = self.grad_mode(rt)
                shards = self._traced_shards(unit)
                # The root's forward traced (whole-model compile): the marker names the unit
                # itself. A region compiled inside an eager forward (per-block compile):
                # ``unit.template``, not ``unit.id``, which is a constant Dynamo guards on;
                # identical blocks share one graph only if it is the same.
                # passes/insert_collectives tells their units apart by their shard inputs.
                named = unit.id if self.traced_shards is not None else unit.template
                if not _keeps_traced_reads():
                    return unit.wrap_full(index, ops.param_use(shards, extra, named, index, int(mode)))
                rt.full = [ops.param_use(shards, extra, named, i, int(mode)) for i in range(len(shards))]
                return unit.wrap_full(index, rt.full[index])
            return unit.wrap_full(index, self._gather_for_forward(rt)[index])
        if in_recompute():
            return unit.wrap_full(index, self._gather_for_recompute(rt)[index])
        return shard

    def grad_mode(self, rt: UnitRuntime) -> tuple[ops.GradMode, Optional[torch.Tensor]]:
        """How the next gather of ``rt.unit`` treats its gradients (under torch.compile, guards)."""
        if not self.sync_grads:
            return ops.GradMode.NO_SYNC, rt.accumulator
        if rt.pending is not None:
            return ops.GradMode.SYNC_PENDING, rt.pending
        return ops.GradMode.SYNC, None

    def _traced_shards(self, unit: Unit) -> list[torch.Tensor]:
        """``unit.shards()`` under torch.compile, built once per unit per traced forward (by the
        root's pre-forward; a compiled region that started inside an eager forward builds its own)."""
        return unit.local_shards() if self.traced_shards is None else self.traced_shards[unit.id]

    # ---- eager gathers ---------------------------------------------------------------------
    def _gather_for_forward(self, rt: UnitRuntime) -> list[torch.Tensor]:
        if rt.full is None:
            self._check_gather(rt.unit)
            rt.gathered_for_forward(self._gather(rt, register=rt.unit.strategy.reshards_after_forward))
        return rt.full

    def _gather_for_recompute(self, rt: UnitRuntime) -> list[torch.Tensor]:
        """The unit gathered once per recompute (every read of it until its gradients are
        reduced shares the result), through the same autograd gather as the forward: a
        non-reentrant recompute must save exactly what the forward saved, and a reentrant one
        back-propagates through this gather (its backward reduces the gradients)."""
        if rt.recompute_full is None:
            rt.gathered_for_recompute(self._gather(rt, register=False))
            torch_private.queue_backward_callback(rt.after_backward_use)
        return rt.recompute_full

    def _gather(self, rt: UnitRuntime, register: bool) -> list[torch.Tensor]:
        unit = rt.unit
        shards = unit.local_shards()
        unit.check_shards(shards)
        if not (torch.is_grad_enabled() and any(s.requires_grad for s in shards)):
            with torch.no_grad():
                return unit.all_gather(shards)
        mode, extra = self.grad_mode(rt)
        fulls = list(ops.gather_unit(unit.id, int(mode), extra, *shards))
        if mode == ops.GradMode.SYNC_PENDING:
            rt.take_pending()  # consumed: the graph holds it until backward
        if register and self._saved_hooks is not None:  # only the eager root's hooks look them up
            self.register_full(rt, fulls)
        return fulls

    def reshard(self, rt: UnitRuntime) -> None:
        if rt.full is not None:
            self.unregister_full(rt)
            rt.resharded()

    # ---- lockstep ------------------------------------------------------------------------
    def check_lockstep(self, phase: Phase, what: str, graph: int = 0, first_call: bool = False, units: int = 0) -> bool:
        """The ranks' lockstep check before ``what`` (``consistency.check_lockstep``)."""
        return consistency.check_lockstep(self, phase, what, graph, first_call, units)

    def reduce_norm(self, part: torch.Tensor, maximum: bool) -> torch.Tensor:
        """``clip_grad_norm_``'s reduction of partial norms, in the lockstep exchange
        (``consistency.reduce_norm``)."""
        return consistency.reduce_norm(self, part, maximum)

    # ---- a compiled graph that raised ------------------------------------------------------
    def abandon(self, where: str, error: BaseException) -> None:
        """This rank's compiled ``where`` raised ``error`` between its collectives: the other
        ranks wait in collectives this rank will never issue (or issued and left). Tell them
        through the store (their ``CollectiveError`` then names this rank, ``where`` and the
        error) and close this rank's connections of the groups our collectives run on, so their
        wait fails at once. From here on this rank raises before any collective
        (``raise_if_abandoned``): the ranks' collectives cannot be matched again."""
        if self.abandoned is not None or self.groups is None or self.groups.shard_name is None:
            return
        self.abandoned = (where, f"{type(error).__name__} ({first_line(error)})")
        report_failure(f"raised {self.abandoned[1]} in its {where} and closed its connections")
        for group in (self.groups.shard, self.groups.replicate):
            abandon_twin(group)
        error.add_note(
            f"fsdp_compile: this rank's {where} stopped between collectives; the other ranks were "
            "told and stop too, and this rank's next forward raises: check batches before the forward"
        )

    def raise_if_abandoned(self) -> None:
        if self.abandoned is not None:
            where, raised = self.abandoned
            raise RuntimeError(
                f"fsdp_compile: this rank's {where} raised {raised} between collectives, so the "
                "ranks' collectives can no longer be matched and the other ranks were stopped: a "
                "rank cannot go on from a failed compiled forward or backward (e.g. skip a bad "
                "batch). Check batches before the forward on every rank, or restart from a checkpoint"
            )

    def _check_gather(self, unit: Unit) -> None:
        """Eagerly, before each unit's forward all-gather: the ranks gather the same unit. Units
        of equal size would otherwise pair one rank's shard of one unit with another's of the
        next (a rank that skipped a unit), silently. Backward regathers and recomputes follow
        the forward's autograd graph, so once the forwards agree they agree: no check there.
        Compiled graphs need none either (a skipped unit changes the graph, which
        ``check_lockstep`` compares)."""
        position = self._positions.get(unit.id)
        if position is not None and unit.spec.communicates and not unit.spec.replicated:
            self.check_lockstep(Phase.GATHER, f"the all-gather of unit {unit.name or '<root>'!r}", position + 1)

    # ---- forward hooks -------------------------------------------------------------------
    # Registered on the root and on every module that holds a sharded parameter or is a unit:
    # the outermost sharded module whose forward runs (the root, or a submodule called on its
    # own such as ``model.blocks[0](x)`` or HF's ``get_input_embeddings()(ids)``) opens the
    # forward scope, and only it closes the scope. Inner modules' hooks do nothing.
    def pre_forward(self, module, args, kwargs):
        if self.in_forward or in_recompute():  # a recompute reads through in_recompute instead
            # a policy unit's module casts its inputs (mixed precision) wherever it runs
            if self.param_dtype is not None and UNIT_OF_MODULE in module.__dict__:
                return self.cast_inputs(args, kwargs)
            return None
        if self.summoned is not None:
            raise RuntimeError(
                f"fsdp_compile: {type(module).__name__}.forward called inside "
                "summon_full_params; leave the context first"
            )
        if not torch.compiler.is_compiling():
            self.check_lockstep(Phase.FORWARD, f"{type(module).__name__}.forward")
        self.in_forward = True
        self.scope_owner = module
        if torch.compiler.is_compiling():
            # Built here, before any read: a read inside a higher-order op's body (a checkpointed
            # region) may not mutate state created outside it, so the body only looks up.
            self.traced_shards = {unit.id: unit.local_shards() for unit in self.units}
        if not torch.compiler.is_compiling() and torch.is_grad_enabled():
            if any(u.strategy.reshards_after_forward for u in self.units):
                self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
                self._saved_hooks.__enter__()
        return self.cast_inputs(args, kwargs)

    def post_forward(self, module, args, kwargs, output):
        """After the forward of a module of the tree: a policy unit's module reshards its unit
        (eagerly; compiled, it drops ``rt.full``, see ``read``); the scope's owner closes it."""
        rt = module.__dict__.get(UNIT_OF_MODULE)
        if rt is not None and self.in_forward and rt.full is not None:
            if torch.compiler.is_compiling():
                rt.full = None  # a plain write Dynamo traces (unit_runtime.py)
            else:
                self.reshard(rt)
        if self.scope_owner is not module:
            return output
        if torch.compiler.is_compiling():
            for rt in self.runtime.values():
                if rt.full is not None:
                    rt.full = None
        else:
            for rt in self.runtime.values():
                self.reshard(rt)
            if self._saved_hooks is not None:
                self._saved_hooks.__exit__(None, None, None)
                self._saved_hooks = None
        self.in_forward = False
        self.scope_owner = None
        self.traced_shards = None
        return output

    def assign_templates(self) -> None:
        """``unit.template``: the first unit whose gather is the same as this one's (``Unit.signature``).
        A compiled graph names a unit's gather by its template, so identical blocks share graphs."""
        first: dict = {}
        for unit in self.units:
            unit.template = first.setdefault(unit.signature(), unit.id)

    def cast_inputs(self, args, kwargs):
        if self.param_dtype is None:
            return args, kwargs
        dtype = self.param_dtype

        def cast(x):
            return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

        return torch_private.tree_map(cast, args), torch_private.tree_map(cast, kwargs)

    # ---- FULL_SHARD: free after forward, regather for backward ---------------------------
    def register_full(self, rt: UnitRuntime, fulls: list[torch.Tensor]) -> None:
        for index, full in enumerate(fulls):
            if full.numel():
                self._full_storages.setdefault(_storage_key(full), []).append((rt, index, full))

    def unregister_full(self, rt: UnitRuntime) -> None:
        for key in list(self._full_storages):
            kept = [e for e in self._full_storages[key] if e[0] is not rt]
            if kept:
                self._full_storages[key] = kept
            else:
                del self._full_storages[key]

    def _pack(self, tensor: torch.Tensor):
        if tensor.numel() == 0 or tensor.layout != torch.strided or tensor.is_sparse:
            return tensor
        if type(tensor) not in (torch.Tensor, nn.Parameter) and not isinstance(tensor, torch_private.FakeTensor):
            return tensor  # a wrapper subclass (DTensor, a user's async collective result): not ours
        offset = tensor.storage_offset()
        for rt, index, full in self._full_storages.get(_storage_key(tensor), ()):
            start = full.storage_offset()
            if full.dtype == tensor.dtype and start <= offset < start + full.numel():
                return _SavedFull(rt, index, tensor.size(), tensor.stride(), offset - start)
        return tensor

    @staticmethod
    def _unpack(saved):
        if not isinstance(saved, _SavedFull):
            return saved
        full = saved.runtime.regathered_for_backward()[saved.index]
        return full.as_strided(saved.size, saved.stride, full.storage_offset() + saved.storage_offset)

    # ---- no_sync -------------------------------------------------------------------------
    @contextlib.contextmanager
    def no_sync(self):
        for rt in self.runtime.values():
            rt.ensure_accumulator()
        previous, self.sync_grads = self.sync_grads, False
        try:
            yield
        finally:
            self.sync_grads = previous

