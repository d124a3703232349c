"""The ``torch.compile`` backend ``"fsdp_compile"``: graph passes wired into AOTAutograd/Inductor.

Pipeline for one Dynamo graph:
0. ``passes.hoist_markers`` (Dynamo graph): markers inside checkpointed regions move in front of
   the region, whose body takes the full tensors as inputs.
1. ``passes.insert_collectives`` (Dynamo graph): param-use markers -> one gather per unit.
2. AOTAutograd traces forward + backward (the gather's backward is the reduce-scatter) into a
   joint graph; ``passes.reshard`` tags it (``functorch.config.joint_custom_pass``); the min-cut
   partitioner splits it according to the tags.
3. ``passes.bucketing`` (with ``bucket_bytes``) merges adjacent small units' gathers before
   AOTAutograd; ``passes.reorder`` moves each all-gather ``prefetch`` gathers earlier in the
   partitioned forward and backward graphs so that it overlaps compute, and (unless
   ``overlap_reductions=False``) ``passes.defer_reduce_waits`` lets each unit's gradient
   reduction overlap the next unit's backward.
4. ``passes.schedule_check`` records the collective schedule of each graph; the first call of
   each compiled graph compares the forward's and the backward's fingerprints across ranks (a
   clear error instead of a hang; ``consistency.py`` holds every cross-rank check).
5. The inner compiler (Inductor, or ``aot_eager`` for debugging) compiles both graphs; Inductor
   with ``INDUCTOR_DEFAULTS`` (its peak-memory reordering off: it would move our waits).

No pass reads or writes state per step: the only per-call work is clearing a unit's pending
``no_sync`` gradients once a graph has captured them.
"""
from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.fx

from fsdp_compile.passes.bucketing import bucket_gathers
from fsdp_compile.passes.defer_reduce_waits import defer_reduce_waits
from fsdp_compile.passes.hoist_markers import hoist_markers
from fsdp_compile.passes.insert_collectives import UnitGather, insert_collectives
from fsdp_compile.passes.reorder import prefetch_all_gathers
from fsdp_compile.passes.reshard import tag_reshard
from fsdp_compile.passes.schedule_check import Collective, collective_schedule

from . import ops, torch_private
from .kernels.traced import LOWERINGS, lowering_for_trace
from .config import ShardingStrategy
from .failures import named_failure, naming_collective_failures
from .log import get_logger
from .params import tree_state
from .registry import get_unit, live_units
from .consistency import Phase, call_units, graph_id, verify_schedule_across_ranks
from .unit import Unit

log = get_logger("compiler")


@dataclass
class CompiledGraphs:
    """What the backend produced for one Dynamo graph (read by ``explain`` and the tests)."""

    gathers: list[UnitGather]
    inner: str
    forward: Optional[torch.fx.GraphModule] = None
    backward: Optional[torch.fx.GraphModule] = None
    schedules: dict[str, list[Collective]] = field(default_factory=dict)
    joint_schedule: Optional[list[Collective]] = None  # forward then backward, before partitioning
    buckets: list[list[int]] = field(default_factory=list)  # unit ids merged per gather
    # units whose strategy reshards after forward but that stay gathered into backward here
    kept_gathered: list[str] = field(default_factory=list)


# Inductor options our graphs compile with (``backend(inductor_options=...)`` overrides them).
# ``reorder_for_peak_memory`` off: our passes place each gather, wait and reduction on purpose
# (passes/reorder.py, passes/defer_reduce_waits.py); Inductor's peak-memory reordering moved
# them (it pulled the first backward gather's wait in front of the output head's backward, and
# sank every deferred reduction's wait to the end of the backward). The A/B is in
# benchmarks/README.md ("What each default buys").
INDUCTOR_DEFAULTS = {"reorder_for_peak_memory": False}


class FSDPBackend:
    """``torch.compile(model, backend=FSDPBackend(...))``; ``fsdp_compile.backend(...)`` builds one."""

    def __init__(
        self, prefetch: int = 1, bucket_bytes: Optional[int] = None, inner: str = "inductor", copies: str = "auto",
        overlap_reductions: bool = True, keep_root_gathered: bool = True,
        inductor_options: Optional[dict] = None,
    ):
        if inner not in ("inductor", "aot_eager"):
            raise ValueError(f"fsdp_compile.backend: inner={inner!r}; use 'inductor' or 'aot_eager'")
        if copies != "auto" and copies not in LOWERINGS:
            raise ValueError(f"fsdp_compile.backend: copies={copies!r}; use 'auto' or one of {', '.join(LOWERINGS)}")
        if prefetch < 0:
            raise ValueError(f"fsdp_compile.backend: prefetch={prefetch} must be >= 0")
        if bucket_bytes is not None and bucket_bytes <= 0:
            raise ValueError(f"fsdp_compile.backend: bucket_bytes={bucket_bytes} must be positive or None")
        if inductor_options is not None:
            _check_inductor_options(inductor_options, inner)
        self.inductor_options = {**INDUCTOR_DEFAULTS, **(inductor_options or {})}
        self.prefetch = prefetch
        self.overlap_reductions = bool(overlap_reductions)
        self.keep_root_gathered = bool(keep_root_gathered)
        self.bucket_bytes = bucket_bytes
        self.inner = inner
        self.copies = None if copies == "auto" else copies

    def __call__(self, gm: torch.fx.GraphModule, example_inputs) -> Callable:
        lifted = hoist_markers(gm)
        gathers = insert_collectives(gm, _unit_resolver(gm, example_inputs))
        units = {g.unit_id: get_unit(g.unit_id) for g in gathers}
        log.debug("hoist_markers: %d parameter reads lifted out of checkpointed regions", lifted)
        log.debug("insert_collectives: %d gathers, units %s", len(gathers),
                  [units[g.unit_id].name or "<root>" for g in gathers])
        record = CompiledGraphs(gathers, self.inner)
        if self.bucket_bytes is not None:

            def make_bucket(unit_ids: list[int]) -> int:
                bucket = Unit.bucket([units[i] for i in unit_ids])
                # owned by the model's state (the registry is weak): freed with the model
                _state_of(units[unit_ids[0]]).bucket_units.append(bucket)
                units[bucket.id] = bucket
                return bucket.id

            record.buckets = bucket_gathers(gm, self.bucket_bytes, make_bucket)
            log.debug("bucketing (bucket_bytes=%d): %d buckets, units %s", self.bucket_bytes, len(record.buckets),
                      [[units[i].name or "<root>" for i in bucket] for bucket in record.buckets])
        states = {id(s): s for s in map(_state_of, units.values())}
        for state in states.values():
            state.compiled_graphs.append(record)
        state = next(iter(states.values()), None)
        # Every rank of the mesh compares schedules (both groups of a hybrid mesh); collectives
        # are named by their group's role, the same on every rank.
        group = state.groups.everyone if state is not None and state.groups is not None else None
        roles = state.groups.roles if state is not None and state.groups is not None else {}

        # FSDP2's root: its parameters are the first backward needs (the output head) and stay
        # gathered through the forward anyway (the embedding is read first): saving them costs
        # no peak memory and saves one all-gather. (A bucketed root is gathered by its bucket.)
        bucketed = {i for bucket in record.buckets for i in bucket}
        kept_root = next((
            u for i, u in units.items()
            if self.keep_root_gathered and u.name == "" and i not in bucketed and u.strategy.reshards_after_forward
        ), None)
        if kept_root is not None:
            record.kept_gathered.append("")
            log.debug("keep_root_gathered: the root unit stays gathered from forward to backward")

        def strategy_of(unit_id: Optional[int]) -> ShardingStrategy:
            if unit_id in units:
                unit = units[unit_id]
                return unit.strategy.kept_after_forward() if unit is kept_root else unit.strategy
            strategies = {u.strategy for u in units.values()}
            if len(strategies) != 1:
                raise RuntimeError(f"fsdp_compile: cannot tell which unit an all-gather belongs to ({strategies})")
            return strategies.pop()

        def joint_pass(joint: torch.fx.GraphModule, *args) -> torch.fx.GraphModule:
            tag_reshard(joint, strategy_of)
            joint.recompile()
            # Known before the first call (the backward is compiled lazily, at its first call):
            # the backward's collectives, in the joint graph after the forward's.
            record.joint_schedule = collective_schedule(joint, roles)
            log.debug("reshard: joint graph tagged; %d collectives forward and backward", len(record.joint_schedule))
            return joint

        def on_graph(graph: torch.fx.GraphModule, is_backward: bool) -> None:
            name = "backward" if is_backward else "forward"
            moved = prefetch_all_gathers(graph, self.prefetch)
            log.debug("reorder: %d all-gathers moved earlier in the %s graph (prefetch=%d)", moved, name, self.prefetch)
            if is_backward and self.overlap_reductions:
                deferred = defer_reduce_waits(graph)
                log.debug("defer_reduce_waits: %d reduction waits deferred in the backward graph", deferred)
            setattr(record, name, graph)
            record.schedules[name] = collective_schedule(graph, roles)
            log.info("compiled the %s graph (inner=%s): %d collectives: %s", name, self.inner,
                     len(record.schedules[name]), _kinds(record.schedules[name]))

        with torch_private.joint_custom_pass(joint_pass), lowering_for_trace(self.copies):
            compiled = _compile_inner(
                self.inner, gm, example_inputs, on_graph, self.inductor_options, _guard_backward(record, units)
            )
        return _wrap_call(compiled, record, units, group)


def _kinds(schedule: list[Collective]) -> str:
    """``"2 all_gather_into_tensor, 1 reduce_scatter_tensor"``: the schedule's collectives by kind."""
    counts: dict[str, int] = {}
    for c in schedule:
        counts[c.kind] = counts.get(c.kind, 0) + 1
    return ", ".join(f"{n} {kind}" for kind, n in counts.items()) or "none"


def _unit_resolver(gm: torch.fx.GraphModule, example_inputs) -> Callable[[int, tuple], int]:
    """``(template, shard nodes) -> unit id``: the unit whose flat buffer holds the example input
    of a shard placeholder (the unit this graph is traced for; another block of the same
    template may run the graph later). Falls back to the template."""
    values = dict(zip((n for n in gm.graph.nodes if n.op == "placeholder"), example_inputs))

    def resolve(template: int, shard_nodes: tuple) -> int:
        candidates = [u for u in live_units() if u.template == template and u.local_flat is not None]
        for node in shard_nodes:
            value = values.get(node)
            if isinstance(value, torch.Tensor) and value.numel() and not isinstance(value, torch_private.FakeTensor):
                ptr = value.untyped_storage().data_ptr()
                for unit in candidates:
                    if unit.local_flat.untyped_storage().data_ptr() == ptr:
                        return unit.id
        return template

    return resolve


def _check_inductor_options(options: dict, inner: str) -> None:
    if inner != "inductor":
        raise ValueError(f"fsdp_compile.backend: inductor_options apply to inner='inductor', not inner={inner!r}")
    unknown = sorted(k for k in options if k not in torch_private.inductor_config_keys())
    if unknown:
        raise ValueError(
            f"fsdp_compile.backend: inductor_options has unknown torch._inductor.config keys {unknown}"
        )


def _compile_inner(
    inner: str, gm, example_inputs, on_graph, inductor_options: Optional[dict] = None,
    guard_backward: Callable[[Callable], Callable] = lambda f: f,
) -> Callable:
    """The Dynamo graph compiled by AOTAutograd and ``inner``; ``on_graph`` sees each partitioned
    graph, ``guard_backward`` wraps the compiled backward's (boxed) call."""
    from functorch.compile import min_cut_rematerialization_partition

    if inner == "aot_eager":
        from functorch.compile import make_boxed_func

        def recording(is_backward):
            def compiler(graph, inputs):
                on_graph(graph, is_backward)
                boxed = make_boxed_func(graph.forward)
                return guard_backward(boxed) if is_backward else boxed

            return compiler

        return torch_private.aot_autograd(
            fw_compiler=recording(False),
            bw_compiler=recording(True),
            partition_fn=min_cut_rematerialization_partition,
            keep_inference_input_mutations=True,
        )(gm, example_inputs)

    def inner_compile(graph, inputs, **kwargs):
        is_backward = bool(kwargs.get("is_backward", False))
        on_graph(graph, is_backward)
        out = torch_private.compile_fx_inner(graph, inputs, **kwargs)
        if is_backward and hasattr(out, "current_callable"):  # in place: AOTAutograd may cache it
            out.current_callable = guard_backward(out.current_callable)
        elif is_backward:
            out = guard_backward(out)
        return out

    # config_patches also reach the backward, which Inductor compiles lazily at its first call
    return torch_private.compile_fx(
        gm, example_inputs, inner_compile=inner_compile, config_patches=inductor_options or None
    )


def _state_of(unit: Unit):
    """The ``FSDPState`` of ``unit``'s model (a bucket's: its first member's)."""
    return tree_state(unit.module)


def _collective_state(units: dict):
    """The runtime state of a graph's communicating units (None when none communicates)."""
    return next((_state_of(u) for u in units.values() if u.spec.communicates or u.spec.replicates), None)


def _weak_state(units: dict) -> Callable[[], object]:
    """``_collective_state(units)``, held weakly: what a compiled graph's call wrappers keep.
    Dynamo's code cache keeps compiled graphs after their model is gone (until
    ``torch._dynamo.reset()``); through these wrappers it must not keep the model."""
    state = _collective_state(units)
    return (lambda: None) if state is None else weakref.ref(state)


def _guard_backward(record: CompiledGraphs, units: dict) -> Callable[[Callable], Callable]:
    """Wraps a compiled backward's boxed call (which the autograd engine runs): a collective
    failure becomes a ``CollectiveError`` naming the graph's units, and any error abandons this
    rank's collectives (``FSDPState.abandon``) so that the other ranks stop at once. The
    engine re-raises it from the user's ``backward()`` as it is."""
    names = ", ".join(repr(units[g.unit_id].name or "<root>") for g in record.gathers)
    state_of = _weak_state(units)

    def guard(compiled_backward: Callable) -> Callable:
        def run(args):
            try:
                return compiled_backward(args)
            except Exception as error:
                failure = named_failure(f"the compiled backward of units {names}", error)
                state = state_of()
                if state is not None:
                    state.abandon("compiled backward", failure)
                if failure is error:
                    raise
                raise failure from error

        return torch_private.set_boxed_call(run)

    return guard


def _wrap_call(compiled: Callable, record: CompiledGraphs, units: dict, group) -> Callable:
    """Per call: the ranks' lockstep check (``consistency.check_lockstep``: same phase, same
    gradient mode, same graph, same units gathered); when any rank runs its graph for the first time, every rank
    compares its graph's forward and backward collective schedules; a pre-hook on the call's
    backward node checks again before its backward's collectives (a rank that called a graph
    more often than another meets the other's backward there, instead of hanging); after each
    call, drop pending ``no_sync`` gradients the graph has consumed (it holds them until its
    backward). One graph may serve several units (identical blocks compiled one by one):
    what a call consumed is found among its inputs, not from the units it was traced for."""
    has_pending = any(g.mode == ops.GradMode.SYNC_PENDING for g in record.gathers)
    state_of = _weak_state(units)  # the model, its state and this record die together
    record_of = weakref.ref(record)
    names = ", ".join(repr(units[g.unit_id].name or "<root>") for g in record.gathers if g.unit_id in units)
    checked = False
    this_graph = 0  # graph_id of the schedules, computed at the first call (they exist by then)
    shard_inputs: Optional[list[int]] = None  # which inputs are units' shards (consistency.call_units)

    def check_backward(units_key: int):
        def hook(grad_outputs):
            state = state_of()
            if state is None:
                return
            units_read = state.call_names.get(units_key) or state.graph_names.get(this_graph) or "none"
            state.check_lockstep(Phase.BACKWARD, f"the compiled backward of units {units_read}", this_graph, units=units_key)

        return hook

    @functools.wraps(compiled)
    def run(*args):
        nonlocal checked, this_graph, shard_inputs
        state, record = state_of(), record_of()
        first_call = not checked
        inputs = args[0] if len(args) == 1 and isinstance(args[0], list) else args
        units_key = 0
        if state is not None:
            if not this_graph:
                collectives = (record.schedules.get("forward") or []) + (record.joint_schedule or [])
                this_graph = graph_id([c.fingerprint for c in collectives])
                state.graph_names[this_graph] = names
            if state.check_ranks:  # which units this call gathers (a shared graph serves several)
                units_key, shard_inputs = call_units(state, inputs, shard_inputs)
            first_call = state.check_lockstep(Phase.FORWARD, "a compiled forward", this_graph, first_call, units_key)
        if first_call and group is not None and record is not None:
            # The joint graph holds the backward's collectives too: a rank whose backward
            # differs (e.g. it froze a unit) fails here, before the backward could hang on a
            # collective the others never issue.
            with naming_collective_failures("the cross-rank check of the compiled graphs"):
                verify_schedule_across_ranks(record.schedules.get("forward", []), group, "forward")
                if record.joint_schedule is not None:
                    verify_schedule_across_ranks(record.joint_schedule, group, "forward+backward (joint)")
            log.debug("schedule_check: the forward and joint collective schedules are the same on all %d ranks",
                      group.size())
            checked = True
        taken = {id(a) for a in inputs if isinstance(a, torch.Tensor)} if has_pending else ()
        try:
            out = compiled(*args)
        except Exception as error:
            failure = named_failure("a compiled forward graph", error)
            if state is not None:  # stopped between collectives: the other ranks must not wait
                state.abandon("compiled forward", failure)
            if failure is error:
                raise
            raise failure from error
        if has_pending:
            for rt in state.runtime.values() if state is not None else ():
                rt.drop_pending_taken(taken)
        if state is not None and record is not None and record.joint_schedule and state.check_ranks and torch.is_grad_enabled():
            node = next((t.grad_fn for t in out if isinstance(t, torch.Tensor) and t.grad_fn is not None), None)
            if node is not None:
                node.register_prehook(check_backward(units_key))
        return out

    return torch_private.set_boxed_call(run, torch_private.is_boxed_call(compiled))


def backend(
    prefetch: int = 1, bucket_bytes: Optional[int] = None, inner: str = "inductor", copies: str = "auto",
    overlap_reductions: bool = True, keep_root_gathered: bool = True, inductor_options: Optional[dict] = None,
) -> FSDPBackend:
    """A configured backend: ``torch.compile(model, backend=fsdp_compile.backend(inner="aot_eager"))``.

    ``copies``: what the copy-in/copy-out ops become in the compiled graphs: ``"auto"`` (by
    device), ``"triton"`` (``wrap_triton`` launches), ``"aten"`` (plain ATen ops Inductor
    generates code for) or ``"fused"`` (one opaque op per copy).

    ``overlap_reductions`` (on by default): ``passes.defer_reduce_waits`` lets each unit's
    gradient reduction overlap the next unit's backward, at the cost of one more packed gradient
    buffer in flight (benchmarks/README.md has the A/B). ``False`` waits for each reduction
    right after its issue. ``keep_root_gathered``: the root unit stays gathered from forward to backward
    (FSDP2's root). ``inductor_options``: entries of ``torch._inductor.config`` for our graphs'
    Inductor compile, over ``INDUCTOR_DEFAULTS`` (``{"reorder_for_peak_memory": False}``:
    Inductor would move the waits our passes place)."""
    return FSDPBackend(
        prefetch=prefetch, bucket_bytes=bucket_bytes, inner=inner, copies=copies,
        overlap_reductions=overlap_reductions, keep_root_gathered=keep_root_gathered,
        inductor_options=inductor_options,
    )


def fsdp_compile_backend(gm: torch.fx.GraphModule, example_inputs) -> Callable:
    """The ``"fsdp_compile"`` backend with default options (registered by entry point)."""
    return FSDPBackend()(gm, example_inputs)
