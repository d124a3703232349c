"""One step of a per-block compiled model (every policy block ``block.compile(backend=...,
fullgraph=True)``, the rest eager), simulated: its memory curve and its collectives in the
order they run.

Part of the step is eager (the root unit's gather, the embedding, the head, the loss) and part
runs compiled graphs, so the curve is stitched from two sources:

- eager ops, and the compiled backward graphs (AOTAutograd runs them from the autograd engine
  as plain Python), are seen by ``StepTracker``, a ``TorchDispatchMode``: every op's output
  storage is live from the op until Python frees it (a storage's weak reference expires), and
  every ``_c10d_functional`` collective is recorded;
- a compiled block's forward runs with the mode suspended (Dynamo does not run compiled code
  under a dispatch mode): its partitioned forward graph is walked node by node (``memory.py``)
  on top of what is live, its collectives are its record's forward schedule, and the
  activations it saves for backward (its graph's outputs beyond what the block returns, less
  the gathered parameters its post-forward hook drops: ``memory.returned_gathered``) stay
  counted until the block's backward has produced the gradient of its input; that backward's
  inputs (the zero gradients autograd materializes for those gathered outputs among them) are
  counted from its start.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.multiprocessing.reductions import StorageWeakRef

from fsdp_compile import torch_private
from fsdp_compile.passes.schedule_check import Collective

from .memory import Point, Timeline, _storages, returned_gathered, walk_graph

_COLLECTIVES = ("all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce", "all_to_all_single")


def _tensors(value) -> list[torch.Tensor]:
    return [t for t in torch_private.tree_leaves(value) if isinstance(t, torch.Tensor)]


class StepTracker(torch_private.TorchDispatchMode):
    """Transient bytes over one step (see the module docstring). ``steady``: storages alive
    before the step (shards, buffers, the batch), never counted."""

    def __init__(self, steady: set[int], roles: dict[str, str], gloo: bool):
        super().__init__()
        self.steady, self.roles, self.gloo = steady, roles, gloo
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.saved = 0  # compiled forwards' saved activations not yet consumed by their backward
        self.grads = 0  # gradient shards the compiled backwards returned
        self.temporaries: dict[int, int] = {}  # gloo all-gather output storage -> its temporary's bytes
        self.phase = "forward"
        self.paused = 0  # > 0: a compiled block's backward is being walked instead (_Backward)
        self.timeline = Timeline()
        self.schedule: list[tuple[str, Collective]] = []

    @property
    def total(self) -> int:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            del self.live[key]
        return sum(n for _, n in self.live.values()) + self.saved + self.grads + sum(self.temporaries.values())

    def add(self, tensors) -> None:
        for t in tensors:
            storage = t.untyped_storage()
            key = torch_private.storage_id(storage)
            if key not in self.live and key not in self.steady:
                self.live[key] = (StorageWeakRef(storage), storage.nbytes())

    def point(self, node: str, op: str) -> None:
        self.timeline.points.append(Point(self.phase, len(self.timeline.points), node, op, self.total))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.paused:
            return out
        name = torch_private.op_schema_name(func).split("::")[-1]
        if func.namespace == "_c10d_functional":
            if name in _COLLECTIVES:
                first = _tensors(args[0])
                group = str(args[-1] if "group_name" not in (kwargs or {}) else kwargs["group_name"])
                self.schedule.append((self.phase, Collective(
                    name, sum(t.numel() * t.element_size() for t in first),
                    str(first[0].dtype).replace("torch.", "") if first else "", self.roles.get(group, group),
                )))
                if self.gloo and name == "all_gather_into_tensor":
                    self.temporaries[torch_private.storage_id(out)] = out.untyped_storage().nbytes()
            elif name == "wait_tensor":
                self.temporaries.pop(torch_private.storage_id(args[0]), None)
        self.add(_tensors(out))
        self.point(name, str(func))
        return out


def compile_blocks(model: nn.Module, classes: set, backend, tracker_of, records) -> int:
    """``block.compile(backend=backend, fullgraph=True)`` for every module of ``classes``, its
    compiled call wrapped so that a ``StepTracker`` (``tracker_of()``, None when not tracking)
    accounts for it. ``records``: the backend's ``CompiledGraphs`` list. Returns how many
    blocks were compiled."""
    from fsdp_compile.explain import sharding_info

    templates = {id(u.module): u.template for u in sharding_info(model).units}
    by_template: dict = {}
    blocks = [m for m in model.modules() if isinstance(m, tuple(classes))]
    for block in blocks:
        block.compile(backend=backend, fullgraph=True)
        block._compiled_call_impl = _tracked(
            block._compiled_call_impl, templates.get(id(block)), tracker_of, records, by_template
        )
    return len(blocks)


def _tracked(call, template, tracker_of, records, by_template):
    """``call`` (a block's compiled call) accounted for in the tracker: see the module docstring.
    Blocks of one ``template`` share a Dynamo graph, so a call that compiled nothing ran the
    record its template's first call made."""

    def tracked_call(*args, **kwargs):
        tracker = tracker_of()
        if tracker is None:
            return call(*args, **kwargs)
        before = len(records)
        with torch_private.pop_dispatch_mode_temporarily():
            out = call(*args, **kwargs)
        if len(records) > before or template not in by_template:
            by_template[template] = records[-1]
        record = by_template[template]
        live = {}
        base = tracker.total
        walked = Timeline()
        walk_graph(record.forward, "forward", live, walked, free_inputs=False, gloo_temporaries=tracker.gloo)
        # the block's post-forward hook drops its gathered outputs (a recompile's backward is
        # compiled when it first runs: an earlier compile of the same code has the tangents)
        compiled = next((r for r in [record, *records] if r.backward is not None
                         and r.forward.code == record.forward.code), None)
        if compiled is not None:
            for key in returned_gathered(record.forward, compiled.backward)[0]:
                live.pop(key, None)
        for p in walked.points:
            tracker.timeline.points.append(Point("forward", len(tracker.timeline.points), p.node, p.op, base + p.bytes))
        tracker.schedule += [("forward", c) for c in record.schedules.get("forward", [])]
        returned = _tensors(out)
        tracker.add(returned)
        saved = max(0, sum(live.values()) - sum(t.untyped_storage().nbytes() for t in returned))
        tracker.saved += saved
        inputs = [t for t in _tensors((args, kwargs)) if t.requires_grad]
        outputs = [t for t in returned if t.requires_grad]
        if inputs and outputs:  # else nothing upstream needs a gradient: they stay counted to the end
            backward = _Backward(tracker, record, saved)
            outputs[0].register_hook(backward.enter)
            inputs[0].register_hook(backward.leave)
        return out

    return tracked_call


class _Backward:
    """One compiled block's backward, walked like its forward: the tracker pauses from the
    gradient of the block's output (``enter``) to the gradient of its input (``leave``; the
    autograd engine restores the step's dispatch modes for every node it runs, so the tracker
    pauses rather than leaves the stack), and the block's backward graph is walked instead,
    its inputs (the saved activations and the output's gradient) freed after their last use."""

    def __init__(self, tracker: StepTracker, record, saved: int):
        self.tracker, self.record, self.saved = tracker, record, saved
        self.output_grad = None  # its storage's key

    def enter(self, grad: torch.Tensor) -> None:
        self.output_grad = torch_private.storage_id(grad)
        self.tracker.paused += 1

    def leave(self, grad: torch.Tensor) -> None:
        tracker, record = self.tracker, self.record
        # the output's gradient is a graph input below (the block's output gradient is the next
        # block's input gradient: its hook runs after this block's enter, the pauses nest)
        base = tracker.total - self.saved - tracker.live.get(self.output_grad, (None, 0))[1]
        live = {}
        for node in record.backward.graph.nodes:
            if node.op == "placeholder":
                for key, nbytes in _storages(node.meta.get("val")):
                    live.setdefault(key, nbytes)
        walked = Timeline()
        walk_graph(record.backward, "backward", live, walked, free_inputs=True, gloo_temporaries=tracker.gloo)
        for p in walked.points:
            tracker.timeline.points.append(Point("backward", len(tracker.timeline.points), p.node, p.op,
                                                 base + p.bytes))
        tracker.schedule += [("backward", c) for c in record.schedules.get("backward", [])]
        tracker.saved -= self.saved
        # what the graph returns: the input's gradient (tracked from here on) and the
        # parameters' reduced gradient shards (held to the step's end)
        tracker.grads += max(0, sum(live.values()) - grad.untyped_storage().nbytes())
        tracker.paused -= 1
        tracker.add([grad])
