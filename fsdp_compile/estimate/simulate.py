"""``estimate(...)``: one compiled training step of a sharded model at any world size, simulated in
this process under torch's fake process group and fake tensors (no real memory, no
communication).

For each traced rank: the model is built on the meta device, ``fully_shard`` shards it under
``init_process_group("fake", ...)`` (a ``(replicate, shard)`` ``DeviceMesh`` for HSDP) inside a
``FakeTensorMode`` (so materializing it allocates nothing), ``torch.compile(backend=
fsdp_compile.backend(inner="aot_eager"))`` traces one forward and backward on a fake batch, and
the backend's records give the partitioned graphs and their collective schedules. The fake
group is destroyed and Dynamo reset afterwards.

What is reported per rank:

- ``param_bytes``: the shards as the rank allocates them: every parameter of a unit takes
  ``ceil(D / S)`` rows of its dim 0 ``D`` in the unit's local flat buffer (``S``: the shard
  group's size; padding included, so every rank allocates the same), in the shards' dtype;
- ``grad_bytes``: the reduced gradient shards, the same padded size in the shards' dtype (each
  unit's gradients are views of its reduce-scatter's output);
- ``optimizer_bytes``: the optimizer's state, shaped like the rank's actual (unpadded) shards:
  AdamW/Adam two tensors per parameter plus its 4-byte ``step``; SGD with momentum one;
- ``buffer_bytes``: the module's buffers (not sharded);
- ``peak_bytes``: params + buffers + optimizer state + the step's transient peak, walked node by
  node over the compiled forward then backward graph (``memory.py``: gathered units in flight,
  saved activations, reduce buffers, gradients made so far); ``peak`` names its node;
- ``collectives_per_step`` and ``bytes_sent_per_step``: from the compiled schedules. Bytes sent
  follow the ring model: an all-gather whose output is ``N`` bytes over a group of ``G`` ranks
  sends ``(G-1)/G * N`` per rank; a reduce-scatter of an ``N``-byte input ``(G-1)/G * N``; an
  all-reduce of ``N`` bytes ``2 (G-1)/G * N``; an all-to-all of ``N`` bytes ``(G-1)/G * N``.

``"max"`` is the largest of each field over every rank of the world: the closed-form fields
(params, grads, optimizer state, buffers) are computed for every rank from the layouts; the
traced ones (the transient peak, collectives) come from the traced ranks (``trace_ranks``):
every rank compiles the same graphs (the shards are padded to the same size), which
``schedule_fingerprint`` compares.

``compile="per-block"``: every policy block ``block.compile(backend=..., fullgraph=True)``
(as torchtitan compiles), the rest of the step eager (``per_block.py`` stitches the memory
curve and the schedule from the eager ops and the blocks' graphs). ``tp``: ranks laid out
``(replicate, shard, tp)``; each Llama block is ``parallelize_module``d over the tp mesh
(``models.llama_tp_plan``) before ``fully_shard`` shards the TP-local tensors over the dp dims;
the TP collectives (DTensor's) are reported under the ``"tp"`` group.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from fsdp_compile import torch_private

from .memory import Point, Timeline, returned_gathered, walk_graph
from .models import default_seq, resolve_factory, unit_classes, vocab_of

log = logging.getLogger("fsdp_compile.estimate")

_WRAPPED = "_checkpoint_wrapped_module."
_OPT_STATES = {"adamw": 2, "adam": 2, "sgd": 1, "none": 0}


@dataclass
class RankReport:
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    buffer_bytes: int
    peak_bytes: int
    collectives_per_step: int
    bytes_sent_per_step: int
    step_peak_bytes: int = 0  # the transient part of the peak (above params, buffers, optimizer)
    param_bytes_owned: int = 0  # this rank's own rows only (no padding)
    peak: Optional[dict] = None  # where the peak is: phase, node, op, index

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Estimate:
    model: str
    world_size: int
    mesh: tuple[int, int]  # (replicas, ranks per replica); (1, W) for 1-D
    strategy: str
    dtype: dict
    activation_checkpointing: bool
    batch: int
    seq: int
    param_shapes: dict[str, list[int]]
    units: int
    unit_names: list[str]
    ranks: dict[str, RankReport]
    collectives: dict[str, dict]  # group role -> {"count", "bytes", "sent", by phase and kind}
    schedule: list[dict]  # the collectives in order: phase, kind, bytes, dtype, group
    fingerprints: dict[str, str]  # traced rank -> schedule fingerprint
    schedules_equal: bool  # every traced rank compiled the same collective schedule
    timeline: list[Point] = field(default_factory=list)
    seconds: float = 0.0
    tp: int = 1  # tensor-parallel ranks per data-parallel rank (world = replicas x shard x tp)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["ranks"] = {k: v.to_json() for k, v in self.ranks.items()}
        out["timeline"] = [[p.phase, p.index, p.node, p.bytes] for p in self.timeline]
        return out

    def table(self) -> str:
        from .report import table

        return table(self)

    def plot(self, path: str) -> None:
        from .report import plot

        plot(self, path)


def estimate(
    model: Union[str, Callable[[], nn.Module]],
    world_size: int,
    mesh: Union[None, str, Sequence[int]] = None,
    strategy: str = "FULL_SHARD",
    bf16: bool = False,
    activation_checkpointing: bool = False,
    batch: int = 1,
    seq: Optional[int] = None,
    optimizer: str = "adamw",
    trace_ranks: Sequence[int] = (0,),
    prefetch: int = 1,
    backend: str = "nccl",
    policy: Optional[set] = None,
    compile: str = "model",
    tp: int = 1,
) -> Estimate:
    """Simulate one compiled training step of ``model`` sharded over ``world_size`` ranks.

    ``model``: ``"llama3-8b"``, ``"llama3-70b"``, ``"readme-gpt"``, ``"pkg.module:factory"``
    or a zero-argument callable building the ``nn.Module`` (on the meta device: it is called
    under ``torch.device("meta")``); its ``forward(idx, targets)`` must return the loss, ``idx``
    and ``targets`` being ``(batch, seq)`` token ids below its first embedding's size.
    ``mesh``: ``"RxS"`` or ``(R, S)`` for HSDP (``R`` replicas of ``S`` ranks, ``R * S ==
    world_size``). ``bf16``: ``MixedPrecision(param_dtype=bfloat16, reduce_dtype=float32)``
    over float32 shards. ``policy``: the unit classes (default: the classes of the entries of
    the model's ``nn.ModuleList``s). ``backend``: the collectives' backend modelled:
    ``"nccl"`` (native reduce-scatter) or ``"gloo"`` (our all-to-all reduce-scatter, and gloo's
    all-gather temporaries in the memory curve). ``trace_ranks``: the ranks traced (each one
    trace). ``compile``: ``"model"`` (``torch.compile(model)``) or ``"per-block"`` (every
    unit-class module compiled on its own, ``fullgraph=True``; the root's ops eager). ``tp``:
    tensor-parallel ranks per data-parallel rank (``world_size = R * S * tp``; the named Llama
    models' blocks get the Megatron plan: q, k, v, w1, w3 column-wise, o, w2 row-wise; a model
    without a plan raises). Runs in this process; raises if a default process group already exists (the
    simulation needs its own fake one), and leaves none behind."""
    from fsdp_compile.config import ShardingStrategy

    start = time.perf_counter()
    if dist.is_initialized():
        raise RuntimeError(
            "fsdp_compile.estimate simulates the ranks under its own fake default process group, "
            "but this process already has one; call estimate before init_process_group, or in "
            "another process (python -m fsdp_compile.estimate ...)"
        )
    if world_size < 1:
        raise ValueError(f"fsdp_compile.estimate: world_size={world_size} must be >= 1")
    if tp < 1 or world_size % tp:
        raise ValueError(f"fsdp_compile.estimate: tp={tp} must be >= 1 and divide world_size={world_size}")
    replicas, per_replica = _parse_mesh(mesh, world_size // tp)
    strategy = ShardingStrategy.parse(strategy)
    if optimizer not in _OPT_STATES:
        raise ValueError(f"fsdp_compile.estimate: optimizer={optimizer!r}; use one of {sorted(_OPT_STATES)}")
    if compile not in ("model", "per-block"):
        raise ValueError(f"fsdp_compile.estimate: compile={compile!r}; use 'model' or 'per-block'")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"fsdp_compile.estimate: backend={backend!r}; use 'nccl' or 'gloo'")
    bad = [r for r in trace_ranks if not 0 <= r < world_size]
    if bad or not trace_ranks:
        raise ValueError(f"fsdp_compile.estimate: trace_ranks={list(trace_ranks)} must be ranks in [0, {world_size})")
    name, factory = resolve_factory(model)
    traces = {
        r: _trace_rank(
            r, factory, world_size, (replicas, per_replica) if mesh is not None else None, strategy, bf16,
            activation_checkpointing, batch, seq, prefetch, backend, policy, compile, tp,
        )
        for r in trace_ranks
    }
    first = traces[trace_ranks[0]]
    est = _report(name, world_size, (replicas, per_replica), first, traces, optimizer, bf16,
                  activation_checkpointing, batch, tp)
    est.seconds = time.perf_counter() - start
    return est


def _parse_mesh(mesh, world_size: int) -> tuple[int, int]:
    if mesh is None:
        return 1, world_size
    if isinstance(mesh, str):
        try:
            dims = tuple(int(d) for d in mesh.lower().split("x"))
        except ValueError:
            dims = ()
    else:
        dims = tuple(int(d) for d in mesh)
    if len(dims) != 2 or dims[0] < 1 or dims[1] < 1:
        raise ValueError(f"fsdp_compile.estimate: mesh={mesh!r}; pass 'RxS' (replicas x ranks per replica), e.g. '8x32'")
    if dims[0] * dims[1] != world_size:
        raise ValueError(
            f"fsdp_compile.estimate: mesh {dims[0]}x{dims[1]} has {dims[0] * dims[1]} ranks but "
            f"world_size={world_size}"
        )
    return dims


@dataclass
class _Trace:
    rank: int
    model: nn.Module
    units: list  # fsdp_compile Units (their layouts, specs, dtypes)
    records: list  # CompiledGraphs
    buffer_bytes: int
    seq: int
    timeline: Timeline
    schedule: list  # (phase, Collective)
    group_sizes: dict[str, int]


def _zero_init(module: nn.Module) -> None:
    """Fake tensors carry no values: any write initializes them."""
    for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
        t.zero_()


def _trace_rank(rank, factory, world, mesh_dims, strategy, bf16, ac, batch, seq, prefetch, backend, policy,
                compile_mode, tp) -> _Trace:
    from fsdp_compile.api import fully_shard, root_state
    from fsdp_compile.compiler import FSDPBackend
    from fsdp_compile.config import MixedPrecision
    from fsdp_compile.explain import sharding_info
    from fsdp_compile.testing.levers import set_reduce_scatter

    dist.init_process_group("fake", store=torch_private.fake_store(), rank=rank, world_size=world)
    try:
        device_mesh, tp_mesh = _meshes(world, mesh_dims, tp)
        with torch.device("meta"):
            model = factory()
        if not isinstance(model, nn.Module):
            raise TypeError(f"fsdp_compile.estimate: the model factory returned {type(model).__name__}, not an nn.Module")
        if tp_mesh is not None:
            _parallelize(model, tp_mesh)
        classes = set(policy) if policy is not None else unit_classes(model)
        seq = seq or default_seq(model)
        vocab = vocab_of(model)
        if ac and classes:
            torch_private.apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, tuple(classes)))
        mp = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
        # allow_non_fake_inputs: a checkpointed recompute replays the real RNG state tensor
        with torch_private.FakeTensorMode(allow_non_fake_inputs=True):
            init = _zero_init
            if tp_mesh is not None:  # fully_shard's meta init builds plain tensors, not DTensors
                model.to_empty(device="cpu")
                init = None
            fully_shard(
                model, device_mesh=device_mesh, policy=classes or None, strategy=strategy, mixed_precision=mp,
                param_init_fn=init, check_ranks=False,
            )
            if backend == "gloo":  # what fully_shard picks on a gloo group (collectives.py)
                set_reduce_scatter(model, "all_to_all")
            fsdp_backend = FSDPBackend(inner="aot_eager", prefetch=prefetch)
            idx, targets = torch.randint(0, vocab, (batch, seq)), torch.randint(0, vocab, (batch, seq))
            if compile_mode == "per-block":
                timeline, schedule = _per_block_step(model, classes, fsdp_backend, idx, targets, backend == "gloo")
            else:
                compiled = torch.compile(model, backend=fsdp_backend, fullgraph=False)
                compiled(idx, targets).backward()
        info = sharding_info(model)
        groups = root_state(model).groups if info.units else None
        group_sizes = {"shard": groups.shard_size if groups else 1, "replicate": groups.replicate_size if groups else 1,
                       "tp": tp}
        if compile_mode != "per-block":
            timeline, schedule = _walk(info.compiled_graphs, backend == "gloo")
        buffer_bytes = sum(b.untyped_storage().nbytes() for b in model.buffers())
        return _Trace(rank, model, list(info.units), list(info.compiled_graphs), buffer_bytes, seq, timeline,
                      schedule, group_sizes)
    finally:
        dist.destroy_process_group()
        torch.compiler.reset()


def _meshes(world: int, mesh_dims, tp: int):
    """(the data-parallel ``DeviceMesh`` ``fully_shard`` takes or None, the tp mesh or None):
    ranks laid out ``(replicate, shard, tp)``, tp innermost as torchtitan lays them out."""
    from torch.distributed.device_mesh import init_device_mesh

    names = ("replicate", "shard") if mesh_dims is not None else ("shard",)
    shape = tuple(mesh_dims) if mesh_dims is not None else (world // tp,)
    if tp == 1:
        return (init_device_mesh("cpu", shape, mesh_dim_names=names) if mesh_dims is not None else None), None
    full = init_device_mesh("cpu", (*shape, tp), mesh_dim_names=(*names, "tp"))
    dp = full[names]
    if dp.ndim > 1:  # fully_shard flattens it (its checks' group): here, not under FakeTensorMode
        dp._flatten()
    return dp, full["tp"]


def _parallelize(model: nn.Module, tp_mesh) -> None:
    from torch.distributed.tensor.parallel import parallelize_module

    from .models import tp_plan_of

    plans = tp_plan_of(model)
    if not plans:
        raise ValueError(
            f"fsdp_compile.estimate: tp={tp_mesh.size()} needs a tensor-parallel plan, and "
            f"{type(model).__name__} has none (the named Llama models have one: LlamaBlock)"
        )
    tp = tp_mesh.size()
    for module, plan in plans.items():
        for attr in ("heads", "kv_heads"):
            if getattr(module, attr, tp) % tp:
                raise ValueError(
                    f"fsdp_compile.estimate: tp={tp} must divide the attention's {attr}={getattr(module, attr)}"
                )
        parallelize_module(module, tp_mesh, plan)


def _per_block_step(model, classes, fsdp_backend, idx, targets, gloo: bool) -> tuple[Timeline, list]:
    """Every policy block compiled on its own (``per_block.py``): one untracked step compiles
    the blocks' forward and backward graphs, a second one is tracked."""
    from fsdp_compile.api import root_state
    from fsdp_compile.explain import sharding_info

    from .per_block import StepTracker, compile_blocks

    if not classes:
        raise ValueError("fsdp_compile.estimate: compile='per-block' needs unit classes (policy=) to compile")
    info = sharding_info(model)
    current: list = [None]
    compile_blocks(model, classes, fsdp_backend, lambda: current[0], root_state(model).compiled_graphs)
    model(idx, targets).backward()
    for p in model.parameters():
        p.grad = None
    steady = {torch_private.storage_id(t) for t in [
        idx, targets, *model.parameters(), *model.buffers(), *(u.local_flat for u in info.units)]}
    groups = root_state(model).groups
    tracker = StepTracker(steady, groups.roles if groups is not None else {}, gloo)
    current[0] = tracker
    with tracker:
        loss = model(idx, targets)
        tracker.phase = "backward"
        loss.backward()
    current[0] = None
    end = tracker.timeline.points[-1].bytes if tracker.timeline.points else 0
    tracker.timeline.points.append(Point("optimizer", 0, "optimizer.step", "step", end))
    return tracker.timeline, tracker.schedule


def _walk(records, gloo: bool) -> tuple[Timeline, list]:
    """Forward graphs in order, then backward graphs in reverse (autograd's order)."""
    timeline, live, schedule = Timeline(), {}, []
    for record in records:
        if record.forward is None:
            raise RuntimeError("fsdp_compile.estimate: a compiled graph has no forward graph (nothing was traced)")
        walk_graph(record.forward, "forward", live, timeline, free_inputs=False, gloo_temporaries=gloo)
        schedule += [("forward", c) for c in record.schedules.get("forward", [])]
    if any(record.backward is None for record in records):
        raise RuntimeError("fsdp_compile.estimate: a compiled graph's backward did not run (no loss gradient?)")
    if records:  # the gathered tensors the last graph returns (memory.py): dropped, zero gradients live
        unread, zeros = returned_gathered(records[-1].forward, records[-1].backward)
        for key in unread:
            live.pop(key, None)
        live.update(zeros)
    for record in reversed(records):
        walk_graph(record.backward, "backward", live, timeline, free_inputs=True, gloo_temporaries=gloo)
        schedule += [("backward", c) for c in record.schedules.get("backward", [])]
    end = timeline.points[-1].bytes if timeline.points else 0
    timeline.points.append(Point("optimizer", 0, "optimizer.step", "step", end))
    return timeline, schedule


def _sent(kind: str, input_bytes: int, size: int) -> int:
    """Bytes one rank sends for one collective (ring model; see the module docstring)."""
    if size <= 1:
        return 0
    if kind.startswith("all_gather"):
        return (size - 1) * input_bytes  # output = size * input; (G-1)/G of it
    if kind.startswith("all_reduce"):
        return 2 * (size - 1) * input_bytes // size
    return (size - 1) * input_bytes // size  # reduce-scatter, all-to-all


def schedule_fingerprint(schedule) -> str:
    """A digest of ``(phase, kind, bytes, dtype, group)`` of every collective, in order."""
    text = repr([(phase, *c.fingerprint) for phase, c in schedule])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _per_rank_sums(units, shard_size: int) -> tuple[list[int], list[int], int]:
    """For every shard rank ``s``: (bytes of its own rows, elements of its own rows); and the
    number of parameters."""
    import numpy as np

    owned_bytes = np.zeros(shard_size, dtype=np.int64)
    owned_numel = np.zeros(shard_size, dtype=np.int64)
    ranks = np.arange(shard_size, dtype=np.int64)
    nparams = 0
    for unit in units:
        elem = unit.local_flat.element_size()
        for p, shape in zip(unit.layout.params, unit.orig_shapes):
            nparams += 1
            if len(shape) == 0 or unit.layout.replicated:
                numel = np.full(shard_size, max(1, p.full_numel) if len(shape) else 1, dtype=np.int64)
            else:
                start = np.minimum(ranks * p.chunk_rows, p.dim0)
                rows = np.minimum(start + p.chunk_rows, p.dim0) - start
                numel = rows * p.row_numel
            owned_numel += numel
            owned_bytes += numel * elem
    return owned_bytes.tolist(), owned_numel.tolist(), nparams


def _report(name, world, mesh_dims, first: _Trace, traces, optimizer, bf16, ac, batch, tp) -> Estimate:
    units = first.units
    shard_size = first.group_sizes["shard"]
    padded = sum(u.layout.local_numel * u.local_flat.element_size() for u in units)
    owned_bytes, _, nparams = _per_rank_sums(units, shard_size)
    states = _OPT_STATES[optimizer]
    step_bytes = 4 * nparams if states and optimizer != "sgd" else 0
    buffer_bytes = first.buffer_bytes

    collectives: dict[str, dict] = {}
    for phase, c in first.schedule:
        size = first.group_sizes.get(c.group, 1)
        entry = collectives.setdefault(c.group, {"group_size": size, "count": 0, "bytes": 0, "sent": 0, "by_kind": {}})
        kind = entry["by_kind"].setdefault(f"{phase}:{c.kind}", {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += c.input_bytes
        entry["sent"] += _sent(c.kind, c.input_bytes, size)
        kind["count"] += 1
        kind["bytes"] += c.input_bytes
    count = sum(e["count"] for e in collectives.values())
    sent = sum(e["sent"] for e in collectives.values())

    def rank_report(shard_rank: int, trace: _Trace) -> RankReport:
        opt = states * owned_bytes[shard_rank] + step_bytes
        peak = trace.timeline.peak
        steady = padded + buffer_bytes + opt
        return RankReport(
            param_bytes=padded, grad_bytes=padded, optimizer_bytes=opt, buffer_bytes=buffer_bytes,
            peak_bytes=steady + peak.bytes, collectives_per_step=count, bytes_sent_per_step=sent,
            step_peak_bytes=peak.bytes, param_bytes_owned=owned_bytes[shard_rank],
            peak={"phase": peak.phase, "index": peak.index, "node": peak.node, "op": peak.op},
        )

    ranks = {str(r): rank_report(r // tp % shard_size, t) for r, t in traces.items()}
    ranks.setdefault("0", ranks[str(first.rank)])
    worst_shard_rank = max(range(shard_size), key=lambda s: owned_bytes[s])
    worst_trace = max(traces.values(), key=lambda t: t.timeline.peak.bytes)
    ranks["max"] = rank_report(worst_shard_rank, worst_trace)
    ranks["max"].param_bytes_owned = max(owned_bytes)
    ranks["max"].peak = dict(ranks["max"].peak, rank=f"shard rank {worst_shard_rank}, traced rank {worst_trace.rank}")

    fingerprints = {str(r): schedule_fingerprint(t.schedule) for r, t in traces.items()}
    if len(set(fingerprints.values())) > 1:
        log.warning(
            "fsdp_compile.estimate: the traced ranks compiled different collective schedules %s: the model's "
            "forward depends on the rank, and a real job would hang or fail the schedule check", fingerprints,
        )
    dtype = {"shards": str(units[0].shard_dtype).replace("torch.", "") if units else "float32",
             "gather": str(units[0].gather_dtype).replace("torch.", "") if units else "float32",
             "reduce": str(units[0].reduce_dtype).replace("torch.", "") if units else "float32"}
    return Estimate(
        model=name, world_size=world, mesh=tuple(mesh_dims), strategy=units[0].strategy.name if units else "",
        dtype=dtype, activation_checkpointing=ac, batch=batch, seq=first.seq,
        param_shapes={p.fqn.replace(_WRAPPED, ""): list(s) for u in units for p, s in zip(u.layout.params, u.orig_shapes)},
        units=len(units), unit_names=[u.name.replace(_WRAPPED, "") for u in units],
        ranks=ranks, collectives=collectives,
        schedule=[{"phase": phase, "kind": c.kind, "bytes": c.input_bytes, "dtype": c.dtype, "group": c.group}
                  for phase, c in first.schedule],
        fingerprints=fingerprints,
        schedules_equal=len(set(fingerprints.values())) == 1,
        timeline=first.timeline.points, tp=tp,
    )


__all__ = ["Estimate", "RankReport", "estimate", "schedule_fingerprint"]
