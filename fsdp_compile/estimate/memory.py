"""Memory over one compiled step, read off the partitioned forward and backward graphs.

Model (what a compiled step allocates on top of the steady state, i.e. the parameters' shards,
buffers and optimizer state):

- every node's output storage (``node.meta["val"]``, fake tensors) is allocated when the node
  runs, unless it aliases a storage already live (a view);
- a storage is freed after the last node that reads it, unless the graph returns it: the
  forward's outputs (the loss and the activations saved for backward) live into the backward;
  the backward's inputs (saved activations) are freed after their last use in the backward, as
  Inductor's generated code does; the backward's outputs (the gradients' reduced shards) live on
  through the optimizer step;
- graph inputs that are parameters' shards or the batch are not counted (steady state / caller's).

So the curve holds, at every node: gathered units in flight (prefetch included: the reorder pass
issued them early), activations saved for backward, reduce buffers, and gradients produced so
far. Allocator effects (fragmentation, caching, Inductor's buffer reuse and fusion) are not
modelled, but ``gloo_temporaries=True`` adds what gloo's all-gather allocates besides our
buffers: a flat temporary of the gathered size, live from the collective's issue to its wait.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx
from torch.multiprocessing.reductions import StorageWeakRef

from fsdp_compile.torch_private import tree_leaves


@dataclass
class Point:
    phase: str  # "forward" / "backward" / "optimizer"
    index: int  # node index inside its graph
    node: str  # the node's name
    op: str  # its target
    bytes: int  # transient bytes live after the node ran


@dataclass
class Timeline:
    points: list[Point] = field(default_factory=list)

    @property
    def peak(self) -> Point:
        return max(self.points, key=lambda p: p.bytes) if self.points else Point("forward", 0, "", "", 0)


def _storages(val) -> list[tuple[StorageWeakRef, int]]:
    out = []
    for leaf in tree_leaves(val):
        if isinstance(leaf, torch.Tensor):
            try:
                storage = leaf.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            out.append((StorageWeakRef(storage), _concrete(storage.nbytes())))
    return out


def _concrete(n) -> int:
    """Bytes as an int: a symbolic size (a storage the trace sized symbolically) takes its hint."""
    if isinstance(n, int):
        return n
    hint = getattr(getattr(n, "node", None), "hint", None)
    if hint is None:
        raise RuntimeError(f"fsdp_compile.estimate: a buffer of the compiled step has a size with no value ({n})")
    return int(hint)


def _target_name(node: torch.fx.Node) -> str:
    target = node.target
    return getattr(target, "__name__", str(target)) if node.op == "call_function" else node.op


def walk_graph(
    gm: torch.fx.GraphModule,
    phase: str,
    live: dict,
    timeline: Timeline,
    free_inputs: bool,
    output_survives: bool = True,
    gloo_temporaries: bool = False,
) -> list:
    """Append ``gm``'s nodes to ``timeline``. ``live`` maps storage -> bytes of the transient
    storages alive when the graph starts (updated in place). ``free_inputs``: an input storage
    in ``live`` is freed after its last use. Returns the storages of the graph's outputs."""
    nodes = list(gm.graph.nodes)
    last_use: dict = {}
    for i, node in enumerate(nodes):
        for key, _ in _storages(node.meta.get("val")):
            last_use[key] = max(last_use.get(key, -1), i)
        for arg in node.all_input_nodes:
            for key, _ in _storages(arg.meta.get("val")):
                last_use[key] = max(last_use.get(key, -1), i)
    output = next((n for n in nodes if n.op == "output"), None)
    kept = set()
    if output is not None and output_survives:
        for arg in output.all_input_nodes:
            kept.update(key for key, _ in _storages(arg.meta.get("val")))
    inputs = set()
    for node in nodes:
        if node.op == "placeholder":
            inputs.update(key for key, _ in _storages(node.meta.get("val")))
    total = sum(live.values())
    temporaries: dict[str, int] = {}  # wait node name -> bytes freed there
    for i, node in enumerate(nodes):
        total -= temporaries.pop(node.name, 0)
        if node.op not in ("placeholder", "output"):
            for key, nbytes in _storages(node.meta.get("val")):
                if key not in live and key not in inputs:
                    live[key] = nbytes
                    total += nbytes
            if gloo_temporaries and _target_name(node).startswith("all_gather_into_tensor"):
                wait = next((u for u in node.users if _target_name(u).startswith("wait_tensor")), None)
                if wait is not None:
                    temporaries[wait.name] = sum(n for _, n in _storages(node.meta.get("val")))
                    total += temporaries[wait.name]
        timeline.points.append(Point(phase, i, node.name, _target_name(node), total))
        for key in {k for arg in [node, *node.all_input_nodes] for k, _ in _storages(arg.meta.get("val"))}:
            if last_use.get(key) != i or key in kept or key not in live:
                continue
            if key in inputs and not free_inputs:
                continue
            total -= live.pop(key)
    return [key for key in kept if key in live]
